"""The gateway's own egress (external services, webhooks) against its policy
(relay/gateway/egress.py), with real sockets on 127.0.0.1: an in-process gateway, two
teams, a hub port of team B in front of a real HTTP target, and webhook receivers.

By default the gateway reaches no loopback/link-local/private address: a literal one
is refused at creation (400 egress_not_allowed), a name that resolves to one is refused
at connection time (nothing reaches the target). With allow_private_egress the local
network is reachable, but never the gateway's own listening or hub ports, even a hub
port that started listening after the service was created.
"""
from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import socket

import pytest

from relay.gateway.egress import EgressPolicy, redact_url
from tests.gateway.test_gateway_e2e import gateway_and_team, http, run, running_agent, wait_until
from tests.http.test_http_proxy_adversarial import h11_target
from tests.http.test_invoke import invoke
from tests.tunnels.test_tunnels_api import api, create

pytestmark = pytest.mark.timeout(120)

SERVICES = "/api/v1/r/containers"


def _hostname_resolving_to_a_private_address() -> str:
    """This machine's name, when it resolves to a non-global address only (it usually
    does: /etc/hosts), else skip."""
    name = socket.gethostname()
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(name, 80, type=socket.SOCK_STREAM)}
    except OSError:
        pytest.skip("the host name does not resolve")
    if not addresses or any(ipaddress.ip_address(a.split("%")[0]).is_global for a in addresses):
        pytest.skip(f"{name} resolves to a global address: {addresses}")
    return name


@contextlib.asynccontextmanager
async def team_b_hub(gw, keys_b):
    """Team B's tcp tunnel (Tunnels API) to an HTTP target answering "B-SECRET"; yields
    (hub port, what the target saw)."""
    answer = lambda method, tgt, body: (200, [], b"B-SECRET")  # noqa: E731
    async with h11_target(answer) as (port, seen), running_agent(gw, keys_b["ak"], name="box-b") as agent:
        tunnel = await create(gw, keys_b["sk"], target=f"127.0.0.1:{port}", agent_id=agent.agent_id,
                              protocol="tcp")
        yield tunnel["hub_port"], seen


def test_by_default_loopback_link_local_private_and_the_gateways_own_ports_are_refused(tmp_path):
    hostname = _hostname_resolving_to_a_private_address()

    async def main():
        async with gateway_and_team(tmp_path, allow_private_egress=False) as (gw, keys):
            _, keys_b = await gw.store.create_team_with_keys("team-b")
            sk = keys["sk"]
            async with team_b_hub(gw, keys_b) as (hub_port, seen):
                forbidden = [f"http://127.0.0.1:{hub_port}/", f"http://127.0.0.1:{gw.port}/",
                             f"http://localhost:{hub_port}/x", "http://169.254.169.254/latest/meta-data/",
                             "http://10.1.2.3/", "http://192.168.0.1:8080/", "http://[::1]:80/",
                             f"http://[::ffff:127.0.0.1]:{hub_port}/", "http://0.0.0.0/",
                             "https://100.64.0.1/"]
                for n, url in enumerate(forbidden):
                    status, body = await http(gw.port, "POST", SERVICES, sk, {"service_slug": f"ext-{n:02}",
                                                                               "url": url})
                    assert status == 400 and body["error"]["code"] == "egress_not_allowed", (url, body)
                    status, _, body = await api(gw, "POST", "/api/v1/webhooks", sk, {"url": url})
                    assert status == 400 and body["error"]["code"] == "egress_not_allowed", (url, body)
                assert await gw.store.list_services((await gw.store.list_teams())[0].id) == []
                # A name is not refused at creation, but every connection checks what it
                # resolves to: refused, as an unreachable target (502), nothing sent.
                status, svc = await http(gw.port, "POST", SERVICES, sk,
                                         {"service_slug": "by-name", "url": f"http://{hostname}:{hub_port}/"})
                assert status == 201, svc
                status, out = await invoke(gw, sk, "by-name", method="GET", path="/")
                assert status == 502 and out["error"]["code"] == "target_unreachable", out
                assert "egress" in out["error"]["message"]
                assert b"B-SECRET" not in repr(out).encode() and seen == []
                # The same for a webhook: the attempt fails, the receiver gets nothing.
                dispatcher = gw.tunnels_api.webhooks
                dispatcher.attempts, dispatcher.backoff = 1, 0.01
                status, _, _ = await api(gw, "POST", "/api/v1/webhooks", sk,
                                         {"url": f"http://{hostname}:{hub_port}/hook"})
                assert status == 201
                async with running_agent(gw, keys["ak"], name="box-a") as agent:
                    await create(gw, sk, target="127.0.0.1:8188", agent_id=agent.agent_id)
                    await wait_until(lambda: dispatcher.failed >= 1)
                assert dispatcher.delivered == 0 and seen == []

    run(main)


def test_with_private_egress_allowed_the_gateways_own_ports_stay_refused(tmp_path):
    async def main():
        async with gateway_and_team(tmp_path, allow_private_egress=True) as (gw, keys):
            _, keys_b = await gw.store.create_team_with_keys("team-b")
            sk = keys["sk"]
            async with team_b_hub(gw, keys_b) as (hub_port, seen):
                for n, url in enumerate([f"http://127.0.0.1:{hub_port}/", f"http://127.0.0.1:{gw.port}/",
                                         f"http://localhost:{gw.port}/api/v1/agents"]):
                    status, body = await http(gw.port, "POST", SERVICES, sk, {"service_slug": f"own-{n}",
                                                                               "url": url})
                    assert status == 400 and body["error"]["code"] == "egress_not_allowed", (url, body)
                    assert "own port" in body["error"]["message"]
                    status, _, body = await api(gw, "POST", "/api/v1/webhooks", sk, {"url": url})
                    assert status == 400 and body["error"]["code"] == "egress_not_allowed", (url, body)
                # A free port when the service is created, a hub port of team B later: the
                # check at connection time refuses it.
                with socket.socket() as probe:
                    probe.bind(("127.0.0.1", 0))
                    later = probe.getsockname()[1]
                status, svc = await http(gw.port, "POST", SERVICES, sk,
                                         {"service_slug": "later", "url": f"http://127.0.0.1:{later}/"})
                assert status == 201, svc
                async with h11_target(lambda m, t, b: (200, [], b"B-SECRET")) as (port, seen_later), \
                        running_agent(gw, keys_b["ak"], name="box-b2") as agent:
                    tunnel = await create(gw, keys_b["sk"], target=f"127.0.0.1:{port}", agent_id=agent.agent_id,
                                          protocol="tcp", hub_port=later)
                    assert tunnel["hub_port"] == later
                    status, out = await invoke(gw, sk, "later", method="GET", path="/")
                    assert status == 502 and "own port" in out["error"]["message"], out
                    assert seen_later == []
                    # The local network itself is reachable with the option: team B's
                    # target directly (not through the hub).
                    status, svc = await http(gw.port, "POST", SERVICES, sk,
                                             {"service_slug": "direct", "url": f"http://127.0.0.1:{port}/"})
                    assert status == 201
                    status, out = await invoke(gw, sk, "direct", method="GET", path="/")
                    assert status == 200 and out["status_code"] == 200, out

    run(main)


def test_policy_units_and_redaction():
    policy = EgressPolicy(own_ports=lambda: {8080})

    async def resolve(host: str, port: int):
        return await policy.resolve(host, port)

    assert policy.check_url("https://example.com/x") is None
    assert policy.check_url("http://127.0.0.1:1/") and policy.check_url("http://LOCALHOST./")
    assert policy.check_url("http://[fe80::1]/") and policy.check_url("http://[fd00::1]/")
    assert policy.check_url("http://224.0.0.1/")
    # IPv6 spellings of private IPv4 addresses: NAT64, 6to4, IPv4-mapped.
    assert policy.check_url("http://[64:ff9b::a9fe:a9fe]/")  # 169.254.169.254 via NAT64
    assert policy.check_url("http://[2002:a00:1::1]/")  # 6to4 of 10.0.0.1
    assert policy.check_url("http://[::ffff:127.0.0.1]/")
    assert policy.check_url("http://[64:ff9b::808:808]/") is None  # 8.8.8.8: public
    assert asyncio.run(resolve("8.8.8.8", 443)) == ["8.8.8.8"]
    allowing = EgressPolicy(True, own_ports=lambda: {8080})
    assert allowing.check_url("http://10.0.0.1:8081/") is None
    assert "own port" in allowing.check_url("http://10.0.0.1:8080/")
    assert redact_url("https://u:p@hooks.slack.com/services/T/B/XYZ?x=1#f") == "https://hooks.slack.com"
    assert redact_url("http://[::1]:8080/secret") == "http://[::1]:8080"
