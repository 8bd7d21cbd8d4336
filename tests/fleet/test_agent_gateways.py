"""Which gateways an agent dials (relay.agent.gateways) and the ``--connections`` option:
every URL and every address of a name with several is a target; a dual-stack name is
one gateway; each connection dials a target no other connection uses, and moves on
after a drop; names are resolved again before each reconnect, so addresses added to a
name are dialled and addresses removed are not. The trio agent takes the same options
and redials by the same rules (relay.agent.base.Redial; tests/fleet/test_fleet.py runs
the kill -9 tests on both)."""
from __future__ import annotations

import asyncio
import contextlib
import socket
from pathlib import Path
from typing import Any, Optional

import pytest
from click.testing import CliRunner

from relay.agent.client import Agent
from relay.agent.gateways import DialTarget, TargetRing, default_connections, expand
from relay.agent.policy import parse_gateway_url
from relay.cli import main

GW = parse_gateway_url("http://gw.example:8080")


def info(family: int, address: str) -> tuple:
    return (family, socket.SOCK_STREAM, 6, "", (address, 8080))


def test_a_name_with_several_addresses_of_one_family_is_several_gateways() -> None:
    three = [info(socket.AF_INET, f"10.0.0.{i}") for i in (1, 2, 3)]
    targets = expand(GW, three + [info(socket.AF_INET, "10.0.0.2")])  # duplicates count once
    assert [t.ip for t in targets] == ["10.0.0.1", "10.0.0.2", "10.0.0.3"]
    assert all(t.gateway == GW for t in targets) and "10.0.0.2" in targets[1].label
    assert default_connections(targets) == 2


def test_a_dual_stack_name_or_an_unresolved_one_is_one_gateway_dialled_by_name() -> None:
    dual = [info(socket.AF_INET, "127.0.0.1"), info(socket.AF_INET6, "::1")]
    assert expand(GW, dual) == [DialTarget(GW)]
    assert expand(GW, []) == [DialTarget(GW)]
    assert default_connections([DialTarget(GW)]) == 1
    # Several of one family win over one of the other.
    mixed = dual + [info(socket.AF_INET6, "::2")]
    assert [t.ip for t in expand(GW, mixed)] == ["::1", "::2"]


def test_an_agent_resolves_its_urls_into_targets() -> None:
    agent = Agent("http://localhost:9", "ak-x", more_gateways=["http://127.0.0.1:9", "http://127.0.0.1:10"])
    targets = asyncio.run(agent.targets())
    assert [t.gateway.url for t in targets] == ["http://localhost:9/api/v1/agent/connect",
                                                "http://127.0.0.1:9/api/v1/agent/connect",
                                                "http://127.0.0.1:10/api/v1/agent/connect"]
    assert all(t.ip is None for t in targets)


def test_each_connection_dials_a_target_no_other_uses_and_moves_on_after_a_drop() -> None:
    targets = [DialTarget(parse_gateway_url(f"http://127.0.0.1:{port}")) for port in (1, 2, 3)]
    ring = TargetRing(targets)
    assert ring.first(0) is targets[0] and ring.first(1) is targets[1]
    assert ring.next(0) is targets[2]  # 1 is taken by the other connection
    assert ring.next(0) is targets[0]
    assert ring.next(1) is targets[2]
    # Two targets, two connections: a dropped one comes back to its own (the other is taken).
    pair = TargetRing(targets[:2])
    pair.first(0)
    pair.first(1)
    assert pair.next(0) is targets[0]
    # More connections than targets: the extra ones share (the gateway refuses duplicates).
    one = TargetRing(targets[:1])
    assert one.first(0) is targets[0] and one.first(1) is targets[0] and one.next(1) is targets[0]


def test_new_targets_keep_the_connections_on_targets_still_there() -> None:
    targets = [DialTarget(GW, f"10.0.0.{i}") for i in (1, 2, 3, 4)]
    ring = TargetRing(targets[:2])
    assert ring.first(0) is targets[0] and ring.first(1) is targets[1]
    ring.update([targets[3], targets[1], targets[2]])  # 10.0.0.1 left the answer; .3, .4 came
    assert ring.targets == [targets[3], targets[1], targets[2]]
    assert ring.next(1) in (targets[3], targets[2])  # not its own, not one in use
    assert ring.next(0) not in (targets[0], ring.targets[ring.used[1]])  # a gone one is never dialled
    ring.update([])  # a name that resolved to nothing leaves the agent its targets
    assert len(ring.targets) == 3


class FollowingAgent(Agent):
    """An agent whose gateway name resolves to what the test says at the moment (its
    "DNS"), and which records every address it dials. Everything else is real: the
    dials, the gateway, the sessions."""

    def __init__(self, *args: Any, answer: list[str], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.answer = answer
        self.resolved = 0
        self.dialled: list[Optional[str]] = []

    async def resolve(self, host: str, port: int) -> list[Any]:
        assert host == "gw.relay.test"
        self.resolved += 1
        if not self.answer:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return [info(socket.AF_INET, address)[:4] + ((address, port),) for address in self.answer]

    async def connect(self, target: Optional[DialTarget] = None, connection: int = 0) -> Any:
        self.dialled.append(target.ip if target is not None else None)
        return await super().connect(target, connection)


def test_an_agent_follows_its_gateway_name_to_new_addresses(tmp_path: Path) -> None:
    """``--gateway http://gw.relay.test:PORT``: the name first answers two loopback
    addresses where no gateway listens (127.0.0.2, .3: every dial is refused), then the
    gateway's own (127.0.0.1) and another: the agent, resolving again before each
    reconnect, connects. The name then moves away (.5, .6) and the session drops: only
    the new addresses are dialled. While the name cannot be resolved, the last
    addresses are kept."""
    from tests.gateway.test_gateway_e2e import gateway_and_team, wait_until

    async def main() -> None:
        async with gateway_and_team(tmp_path) as (gw, keys):
            agent = FollowingAgent(f"http://gw.relay.test:{gw.port}", keys["ak"], name="follower",
                                   backoff_initial=0.05, backoff_max=0.2, answer=["127.0.0.2", "127.0.0.3"])
            task = asyncio.get_running_loop().create_task(agent.run())
            try:
                await wait_until(lambda: (agent.dialled.count("127.0.0.2") >= 2 and agent.resolved >= 3)
                                 or task.done())
                assert not task.done() and agent.agent_id is None
                assert set(agent.dialled) == {"127.0.0.2", "127.0.0.3"}
                assert agent.resolved >= 3  # at start, then before every new dial
                agent.answer[:] = []  # the name does not resolve for a moment: nothing is lost
                resolved = agent.resolved
                await wait_until(lambda: agent.resolved >= resolved + 2)
                assert set(agent.dialled) == {"127.0.0.2", "127.0.0.3"}
                agent.answer[:] = ["127.0.0.1", "127.0.0.4"]
                await wait_until(lambda: agent.agent_id is not None or task.done())
                assert not task.done()
                assert gw.registry.is_online(agent.agent_id)
                assert "127.0.0.1" in agent.dialled

                agent.answer[:] = ["127.0.0.5", "127.0.0.6"]
                moved = len(agent.dialled)
                for session in list(agent.sessions):
                    session.abort()  # the gateway's address went away with its connections
                await wait_until(lambda: len(agent.dialled) >= moved + 4 or task.done())
                assert not task.done()
                assert set(agent.dialled[moved:]) <= {"127.0.0.5", "127.0.0.6"}, agent.dialled[moved:]
            finally:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    asyncio.run(main())


def test_connections_option_is_checked_on_both_agents() -> None:
    runner = CliRunner()
    base = ["agent", "--gateway", "http://127.0.0.1:9", "--key", "ak-x"]
    result = runner.invoke(main, [*base, "--connections", "0"])
    assert result.exit_code == 2 and "--connections" in result.output
    result = runner.invoke(main, base, env={"RELAY_AGENT_CONNECTIONS": "many"})
    assert result.exit_code == 2 and "many" in result.output
    result = runner.invoke(main, [*base, "--backend", "trio", "--connections", "0"])
    assert result.exit_code == 2 and "--connections" in result.output
    help_text = runner.invoke(main, ["agent", "--help"]).output
    assert "RELAY_AGENT_CONNECTIONS" in help_text


def test_the_trio_agent_dials_each_url_by_name_and_checks_connections() -> None:
    from relay.agent.trio_client import TrioAgent

    agent = TrioAgent("http://localhost:9", "ak-x", more_gateways=["http://127.0.0.1:9", "http://localhost:9"],
                      connections=2)
    assert [t.gateway.url for t in agent.targets()] == ["http://localhost:9/api/v1/agent/connect",
                                                         "http://127.0.0.1:9/api/v1/agent/connect"]
    assert all(t.ip is None for t in agent.targets()) and agent.connections == 2
    with pytest.raises(ValueError):
        TrioAgent("http://localhost:9", "ak-x", connections=0)


def _certificate_for(tmp_path: Path, dns_name: str) -> tuple[Path, Path]:
    """A self-signed certificate (its own CA) for ``dns_name``, and its key."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, dns_name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(dns_name)]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


def test_a_target_dialled_by_address_is_verified_and_greeted_by_its_name(tmp_path: Path) -> None:
    """A name's addresses are dialled one by one (DNS round robin), but TLS checks the
    certificate against the name and the upgrade's Host names it: a gateway serving
    ``gw.relay.test`` is reached at 127.0.0.1 with the name's certificate."""
    import ssl

    from tests.gateway.test_gateway_e2e import gateway_and_team

    cert, key = _certificate_for(tmp_path, "gw.relay.test")
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(cert, key)
    client_ctx = ssl.create_default_context(cafile=str(cert))

    async def main() -> None:
        async with gateway_and_team(tmp_path, ssl_context=server_ctx) as (gw, keys):
            url = f"https://gw.relay.test:{gw.port}"
            agent = Agent(url, keys["ak"], name="by-address", ssl_context=client_ctx)
            session = await agent.connect(DialTarget(parse_gateway_url(url), "127.0.0.1"))
            try:
                assert session.established and not session.is_closed
            finally:
                session.abort()
            # The same address under another name: the certificate does not match.
            other = f"https://other.relay.test:{gw.port}"
            with pytest.raises(ssl.SSLCertVerificationError):
                await Agent(other, keys["ak"], ssl_context=client_ctx).connect(
                    DialTarget(parse_gateway_url(other), "127.0.0.1"))

    asyncio.run(main())
