"""The fleet's lease rules (relay.gateway.fleet.leases) against a real redis-server:
an agent's sessions on several gateways at once, the floor that makes a replaced agent
process's sessions stale everywhere, and a stale gateway that can neither overwrite
another gateway's lease nor bring its own back.

The scripts are called as the gateways call them (LeaseStore), each "gateway" being a
LeaseStore with its own id on one Redis; the events they publish are read back. Last,
two in-process gateways of one fleet: a gateway whose session of an agent ended while
the agent goes on at another does not close the agent's tunnels as if it were gone.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis.asyncio as redis_asyncio

from relay.gateway.fleet.leases import CHANNEL, Lease, LeaseStore
from tests.support.servers import start_redis

pytestmark = pytest.mark.timeout(60)

TEAM = "team-1"


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with start_redis(tmp_path_factory.mktemp("leases-redis")) as server:
        yield f"redis://127.0.0.1:{server.port}/0"


def run(redis_url: str, body: Any, agent_ttl: float = 15.0) -> Any:
    async def main() -> Any:
        client = redis_asyncio.from_url(redis_url)
        try:
            stores = {g: LeaseStore(client, g, agent_ttl=agent_ttl, gateway_ttl=6.0) for g in ("g1", "g2", "g3")}
            return await body(client, stores, "agent-" + uuid.uuid4().hex[:8])
        finally:
            await client.aclose()

    return asyncio.run(main())


async def fields(client: Any, agent: str) -> dict[str, int]:
    raw = await client.hgetall(f"relay:agent:{agent}")
    return {k.decode(): int(v.decode().split("|")[0]) for k, v in raw.items()}


def test_one_process_holds_sessions_on_two_gateways(redis_url: str) -> None:
    async def body(client: Any, stores: dict[str, LeaseStore], agent: str) -> None:
        pubsub = client.pubsub()
        await pubsub.subscribe(CHANNEL)
        e1, f1 = await stores["g1"].claim(agent, TEAM, "proc-a", 0)
        e2, f2 = await stores["g2"].claim(agent, TEAM, "proc-a", 1)
        assert e2 > e1 and f1 == f2 == e1  # the second connection does not raise the floor
        assert await fields(client, agent) == {"g1": e1, "g2": e2}
        leases = [Lease(agent, TEAM, e1, "proc-a", 0)], [Lease(agent, TEAM, e2, "proc-a", 1)]
        assert await stores["g1"].renew(leases[0]) == [True]
        assert await stores["g2"].renew(leases[1]) == [True]
        holders = await stores["g3"].locate(agent)
        assert holders is not None and set(holders.sessions) == {"g1", "g2"} and holders.floor == e1
        assert set((await stores["g3"].locations())[agent].sessions) == {"g1", "g2"}
        # g1's session ends: only its own field goes; a release with a stale epoch does nothing.
        assert not await stores["g1"].release(Lease(agent, TEAM, e1 - 1, "proc-a", 0))
        assert await stores["g1"].release(leases[0][0])
        assert await fields(client, agent) == {"g2": e2}
        events = []
        for _ in range(20):
            message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=0.5)
            if message is not None:
                events.append(json.loads(message["data"]))
            if any(e["t"] == "gone" for e in events):
                break
        assert [(e["t"], e["g"]) for e in events] == [("at", "g1"), ("at", "g2"), ("gone", "g1")]
        assert events[1]["f"] == e1
        await pubsub.aclose()

    run(redis_url, body)


def test_a_new_process_makes_every_older_session_stale_and_a_stale_gateway_never_writes(redis_url: str) -> None:
    async def body(client: Any, stores: dict[str, LeaseStore], agent: str) -> None:
        e1, _ = await stores["g1"].claim(agent, TEAM, "proc-a", 0)
        e2, _ = await stores["g2"].claim(agent, TEAM, "proc-a", 1)
        # The agent process is replaced (a restart): its new session at g3 raises the floor.
        e3, floor = await stores["g3"].claim(agent, TEAM, "proc-b", 0)
        assert floor == e3 > e2
        assert await fields(client, agent) == {"g3": e3}  # the older sessions' fields are gone
        # g1 and g2 wake up late (frozen, cut off): their renewals lose and write nothing.
        for _ in range(3):
            assert await stores["g1"].renew([Lease(agent, TEAM, e1, "proc-a", 0)]) == [False]
            assert await stores["g2"].renew([Lease(agent, TEAM, e2, "proc-a", 1)]) == [False]
            assert await fields(client, agent) == {"g3": e3}
        # ... nor does a late release remove anything of the new process.
        assert not await stores["g1"].release(Lease(agent, TEAM, e1, "proc-a", 0))
        # The new process's second connection, on g1 now, is valid beside g3.
        e4, floor4 = await stores["g1"].claim(agent, TEAM, "proc-b", 1)
        assert floor4 == e3
        assert await fields(client, agent) == {"g3": e3, "g1": e4}
        # An agent that sends no instance id is a new process every time (one session).
        e5, floor5 = await stores["g2"].claim(agent, TEAM, "", 0)
        assert floor5 == e5 and await fields(client, agent) == {"g2": e5}

    run(redis_url, body)


def test_a_connection_that_reconnects_elsewhere_supersedes_its_old_session(redis_url: str) -> None:
    """The same process, the same connection, through another gateway (its old gateway
    is cut off and still believes in the session): the old session is stale at once,
    the agent's other connection is not touched."""

    async def body(client: Any, stores: dict[str, LeaseStore], agent: str) -> None:
        e1, _ = await stores["g1"].claim(agent, TEAM, "proc-a", 0)
        e2, _ = await stores["g2"].claim(agent, TEAM, "proc-a", 1)
        e3, floor = await stores["g3"].claim(agent, TEAM, "proc-a", 0)  # connection 0 moved g1 -> g3
        assert floor == e1
        assert await fields(client, agent) == {"g2": e2, "g3": e3}
        assert await stores["g1"].renew([Lease(agent, TEAM, e1, "proc-a", 0)]) == [False]
        assert await stores["g2"].renew([Lease(agent, TEAM, e2, "proc-a", 1)]) == [True]
        assert await stores["g3"].renew([Lease(agent, TEAM, e3, "proc-a", 0)]) == [True]
        assert await fields(client, agent) == {"g2": e2, "g3": e3}

    run(redis_url, body)


def test_expired_fields_are_dropped_and_a_lost_redis_is_rebuilt_by_renewals(redis_url: str) -> None:
    async def body(client: Any, stores: dict[str, LeaseStore], agent: str) -> None:
        e1, _ = await stores["g1"].claim(agent, TEAM, "proc-a", 0)
        e2, _ = await stores["g2"].claim(agent, TEAM, "proc-a", 1)
        await asyncio.sleep(0.4)  # g1 dies without releasing; its deadline passes
        assert await stores["g2"].renew([Lease(agent, TEAM, e2, "proc-a", 1)]) == [True]
        assert await fields(client, agent) == {"g2": e2}
        holders = await stores["g3"].locate(agent)
        assert holders is not None and set(holders.sessions) == {"g2"}
        # Redis loses everything: the holders' renewals restore their leases and the
        # counter, so the next session's epoch is still above theirs.
        await client.flushdb()
        assert await stores["g2"].renew([Lease(agent, TEAM, e2, "proc-a", 1)]) == [True]
        assert await fields(client, agent) == {"g2": e2}
        e3, _ = await stores["g3"].claim(agent, TEAM, "proc-a", 2)
        assert e3 > e2 and await fields(client, agent) == {"g2": e2, "g3": e3}
        assert e1 < e2

    run(redis_url, body, agent_ttl=0.3)


def test_a_gateway_keeps_the_tunnels_of_an_agent_that_moved_to_another_gateway(redis_url: str, tmp_path) -> None:
    """An agent's session at g1 ends while g1 lives (a network blip): the agent goes on at
    g2. Past g1's ``agent_gone_grace`` the agent's tunnel is not closed (the agent is not
    gone: the fleet holds it), and its hub port at g1 still reaches it, through g2."""
    from relay.agent import Agent
    from relay.gateway.app import Gateway
    from relay.gateway.fleet import FleetConfig
    from relay.gateway.store import open_store
    from relay.mux.errors import ErrorCode
    from tests.gateway.test_gateway_e2e import gateway_and_team, http, wait_until
    from tests.gateway.test_gateway_e2e import run as run_bounded

    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        writer.close()

    async def echoed(port: int, payload: bytes) -> bytes:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(payload)
        try:
            async with asyncio.timeout(5):
                return await reader.readexactly(len(payload))
        except (asyncio.IncompleteReadError, ConnectionError):
            return b""
        finally:
            writer.close()

    def fleet(gateway_id: str) -> FleetConfig:
        return FleetConfig(redis_url, "in-process-secret", gateway_id=gateway_id + uuid.uuid4().hex[:6])

    async def main() -> None:
        server = await asyncio.start_server(echo, "127.0.0.1", 0)
        echo_port = server.sockets[0].getsockname()[1]
        async with gateway_and_team(tmp_path, fleet=fleet("g1"), agent_gone_grace=0.3) as (gw1, keys):
            store2 = await open_store(None, tmp_path / "data")
            gw2 = Gateway(store2, fleet=fleet("g2"), agent_gone_grace=0.3, allow_private_egress=True)
            await gw2.start("127.0.0.1", 0)
            agent = Agent(gw1.url, keys["ak"], name="mover", more_gateways=[gw2.url], connections=1,
                          allow=[f"127.0.0.1:{echo_port}"])
            task = asyncio.get_running_loop().create_task(agent.run())
            try:
                await wait_until(lambda: agent.agent_id is not None and gw1.registry.is_online(agent.agent_id))
                agent_id = agent.agent_id
                status, tunnel = await http(gw1.port, "POST", f"/api/v1/agents/{agent_id}/tunnel", keys["sk"],
                                            {"target_port": echo_port, "tunnel_protocol": "tcp"})
                assert status == 200, tunnel
                hub = tunnel["hub_port"]
                assert await echoed(hub, b"before") == b"before"
                entry = gw1.registry.local_any(agent_id)
                assert entry is not None
                gw1.registry.expel(entry, ErrorCode.GOING_AWAY, "a network blip")
                await wait_until(lambda: gw2.registry.is_online(agent_id))
                await wait_until(lambda: gw1.registry.get(entry.team_id, agent_id) is not None)  # via the fleet
                await asyncio.sleep(1.0)  # past g1's grace
                assert not gw1.registry.is_online(agent_id)
                status, listed = await http(gw1.port, "GET", f"/api/v1/agents/{agent_id}", keys["sk"])
                assert status == 200 and listed["online"]
                await wait_until(lambda: echoed(hub, b"after"))
                assert await echoed(hub, b"after") == b"after"
            finally:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
                await gw2.close()
                await store2.close()
        server.close()

    run_bounded(main)
