"""The store interface's contract, held against every backend (SQLite and PostgreSQL).

Each test runs once per backend (the ``store_url`` fixture of tests/support/store_fixtures.py:
a SQLite file, or a new database in the session's private PostgreSQL) and calls every
method of relay.gateway.store.Store the gateway uses: teams, credentials, agents, tunnel
sessions, tunnels, bindings, shares, webhooks and their pending deliveries, services,
the generation, migrations. What only one backend does (SQLite's file, WAL and
``data_version``; PostgreSQL's notifications, outages, concurrent gateways) is in
tests/store/test_store.py and tests/store/test_store_postgres.py.
"""
from __future__ import annotations

import asyncio
import uuid
from typing import Any

import pytest

from relay.gateway.store import (
    CREDENTIAL_KINDS,
    ConflictError,
    NotFoundError,
    SecretToken,
    Store,
    StoreError,
    ensure_default_team,
    hash_token,
    normalize_uuid,
    open_store,
)
from relay.gateway.store.postgres import MIGRATIONS as POSTGRES_MIGRATIONS
from relay.gateway.store.sqlite import MIGRATIONS as SQLITE_MIGRATIONS
from tests.support.store_fixtures import with_store

pytestmark = pytest.mark.timeout(120)


class Clock:
    """A settable clock for the times the store records."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now


def _near_miss(token: str) -> str:
    return token[:-1] + ("A" if token[-1] != "A" else "B")


# --------------------------------------------------------------------------- schema, lifecycle


def test_schema_is_current_and_reopening_does_not_migrate_again(store_url: str) -> None:
    async def first(s: Store) -> int:
        team = await s.create_team("kept")
        assert await s.get_team(team.id) == team
        return await s.schema_version()

    version = with_store(store_url, first)
    assert version == len(SQLITE_MIGRATIONS) == len(POSTGRES_MIGRATIONS)

    async def again(s: Store) -> None:  # a second CREATE TABLE teams would raise
        assert await s.schema_version() == version
        assert [t.name for t in await s.list_teams()] == ["kept"]

    with_store(store_url, again)


def test_restart_keeps_everything(store_url: str) -> None:
    async def write(s: Store) -> dict[str, Any]:
        team, keys = await s.create_team_with_keys("acme")
        revoked, revoked_key = await s.create_credential(team.id, "dk")
        await s.revoke_credential(team.id, revoked.id)
        agent = await s.upsert_agent(team.id, None, "box", {"gpu": "a100"}, "1.2.3", "idle")
        session, access, admin = await s.create_tunnel_session(team.id, agent.id, 5432, "tcp", hub_port=15432)
        tunnel = await s.create_tunnel(team.id, agent.id, "db", "127.0.0.1", 5432, "tcp", hub_port=25432)
        await s.put_binding(team.id, tunnel.id, agent.id, 6543)
        share, share_token = await s.create_share(team.id, tunnel.id, "demo", rate_limit=5)
        hook = await s.create_webhook(team.id, "http://example.com/h", ["tunnel.created"])
        await s.add_webhook_deliveries([("d1", hook.id, "tunnel.created", b"{}")], keep=10)
        service = await s.put_service(team.id, "my-svc", "deployed", {"exposed_port": 80}, "running")
        return locals()

    w = with_store(store_url, write)

    async def read(s: Store) -> None:
        team, keys = w["team"], w["keys"]
        assert await s.list_teams() == [team]
        assert (await s.lookup_credential(keys["sk"])).team_id == team.id
        assert (await s.lookup_credential(keys["ak"])).kind == "ak"
        assert await s.lookup_credential(w["revoked_key"]) is None
        assert (await s.get_credential(team.id, w["revoked"].id)).revoked
        assert await s.get_agent(team.id, w["agent"].id) == w["agent"]
        assert await s.get_tunnel_session(team.id, w["session"].session_id) == w["session"]
        assert await s.get_tunnel_session_by_token(w["access"]) == w["session"]
        assert await s.check_tunnel_admin_token(w["session"].session_id, w["admin"]) == w["session"]
        assert await s.get_tunnel(team.id, w["tunnel"].id) == w["tunnel"]
        assert await s.list_bindings(team.id, w["agent"].id) == [(w["tunnel"], 6543)]
        assert await s.get_share_by_token(w["share_token"]) == w["share"]
        assert await s.get_webhook(team.id, w["hook"].id) == w["hook"]
        assert [(h.id, e, b, d, n) for h, e, b, d, n in await s.pending_webhook_deliveries(10)] == [
            (w["hook"].id, "tunnel.created", b"{}", "d1", 0)]
        assert await s.get_service(team.id, "my-svc") == w["service"]

    with_store(store_url, read)


def test_failed_transaction_rolls_back_and_the_store_stays_usable(store_url: str) -> None:
    async def body(s: Store) -> None:
        team = await s.create_team("t")
        agent = await s.upsert_agent(team.id, None, "a")
        other = await s.create_team("u")
        with pytest.raises(ConflictError):
            await s.upsert_agent(other.id, agent.id, "steal")
        assert (await s.get_agent(team.id, agent.id)).name == "a"
        assert (await s.create_team("after")).name == "after"
        with pytest.raises(StoreError, match="kind"):  # the team insert before it is rolled back too
            await s.create_team_with_keys("half", kinds=("sk", "xx"))
        assert "half" not in [t.name for t in await s.list_teams()]

    with_store(store_url, body)


# --------------------------------------------------------------------------- teams


def test_teams(store_url: str) -> None:
    async def body(s: Store) -> None:
        a = await s.create_team("  alpha ")
        b = await s.create_team("beta")
        assert a.name == "alpha"
        assert uuid.UUID(a.id).version == 4
        assert await s.get_team(a.id) == a
        assert await s.get_team(a.id.upper()) == a
        assert await s.get_team("not-a-uuid") is None
        assert await s.get_team(str(uuid.uuid4())) is None
        assert await s.list_teams() == [a, b]
        for name in ("", "   ", "x" * 101):
            with pytest.raises(StoreError, match="1 to 100"):
                await s.create_team(name)

    with_store(store_url, body, clock=_ticking())


def _ticking() -> Any:
    """A clock that moves on by one second per reading (orders rows made in one test)."""
    clock = Clock()

    def tick() -> float:
        clock.now += 1
        return clock.now

    return tick


def test_default_team_only_on_an_empty_store_even_when_two_gateways_start_at_once(store_url: str) -> None:
    async def body(s: Store) -> None:
        other = await open_store(store_url)
        try:
            results = await asyncio.gather(ensure_default_team(s), ensure_default_team(other))
        finally:
            await other.close()
        created = [r for r in results if r is not None]
        assert len(created) == 1
        team, keys = created[0]
        assert team.name == "default" and set(keys) == set(CREDENTIAL_KINDS)
        for kind, key in keys.items():
            assert key.startswith(f"{kind}-")
            assert (await s.lookup_credential(key)).team_id == team.id
        assert await ensure_default_team(s) is None
        assert [t.name for t in await s.list_teams()] == ["default"]
        assert await s.create_team_with_keys("more", only_if_no_teams=True) is None
        made, keys = await s.create_team_with_keys("pair", ("sk", "ak"))
        assert set(keys) == {"sk", "ak"} and len(await s.list_credentials(made.id)) == 2

    with_store(store_url, body)


# --------------------------------------------------------------------------- credentials


def test_credentials(store_url: str) -> None:
    async def body(s: Store) -> None:
        team = await s.create_team("t")
        for kind in CREDENTIAL_KINDS:
            cred, token = await s.create_credential(team.id, kind)
            assert isinstance(token, SecretToken) and token.startswith(f"{kind}-")
            assert len(token) == 3 + 43  # 32 random bytes, URL-safe base64
            assert (cred.kind, cred.prefix, cred.display) == (kind, token[:9], token[:9] + "…")
            assert cred.token_hash == hash_token(token) and cred.revoked_at is None
            assert await s.lookup_credential(token) == cred
            assert await s.get_credential(team.id, cred.id) == cred
            assert await s.get_credential(team.id, cred.id.upper()) == cred
        with pytest.raises(StoreError, match="kind"):
            await s.create_credential(team.id, "xk")
        with pytest.raises(NotFoundError, match="unknown team"):
            await s.create_credential(str(uuid.uuid4()), "sk")

    with_store(store_url, body, clock=_ticking())


def test_near_misses_and_arbitrary_text_are_never_credentials(store_url: str) -> None:
    async def body(s: Store) -> None:
        team = await s.create_team("t")
        _, token = await s.create_credential(team.id, "sk")
        for replacement in "AaZz09-_":
            if replacement != token[-1]:
                assert await s.lookup_credential(token[:-1] + replacement) is None
        for text in (token[:-1], token + "x", token.upper(), "", "sk-", "sk-\x00", "sk-'; DROP TABLE teams; --",
                     "sk-" + "\udcff", "ak-" + "é" * 40, "x" * 10000, "sk-%", "sk-_"):
            assert await s.lookup_credential(text) is None
            assert await s.get_tunnel_session_by_token(text) is None
            assert await s.get_share_by_token(text) is None
        assert await s.lookup_credential(token) is not None
        assert len(await s.list_teams()) == 1

    with_store(store_url, body)


def test_revoking_is_team_scoped_and_final(store_url: str) -> None:
    async def body(s: Store) -> None:
        a, b = await s.create_team("a"), await s.create_team("b")
        cred, token = await s.create_credential(a.id, "sk")
        assert not await s.revoke_credential(b.id, cred.id)  # another team cannot revoke it
        assert await s.lookup_credential(token) is not None
        assert await s.revoked_credentials([cred.id]) == set()
        assert await s.revoke_credential(a.id, cred.id)
        assert await s.lookup_credential(token) is None
        assert not await s.revoke_credential(a.id, cred.id)  # already revoked
        assert await s.list_credentials(a.id) == []
        assert [c.id for c in await s.list_credentials(a.id, include_revoked=True)] == [cred.id]
        assert (await s.get_credential(a.id, cred.id)).revoked
        # revoked_credentials: unknown ids are not revoked; any number of ids at once.
        many = [str(uuid.uuid4()) for _ in range(5000)] + [cred.id, "not-an-id"]
        assert await s.revoked_credentials(many) == {cred.id}
        assert await s.revoked_credentials([]) == set()

    with_store(store_url, body)


def test_credentials_are_team_scoped(store_url: str) -> None:
    async def body(s: Store) -> None:
        a, _ = await s.create_team_with_keys("a")
        b, _ = await s.create_team_with_keys("b")
        assert {c.team_id for c in await s.list_credentials(a.id)} == {a.id}
        assert len(await s.list_credentials(b.id)) == 3
        assert await s.get_credential(b.id, (await s.list_credentials(a.id))[0].id) is None
        assert await s.list_credentials("not-a-uuid") == []

    with_store(store_url, body)


# --------------------------------------------------------------------------- agents


def test_agents(store_url: str) -> None:
    clock = Clock(1000.0)

    async def body(s: Store) -> None:
        team = await s.create_team("t")
        chosen = str(uuid.uuid4()).upper()
        first = await s.upsert_agent(team.id, chosen, "box", ["gpu"], "1.0", "idle")
        assert first.id == normalize_uuid(chosen)
        assert (first.first_seen, first.last_seen, first.labels) == (1000.0, 1000.0, ["gpu"])
        clock.now = 2000.0
        again = await s.upsert_agent(team.id, first.id, "box2", {"gpu": "h100"}, "1.1", "busy")
        assert again.id == first.id
        assert (again.name, again.labels, again.version, again.status) == ("box2", {"gpu": "h100"}, "1.1", "busy")
        assert (again.first_seen, again.last_seen) == (1000.0, 2000.0)
        clock.now = 3000.0
        assert await s.touch_agent(team.id, first.id)
        assert (await s.get_agent(team.id, first.id)).last_seen == 3000.0
        assert await s.set_agent_status(team.id, first.id, "tunnel")
        assert (await s.get_agent(team.id, first.id)).status == "tunnel"
        fresh = await s.upsert_agent(team.id, None, "new")
        assert uuid.UUID(fresh.id) and fresh.labels == {} and fresh.status == "idle"
        assert [a.id for a in await s.list_agents(team.id)] == [first.id, fresh.id]
        assert await s.mark_all_agents_offline() == 2
        assert await s.mark_all_agents_offline() == 0
        assert {a.status for a in await s.list_agents(team.id)} == {"offline"}

    with_store(store_url, body, clock=clock)


def test_agents_are_team_scoped_and_validated(store_url: str) -> None:
    async def body(s: Store) -> None:
        a, b = await s.create_team("a"), await s.create_team("b")
        agent = await s.upsert_agent(a.id, None, "box", {"gpu": "a100"}, "1.0", "idle")
        assert await s.get_agent(a.id, agent.id) == agent
        assert await s.get_agent(b.id, agent.id) is None
        assert await s.list_agents(b.id) == []
        assert await s.list_agents(a.id) == [agent]
        assert not await s.set_agent_status(b.id, agent.id, "busy")
        assert not await s.touch_agent(b.id, agent.id)
        assert (await s.get_agent(a.id, agent.id)).status == "idle"
        with pytest.raises(ConflictError):  # b cannot take over a's agent id
            await s.upsert_agent(b.id, agent.id, "evil")
        assert (await s.get_agent(a.id, agent.id)).name == "box"
        assert await s.list_agents(b.id) == []
        with pytest.raises(StoreError, match="status"):
            await s.upsert_agent(a.id, None, "x", status="sleeping")
        with pytest.raises(StoreError, match="UUID"):
            await s.upsert_agent(a.id, "agent-1", "x")
        with pytest.raises(NotFoundError):
            await s.upsert_agent(str(uuid.uuid4()), None, "x")
        with pytest.raises(StoreError, match="status"):
            await s.set_agent_status(a.id, agent.id, "nope")

    with_store(store_url, body)


# --------------------------------------------------------------------------- tunnel sessions


def test_tunnel_sessions(store_url: str) -> None:
    async def body(s: Store) -> None:
        a, b = await s.create_team("a"), await s.create_team("b")
        agent = await s.upsert_agent(a.id, None, "box")
        other = await s.upsert_agent(a.id, None, "box2")
        s1, access1, admin1 = await s.create_tunnel_session(a.id, agent.id)
        s2, access2, _ = await s.create_tunnel_session(a.id, agent.id, 22, "tcp", hub_port=4022,
                                                       metadata={"note": "x"})
        s3, _, _ = await s.create_tunnel_session(a.id, other.id, 8888)
        assert (s1.target_port, s1.protocol, s1.is_open, s1.hub_port) == (8188, "http", True, None)
        assert (s2.hub_port, s2.metadata) == (4022, {"note": "x"})
        assert len({s1.session_id, s2.session_id, s3.session_id}) == 3
        assert access1 != admin1 and isinstance(access1, SecretToken)
        assert s1.token_hash == hash_token(access1) and s1.admin_token_hash == hash_token(admin1)

        # team scoping
        assert await s.get_tunnel_session(b.id, s1.session_id) is None
        assert await s.list_tunnel_sessions(b.id) == []
        assert not await s.close_tunnel_session(b.id, s1.session_id)
        with pytest.raises(NotFoundError):
            await s.create_tunnel_session(b.id, agent.id)

        # tokens: the access token finds the session, the admin token is not an access token
        assert await s.get_tunnel_session_by_token(access1) == s1
        assert await s.get_tunnel_session_by_token(admin1) is None
        assert await s.get_tunnel_session_by_token(_near_miss(access1)) is None
        assert await s.check_tunnel_admin_token(s1.session_id, admin1) == s1
        assert await s.check_tunnel_admin_token(s1.session_id, access1) is None
        assert await s.check_tunnel_admin_token(s2.session_id, admin1) is None
        assert await s.check_tunnel_admin_token(s1.session_id, "") is None

        assert await s.list_tunnel_sessions(a.id) == [s1, s2, s3]
        assert await s.list_tunnel_sessions(a.id, agent.id) == [s1, s2]

        # close one, then all of an agent's; the in-memory version moves each time
        version = s.tunnel_sessions_version
        assert await s.close_tunnel_session(a.id, s1.session_id)
        assert s.tunnel_sessions_version != version
        assert not await s.close_tunnel_session(a.id, s1.session_id)
        assert await s.get_tunnel_session_by_token(access1) is None
        assert (await s.get_tunnel_session_by_token(access1, open_only=False)).closed_at is not None
        assert await s.list_tunnel_sessions(a.id, agent.id) == [s2]
        assert len(await s.list_tunnel_sessions(a.id, agent.id, open_only=False)) == 2
        version = s.tunnel_sessions_version
        assert await s.close_tunnel_sessions(a.id, agent.id) == [s2.session_id]
        assert s.tunnel_sessions_version != version
        assert await s.get_tunnel_session_by_token(access2) is None
        assert await s.list_tunnel_sessions(a.id) == [s3]
        assert await s.close_tunnel_sessions(b.id, other.id) == []
        assert await s.list_tunnel_sessions(a.id) == [s3]

    with_store(store_url, body, clock=_ticking())


def test_tunnel_session_validation(store_url: str) -> None:
    async def body(s: Store) -> None:
        team = await s.create_team("t")
        agent = await s.upsert_agent(team.id, None, "a")
        for port, protocol, hub in ((0, "http", None), (65536, "http", None), (22, "quic", None),
                                    (True, "tcp", None), ("80", "http", None), (80, "tcp", 0)):
            with pytest.raises(StoreError):
                await s.create_tunnel_session(team.id, agent.id, port, protocol, hub_port=hub)
        assert await s.list_tunnel_sessions(team.id, open_only=False) == []

    with_store(store_url, body)


# --------------------------------------------------------------------------- tunnels, bindings


def test_tunnels(store_url: str) -> None:
    clock = _ticking()

    async def body(s: Store) -> None:
        a, b = await s.create_team("a"), await s.create_team("b")
        agent = await s.upsert_agent(a.id, None, "box")
        b_agent = await s.upsert_agent(b.id, None, "bbox")
        one = await s.create_tunnel(a.id, agent.id, "db", "127.0.0.1", 5432, "tcp", hub_port=20001,
                                    metadata={"env": "staging"})
        two = await s.create_tunnel(a.id, agent.id, "web", "::1", 80, "http", public=True, status="paused")
        three = await s.create_tunnel(b.id, b_agent.id, "b", "127.0.0.1", 22, "tcp", hub_port=20003)
        assert (one.name, one.target_host, one.target_port, one.protocol, one.public, one.hub_port,
                one.status, one.metadata) == ("db", "127.0.0.1", 5432, "tcp", False, 20001, "active",
                                              {"env": "staging"})
        assert (two.public, two.hub_port, two.status, two.metadata) == (True, None, "paused", {})
        with pytest.raises(NotFoundError):  # another team's agent
            await s.create_tunnel(a.id, b_agent.id, "x", "127.0.0.1", 1, "tcp")
        assert await s.get_tunnel(a.id, one.id) == one
        assert await s.get_tunnel(a.id, one.id.upper()) == one
        assert await s.get_tunnel(b.id, one.id) is None
        assert await s.list_tunnels(a.id) == [one, two]
        assert await s.list_tunnels(None) == [one, two, three]
        assert await s.tunnel_on_hub_port(20003) == three
        assert await s.tunnel_on_hub_port(20002) is None

        changed = await s.update_tunnel(a.id, one.id, name="db2", status="paused", metadata={"v": 2},
                                        hub_port=None)
        assert (changed.name, changed.status, changed.metadata, changed.hub_port) == ("db2", "paused", {"v": 2}, None)
        assert changed.updated_at > one.updated_at and changed.created_at == one.created_at
        assert await s.get_tunnel(a.id, one.id) == changed
        assert (await s.update_tunnel(a.id, one.id, hub_port=20009)).hub_port == 20009
        assert await s.update_tunnel(b.id, one.id, name="stolen") is None
        assert await s.update_tunnel(a.id, str(uuid.uuid4()), name="x") is None
        for bad in ({}, {"target_port": 1}, {"agent_id": b.id}, {"status": "gone"}):
            with pytest.raises(StoreError):
                await s.update_tunnel(a.id, one.id, **bad)

        assert await s.delete_tunnel(b.id, one.id) is None
        deleted = await s.delete_tunnel(a.id, one.id)
        assert deleted is not None and deleted.id == one.id
        assert await s.get_tunnel(a.id, one.id) is None
        assert await s.delete_tunnel(a.id, one.id) is None
        assert await s.list_tunnels(None) == [two, three]

    with_store(store_url, body, clock=clock)


def test_a_hub_port_belongs_to_one_tunnel_and_is_claimed_once(store_url: str) -> None:
    """The unique hub port (relay.gateway.api.tunnels reserves ports with it across a
    fleet): claim_hub_port sets a port only where none is, and never one another
    tunnel holds, whatever its team or status."""

    async def body(s: Store) -> None:
        a, b = await s.create_team("a"), await s.create_team("b")
        agent, b_agent = await s.upsert_agent(a.id, None, "box"), await s.upsert_agent(b.id, None, "bbox")
        held = await s.create_tunnel(b.id, b_agent.id, "held", "127.0.0.1", 22, "tcp", hub_port=21000,
                                     status="paused")
        with pytest.raises(ConflictError):
            await s.create_tunnel(a.id, agent.id, "same", "127.0.0.1", 22, "tcp", hub_port=21000)
        fresh = await s.create_tunnel(a.id, agent.id, "fresh", "127.0.0.1", 22, "tcp")
        assert fresh.hub_port is None
        with pytest.raises(ConflictError):
            await s.claim_hub_port(a.id, fresh.id, 21000)
        assert (await s.get_tunnel(a.id, fresh.id)).hub_port is None
        claimed = await s.claim_hub_port(a.id, fresh.id, 21001)
        assert claimed is not None and claimed.hub_port == 21001
        again = await s.claim_hub_port(a.id, fresh.id, 21002)  # claimed already: the first stays
        assert again is not None and again.hub_port == 21001
        assert await s.claim_hub_port(b.id, fresh.id, 21003) is None  # another team's tunnel
        with pytest.raises(ConflictError):
            await s.update_tunnel(a.id, fresh.id, hub_port=held.hub_port)
        with pytest.raises(StoreError):
            await s.claim_hub_port(a.id, fresh.id, 0)
        await s.delete_tunnel(b.id, held.id)  # a deleted tunnel frees its port
        other = await s.create_tunnel(a.id, agent.id, "other", "127.0.0.1", 22, "tcp")
        assert (await s.claim_hub_port(a.id, other.id, 21000)).hub_port == 21000

    with_store(store_url, body)


def test_bindings_replace_and_go_with_their_tunnel(store_url: str) -> None:
    async def body(s: Store) -> None:
        team = await s.create_team("t")
        owner = await s.upsert_agent(team.id, None, "owner")
        receiver = await s.upsert_agent(team.id, None, "receiver")
        first = await s.create_tunnel(team.id, owner.id, "one", "127.0.0.1", 1, "tcp", hub_port=30001)
        second = await s.create_tunnel(team.id, owner.id, "two", "127.0.0.1", 2, "tcp", hub_port=30002)
        await s.put_binding(team.id, first.id, receiver.id, 7001)
        await s.put_binding(team.id, second.id, receiver.id, 7002)
        await s.put_binding(team.id, first.id, receiver.id, 7003)  # one port per tunnel and agent
        got = await s.list_bindings(team.id, receiver.id)
        assert sorted((t.id, port) for t, port in got) == sorted([(first.id, 7003), (second.id, 7002)])
        assert await s.list_bindings(team.id, owner.id) == []
        assert await s.list_bindings(str(uuid.uuid4()), receiver.id) == []
        await s.delete_tunnel(team.id, first.id)
        assert [(t.id, port) for t, port in await s.list_bindings(team.id, receiver.id)] == [(second.id, 7002)]

    with_store(store_url, body, clock=_ticking())


# --------------------------------------------------------------------------- shares


def test_shares(store_url: str) -> None:
    async def body(s: Store) -> None:
        a, b = await s.create_team("a"), await s.create_team("b")
        agent = await s.upsert_agent(a.id, None, "box")
        tunnel = await s.create_tunnel(a.id, agent.id, "web", "127.0.0.1", 80, "http")
        open_share, token = await s.create_share(a.id, tunnel.id, "open")
        limited, limited_token = await s.create_share(
            a.id, tunnel.id, "limited", "for the demo", expires_at=5000.5, allowed_methods=["GET", "HEAD"],
            rate_limit=60)
        assert isinstance(token, SecretToken) and token != limited_token
        assert (open_share.expires_at, open_share.allowed_methods, open_share.rate_limit) == (None, None, None)
        assert (limited.description, limited.expires_at, limited.allowed_methods, limited.rate_limit) == (
            "for the demo", 5000.5, ("GET", "HEAD"), 60)
        assert open_share.token_prefix == token[:6] and open_share.token_hash == hash_token(token)
        with pytest.raises(NotFoundError):
            await s.create_share(b.id, tunnel.id, "stolen")
        assert await s.get_share(a.id, tunnel.id, open_share.id) == open_share
        assert await s.get_share(b.id, tunnel.id, open_share.id) is None
        assert await s.get_share(a.id, str(uuid.uuid4()), open_share.id) is None
        assert await s.list_shares(a.id, tunnel.id) == [open_share, limited]
        assert await s.list_shares(b.id, tunnel.id) == []
        assert await s.get_share_by_token(limited_token) == limited
        assert await s.get_share_by_token(_near_miss(limited_token)) is None
        assert not await s.delete_share(b.id, tunnel.id, open_share.id)
        assert await s.delete_share(a.id, tunnel.id, open_share.id)
        assert not await s.delete_share(a.id, tunnel.id, open_share.id)
        assert await s.get_share_by_token(token) is None
        await s.delete_tunnel(a.id, tunnel.id)  # shares go with their tunnel
        assert await s.get_share_by_token(limited_token) is None

    with_store(store_url, body, clock=_ticking())


# --------------------------------------------------------------------------- webhooks


def test_webhooks(store_url: str) -> None:
    async def body(s: Store) -> None:
        a, b = await s.create_team("a"), await s.create_team("b")
        both = await s.create_webhook(a.id, "https://example.com/a", ["tunnel.created", "tunnel.deleted"])
        created_only = await s.create_webhook(a.id, "http://example.com/b", ["tunnel.created"])
        assert both.secret.startswith("whsec_") and both.secret != created_only.secret
        assert both.events == ("tunnel.created", "tunnel.deleted")
        assert both.secret not in repr(both)
        with pytest.raises(NotFoundError):
            await s.create_webhook(str(uuid.uuid4()), "http://x", ["tunnel.created"])
        assert await s.get_webhook(a.id, both.id) == both
        assert await s.get_webhook(b.id, both.id) is None
        assert await s.list_webhooks(a.id) == [both, created_only]
        assert await s.list_webhooks(a.id, "tunnel.deleted") == [both]
        assert await s.list_webhooks(b.id) == []
        assert not await s.delete_webhook(b.id, both.id)
        assert await s.delete_webhook(a.id, both.id)
        assert not await s.delete_webhook(a.id, both.id)
        assert await s.list_webhooks(a.id) == [created_only]

    with_store(store_url, body, clock=_ticking())


def test_pending_webhook_deliveries(store_url: str) -> None:
    clock = Clock(100.0)

    async def body(s: Store) -> None:
        team = await s.create_team("t")
        hook = await s.create_webhook(team.id, "http://example.com/a", ["tunnel.created"])
        other = await s.create_webhook(team.id, "http://example.com/b", ["tunnel.created"])
        clock.now = 200.0
        await s.add_webhook_deliveries([("d1", hook.id, "tunnel.created", b"one"),
                                        ("d2", other.id, "tunnel.created", b"\x00two\xff"),
                                        ("gone", str(uuid.uuid4()), "tunnel.created", b"no such webhook")],
                                       keep=10)
        await s.add_webhook_deliveries([("d1", hook.id, "tunnel.created", b"again")], keep=10)  # a duplicate id
        pending = await s.pending_webhook_deliveries(10)
        assert [(h.id, e, body, d, n) for h, e, body, d, n in pending] == [
            (hook.id, "tunnel.created", b"one", "d1", 0), (other.id, "tunnel.created", b"\x00two\xff", "d2", 0)]
        assert pending[0][0] == hook  # the webhook itself, secret included, to sign with
        assert [d for _, _, _, d, _ in await s.pending_webhook_deliveries(1)] == ["d1"]
        await s.set_webhook_delivery_attempts("d1", 3)
        assert (await s.pending_webhook_deliveries(10))[0][4] == 3
        clock.now = 300.0
        # The table stays bounded: the oldest beyond ``keep`` go, same-instant ones in order.
        await s.add_webhook_deliveries([(f"n{i}", hook.id, "tunnel.created", b"x") for i in range(4)], keep=3)
        assert [d for _, _, _, d, _ in await s.pending_webhook_deliveries(10)] == ["n1", "n2", "n3"]
        await s.delete_webhook_delivery("n2")
        await s.delete_webhook_delivery("never-was")
        assert [d for _, _, _, d, _ in await s.pending_webhook_deliveries(10)] == ["n1", "n3"]
        await s.add_webhook_deliveries([("o1", other.id, "tunnel.created", b"y")], keep=10)
        await s.delete_webhook(team.id, hook.id)  # its deliveries go with it
        assert [d for _, _, _, d, _ in await s.pending_webhook_deliveries(10)] == ["o1"]
        await s.add_webhook_deliveries([], keep=10)

    with_store(store_url, body, clock=clock)


# --------------------------------------------------------------------------- services


def test_services(store_url: str) -> None:
    clock = Clock(100.0)

    async def body(s: Store) -> None:
        a, b = await s.create_team("a"), await s.create_team("b")
        spec = {"exposed_port": 8000, "health": "/health", "labels": ["gpu"]}
        made = await s.put_service(a.id, "my-llm", "deployed", spec, "created")
        assert (made.team_id, made.slug, made.service_type, made.spec, made.status) == (
            a.id, "my-llm", "deployed", spec, "created")
        assert made.created_at == made.updated_at == 100.0
        clock.now = 200.0
        replaced = await s.put_service(a.id, "my-llm", "deployed", {**spec, "exposed_port": 9000}, "running")
        assert replaced.created_at == 100.0 and replaced.updated_at == 200.0
        assert replaced.spec["exposed_port"] == 9000 and replaced.status == "running"
        clock.now = 300.0
        await s.set_service_status(a.id, "my-llm", "stopped")
        got = await s.get_service(a.id, "my-llm")
        assert (got.status, got.updated_at) == ("stopped", 300.0)
        external = await s.put_service(a.id, "ext", "external", {"url": "http://example.com"}, "created")
        theirs = await s.put_service(b.id, "my-llm", "external", {"url": "http://b"}, "created")
        assert await s.get_service(b.id, "my-llm") == theirs
        assert await s.get_service(a.id, "nope") is None
        assert [x.slug for x in await s.list_services(a.id)] == ["ext", "my-llm"]
        assert await s.list_services(a.id.upper()) == await s.list_services(a.id)
        assert len(await s.list_services(None)) == 3
        assert not await s.delete_service(b.id, "ext")
        assert await s.delete_service(a.id, "ext")
        assert not await s.delete_service(a.id, "ext")
        assert await s.get_service(a.id, external.slug) is None
        assert await s.get_service(b.id, "my-llm") == theirs
        with pytest.raises(StoreError):
            await s.put_service(a.id, "bad-type", "floating", {}, "created")

    with_store(store_url, body, clock=clock)


# --------------------------------------------------------------------------- generation


def test_generation_moves_on_every_commit_by_anyone(store_url: str) -> None:
    async def body(s: Store) -> None:
        team = await s.create_team("t")
        first = s.generation()
        assert s.generation() == first  # no commit, no change, no waiting
        await s.get_team(team.id)
        assert s.generation() == first  # reads commit nothing
        await s.create_credential(team.id, "sk")
        second = s.generation()
        assert second != first  # this store's own commit: at once
        other = await open_store(store_url, listen=False)  # another process (relay admin)
        try:
            await other.create_team("u")
        finally:
            await other.close()
        # Another connection's commit: at once (SQLite's data_version) or once its
        # notification arrived (PostgreSQL).
        for _ in range(200):
            if s.generation() != second:
                break
            await asyncio.sleep(0.01)
        assert s.generation() != second

    with_store(store_url, body)


def test_reprs_never_show_secrets(store_url: str) -> None:
    async def body(s: Store) -> None:
        team, keys = await s.create_team_with_keys("t")
        agent = await s.upsert_agent(team.id, None, "a")
        session, access, admin = await s.create_tunnel_session(team.id, agent.id)
        tunnel = await s.create_tunnel(team.id, agent.id, "w", "127.0.0.1", 80, "http")
        share, share_token = await s.create_share(team.id, tunnel.id, "s")
        cred = await s.lookup_credential(keys["sk"])
        text = repr((keys, cred, session, access, admin, share, share_token, s))
        for secret in [*keys.values(), access, admin, share_token]:
            assert str(secret) not in text
            assert secret[:6] in text  # masked, but recognisable
        for digest in (cred.token_hash, session.token_hash, session.admin_token_hash, share.token_hash):
            assert digest not in text
        assert str(keys["sk"]) == keys["sk"]  # the str itself is the plaintext, for printing

    with_store(store_url, body)


# --------------------------------------------------------------------------- tasks


def test_tasks(store_url: str) -> None:
    clock = Clock(100.0)

    async def body(s: Store) -> None:
        a, b = await s.create_team("a"), await s.create_team("b")
        first_id, second_id = str(uuid.uuid4()), str(uuid.uuid4()).upper()
        first = await s.create_task(a.id, first_id, "count", {"to": 3, "nested": [1, None]}, ["gpu", "linux"],
                                    owner="gw-1")
        assert (first.id, first.team_id, first.owner, first.kind, first.input, first.labels, first.status) == (
            first_id, a.id, "gw-1", "count", {"to": 3, "nested": [1, None]}, ("gpu", "linux"), "queued")
        assert (first.agent_id, first.result, first.error, first.finished_at) == (None, None, None, None)
        assert (first.created_at, first.updated_at) == (100.0, 100.0)
        clock.now = 110.0
        second = await s.create_task(a.id, second_id, "echo", None, [])
        assert second.id == normalize_uuid(second_id) and second.input is None and second.owner == ""
        assert [t.id for t in await s.list_tasks(None, owner="gw-1")] == [first.id]
        with pytest.raises(NotFoundError):
            await s.create_task(str(uuid.uuid4()), str(uuid.uuid4()), "echo", {}, [])
        with pytest.raises(StoreError):
            await s.create_task(a.id, "not-a-uuid", "echo", {}, [])
        assert await s.get_task(a.id, first_id) == first
        assert await s.get_task(b.id, first_id) is None  # another team's
        assert [t.id for t in await s.list_tasks(a.id)] == [first.id, second.id]
        assert await s.list_tasks(b.id) == []
        clock.now = 120.0
        agent = str(uuid.uuid4())
        assert await s.update_task(a.id, first_id, status="dispatched", agent_id=agent)
        assert not await s.update_task(b.id, first_id, status="failed")  # another team's
        clock.now = 130.0
        assert await s.update_task(a.id, first_id, status="succeeded", result={"counted": [1, 2, 3]},
                                   finished_at=130.0)
        done = await s.get_task(a.id, first_id)
        assert (done.status, done.agent_id, done.result, done.finished_at, done.updated_at) == (
            "succeeded", agent, {"counted": [1, 2, 3]}, 130.0, 130.0)
        assert await s.update_task(a.id, second_id, status="failed", error="agent disconnected", finished_at=131.0)
        assert (await s.get_task(a.id, second_id)).error == "agent disconnected"
        for bad in ({}, {"kind": "x"}, {"status": "lost"}):
            with pytest.raises(StoreError):
                await s.update_task(a.id, first_id, **bad)
        third = await s.create_task(b.id, str(uuid.uuid4()), "sleep", {"seconds": 1}, [])
        assert [t.id for t in await s.list_tasks(None, ["queued"])] == [third.id]
        assert [t.id for t in await s.list_tasks(a.id, ["succeeded", "failed"])] == [first.id, second.id]
        assert await s.list_tasks(None, ["nonsense"]) == []
        assert await s.delete_finished_tasks(130.5) == 1  # the first finished at 130.0
        assert await s.get_task(a.id, first_id) is None
        assert [t.id for t in await s.list_tasks(None)] == [second.id, third.id]

    with_store(store_url, body, clock=clock)
