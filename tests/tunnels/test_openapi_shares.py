"""Share links ``/s/{shareToken}/...`` in ``/api/v1/openapi.json`` (issue 5): described at the
gateway's root (a path-level ``servers``), and what they answer matches the description.

A real gateway, agent and upstream (tests.support.webapps) on 127.0.0.1; responses are checked
against the document's own schemas with jsonschema_rs.
"""
from __future__ import annotations

import jsonschema_rs
import pytest

from tests.gateway.test_gateway_e2e import run, running_agent
from tests.support.webapps import WebApp
from tests.tunnels.test_tunnels_api import api, create

pytestmark = pytest.mark.timeout(120)


def resolve(doc: dict, node: dict) -> dict:
    while "$ref" in node:
        target = doc
        for part in node["$ref"].removeprefix("#/").split("/"):
            target = target[part]
        node = target
    return node


def test_share_links_described_and_answers_conform(tmp_path):
    from tests.gateway.test_gateway_e2e import gateway_and_team

    async def main():
        async with WebApp() as app, gateway_and_team(tmp_path) as (gw, keys):
            status, _, doc = await api(gw, "GET", "/api/v1/openapi.json")
            assert status == 200
            proxied, bare = doc["paths"]["/s/{shareToken}/{path}"], doc["paths"]["/s/{shareToken}"]
            for item in (proxied, bare):
                # At the gateway's root, not under the API's /api/v1 server.
                assert item["servers"][0]["url"] == gw.url and doc["servers"][0]["url"] == gw.url + "/api/v1"
                assert {"get", "post", "put", "patch", "delete", "options"} <= set(item)
                assert all(item[m]["security"] == [] for m in ("get", "post"))  # the token is the credential
            assert {"404", "405", "410", "429", "502", "503", "default"} <= set(proxied["get"]["responses"])
            assert "308" in bare["get"]["responses"]
            error_schema = jsonschema_rs.validator_for(
                {**resolve(doc, proxied["get"]["responses"]["404"]["content"]["application/json"]["schema"]),
                 "required": ["error"]})

            async with running_agent(gw, keys["ak"], name="web-box") as agent:
                tunnel = await create(gw, keys["sk"], target=f"127.0.0.1:{app.port}", agent_id=agent.agent_id,
                                      name="web", protocol="http")
                status, _, share = await api(gw, "POST", f"/api/v1/tunnels/{tunnel['id']}/shares", keys["sk"],
                                             {"name": "read-only", "allowed_methods": ["GET"], "expires_in": "1h"})
                assert status == 201, share
                prefix = "/s/" + share["share_url"].rsplit("/s/", 1)[1]
                # The documented answers, each from its real cause.
                status, _, body = await api(gw, "GET", prefix + "echo/x")
                assert status == 200 and body["method"] == "GET"
                status, headers, body = await api(gw, "POST", prefix + "echo/x", body={"a": 1})
                assert status == 405 and "405" in proxied["post"]["responses"] and "GET" in headers["allow"]
                error_schema.validate(body)
                status, _, body = await api(gw, "GET", "/s/no-such-share-token/x")
                assert status == 404
                error_schema.validate(body)
                status, headers, _ = await api(gw, "GET", prefix.rstrip("/"))
                assert status == 308 and headers["location"] == prefix

    run(main)
