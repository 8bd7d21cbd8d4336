"""Webhook deliveries pending at shutdown survive a restart (issue 5): they are rows of the
store's ``webhook_deliveries`` table, resumed at start, bounded, and gone once delivered
or when their webhook is deleted.

Real gateways (one after the other on the same data directory), a real agent, and the
h11 receiver of tests/gateway/test_webhooks.py on 127.0.0.1.
"""
from __future__ import annotations

import asyncio
import time

import pytest

from relay.gateway.api.webhooks import WebhookDispatcher
from relay.gateway.egress import EgressPolicy
from relay.gateway.store import Store, open_store
from tests.gateway.test_gateway_e2e import gateway_and_team, run, running_agent, wait_until
from tests.gateway.test_webhooks import Receiver, verify
from tests.tunnels.test_tunnels_api import api, create

pytestmark = pytest.mark.timeout(120)


async def _equal(value, expected) -> bool:
    return await value == expected


def test_pending_delivery_resumed_after_a_restart(tmp_path, store_url):
    async def main():
        async with Receiver(statuses=(503,)) as receiver:
            async with gateway_and_team(tmp_path, store_url) as (gw, keys):
                dispatcher = gw.tunnels_api.webhooks
                dispatcher.backoff = 60.0  # the retry would come long after the shutdown
                status, _, hook = await api(gw, "POST", "/api/v1/webhooks", keys["sk"], {"url": receiver.url})
                assert status == 201
                async with running_agent(gw, keys["ak"], name="box") as agent:
                    started = time.monotonic()
                    tunnel = await create(gw, keys["sk"], target="127.0.0.1:8188", agent_id=agent.agent_id,
                                          name="web")
                    assert time.monotonic() - started < 5  # the API did not wait for the receiver
                await wait_until(lambda: len(receiver.requests) == 1)
                first_headers, first_body, _ = receiver.requests[0]
                async def attempts() -> list[int]:
                    return [d[4] for d in await gw.store.pending_webhook_deliveries(10)]

                await wait_until(lambda: _equal(attempts(), [1]))
            # The gateway stopped with the delivery pending (one attempt made).
            store = await open_store(store_url)
            try:
                (pending,) = await store.pending_webhook_deliveries(10)
                assert pending[1] == "tunnel.created" and pending[3] == first_headers["x-relay-delivery"]
            finally:
                await store.close()
            receiver.statuses = [200]
            async with gateway_and_team(tmp_path, store_url) as (gw2, _):
                # Resumed at start: the same delivery (id, body, signature), now accepted.
                await wait_until(lambda: len(receiver.requests) == 2)
                headers, body, _ = receiver.requests[1]
                assert body == first_body and headers["x-relay-delivery"] == first_headers["x-relay-delivery"]
                payload = verify(hook["secret"], headers, body)
                assert payload["event"] == "tunnel.created" and payload["data"]["id"] == tunnel["id"]
                await wait_until(lambda: gw2.tunnels_api.webhooks.delivered == 1)
                assert await gw2.store.pending_webhook_deliveries(10) == []
            async with gateway_and_team(tmp_path, store_url) as (gw3, _):  # nothing left to resume
                await asyncio.sleep(0.3)
                assert len(receiver.requests) == 2 and gw3.tunnels_api.webhooks.pending == 0

    run(main)


def test_pending_rows_bounded_and_dropped_with_their_webhook(tmp_path):
    async def main():
        async with Receiver(blackhole=True) as hole:
            store = Store.open(tmp_path / "data")
            try:
                team, _ = await store.create_team_with_keys("t")
                hook = await store.create_webhook(team.id, hole.url, ["tunnel.created"])
                other = await store.create_webhook(team.id, hole.url, ["tunnel.created"])
                dispatcher = WebhookDispatcher(store=store, queue_limit=3, concurrency=1, timeout=30.0,
                                               egress=EgressPolicy(allow_private=True))  # a 127.0.0.1 receiver
                try:
                    for i in range(10):
                        await dispatcher.publish([hook], "tunnel.created", team.id, {"n": i})
                    # One in flight (black-holed) at most, three queued: never more rows
                    # than the queue and the in-flight slots hold.
                    await wait_until(lambda: len(hole.requests) == 1)
                    rows = await store.pending_webhook_deliveries(100)
                    assert 3 <= len(rows) <= 4 and dispatcher.dropped >= 6
                    assert b'"n": 9' in rows[-1][2]  # the newest are kept
                    await dispatcher.publish([other], "tunnel.created", team.id, {"n": "other"})
                    assert any(r[0].id == other.id for r in await store.pending_webhook_deliveries(100))
                    # Deleting a webhook deletes its pending deliveries.
                    assert await store.delete_webhook(team.id, hook.id)
                    assert [r[0].id for r in await store.pending_webhook_deliveries(100)] == [other.id]
                finally:
                    await dispatcher.close()
                # Closing keeps what is pending for the next start.
                assert [r[0].id for r in await store.pending_webhook_deliveries(100)] == [other.id]
                resumed = WebhookDispatcher(store=store, timeout=30.0)
                try:
                    assert await resumed.resume() == 1 and resumed.pending == 1
                finally:
                    await resumed.close()
            finally:
                await store.close()

    run(main)
