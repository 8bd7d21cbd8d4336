"""Seed 002 details of the Tunnels API: share links of https tunnels (the agent speaks
TLS to the target) and ``public: true`` on tcp tunnels (the hub port listens on the
gateway's public hub host instead of its private one).

An in-process gateway and agent on 127.0.0.1, a real HTTPS server (self-signed
certificate) and a real TCP echo service behind the agent, real HTTP clients."""
from __future__ import annotations

import asyncio
import re
import ssl

import pytest

from tests.gateway.test_gateway_e2e import _self_signed, gateway_and_team, run, running_agent
from tests.support.webapps import WebApp
from tests.tunnels.test_tunnels_api import api, create, echo_server, echo_through, refused

pytestmark = pytest.mark.timeout(120)


def _server_context(tmp_path) -> ssl.SSLContext:
    cert, key = _self_signed(tmp_path)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    return context


def test_share_of_an_https_tunnel_reaches_the_https_target(tmp_path):
    async def main():
        app = await WebApp().start(ssl=_server_context(tmp_path))
        try:
            async with gateway_and_team(tmp_path) as (gw, keys):
                sk = keys["sk"]
                async with running_agent(gw, keys["ak"], name="web") as agent:
                    tunnel = await create(gw, sk, target=f"127.0.0.1:{app.port}", agent_id=agent.agent_id,
                                          protocol="https")
                    status, _, share = await api(gw, "POST", f"/api/v1/tunnels/{tunnel['id']}/shares", sk,
                                                 {"name": "tls demo", "allowed_methods": ["GET", "POST"]})
                    assert status == 201, share
                    token = re.fullmatch(re.escape(gw.url) + r"/s/([\w-]+)/", share["shareUrl"]).group(1)
                    # Requests, kept alive or not, through the agent's TLS connection.
                    status, _, echo = await api(gw, "GET", f"/s/{token}/echo/page?x=1")
                    assert status == 200, echo
                    assert echo["method"] == "GET" and echo["target"] == "/echo/page?x=1"
                    status, _, echo = await api(gw, "POST", f"/s/{token}/echo/post", body={"a": 1})
                    assert status == 200 and echo["method"] == "POST"
                    # The share's own checks still apply.
                    assert (await api(gw, "DELETE", f"/s/{token}/echo/x"))[0] == 405
                    # public: true on an https tunnel makes the browser link (a share) too.
                    pub = await create(gw, sk, target=f"127.0.0.1:{app.port}", agent_id=agent.agent_id,
                                       protocol="https", public=True)
                    path = "/s/" + pub["public_url"].rsplit("/s/", 1)[1] + "echo/pub"
                    status, _, echo = await api(gw, "GET", path)
                    assert status == 200 and echo["target"] == "/echo/pub"
        finally:
            await app.close()

    run(main)


def test_public_tcp_tunnel_listens_on_the_public_hub_host(tmp_path):
    """127.0.0.2 stands for the public interface: on Linux every 127/8 address is the
    loopback, so a listener on one address is refused on the other."""
    async def main():
        async with gateway_and_team(tmp_path, public_hub_host="127.0.0.2") as (gw, keys), \
                echo_server() as echo_port:
            sk = keys["sk"]
            async with running_agent(gw, keys["ak"], name="db") as agent:
                private = await create(gw, sk, target=f"127.0.0.1:{echo_port}", agent_id=agent.agent_id,
                                       protocol="tcp")
                public = await create(gw, sk, target=f"127.0.0.1:{echo_port}", agent_id=agent.agent_id,
                                      protocol="tcp", public=True)
                assert private["hub_host"] == "127.0.0.1" and "public_url" not in private
                assert public["hub_host"] == "127.0.0.2"
                assert public["public_url"] == f"tcp://127.0.0.2:{public['hub_port']}"
                # Each listens where it says, and only there.
                assert await echo_through(private["hub_port"]) == b"hello relay"
                assert await refused(public["hub_port"])  # not on 127.0.0.1
                reader_host = "127.0.0.2"
                reader, writer = await asyncio.open_connection(reader_host, public["hub_port"])
                writer.write(b"public bytes")
                async with asyncio.timeout(5):
                    assert await reader.readexactly(12) == b"public bytes"
                writer.close()
                # Reads say the same; a paused and resumed public tunnel comes back public.
                status, _, got = await api(gw, "GET", f"/api/v1/tunnels/{public['id']}", sk)
                assert status == 200 and got["public_url"] == public["public_url"]
                for state in ("paused", "active"):
                    status, _, got = await api(gw, "PATCH", f"/api/v1/tunnels/{public['id']}", sk,
                                               {"status": state})
                    assert status == 200 and got["status"] == state
                assert got["hub_host"] == "127.0.0.2"
                reader, writer = await asyncio.open_connection(reader_host, public["hub_port"])
                writer.write(b"again")
                async with asyncio.timeout(5):
                    assert await reader.readexactly(5) == b"again"
                writer.close()

    run(main)


def test_public_hub_host_defaults_to_every_interface(tmp_path):
    async def main():
        async with gateway_and_team(tmp_path) as (gw, keys), echo_server() as echo_port:
            async with running_agent(gw, keys["ak"], name="db") as agent:
                public = await create(gw, keys["sk"], target=f"127.0.0.1:{echo_port}",
                                      agent_id=agent.agent_id, protocol="tcp", public=True)
                assert public["hub_host"] == "0.0.0.0"
                # Every interface: named by the gateway's public URL host.
                assert public["public_url"] == f"tcp://127.0.0.1:{public['hub_port']}"
                assert gw.tunnels.hub(public["id"]).server.sockets[0].getsockname()[0] == "0.0.0.0"
                assert await echo_through(public["hub_port"]) == b"hello relay"

    run(main)
