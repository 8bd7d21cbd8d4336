"""Webhooks: the API, and deliveries to a real local HTTP receiver (asyncio + h11) that
verifies the HMAC signature, answers 500 first to force a retry, or never answers at all
(the API must not wait for it)."""
from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import time
import uuid
from typing import Any, Optional

import h11
import pytest

from relay.gateway.api.webhooks import WebhookDispatcher, post_json, sign
from relay.gateway.store import Webhook
from tests.gateway.test_gateway_e2e import gateway_and_team, run, running_agent, wait_until
from tests.tunnels.test_tunnels_api import api, create

pytestmark = pytest.mark.timeout(120)


class Receiver:
    """A webhook receiver on 127.0.0.1. Answers each request with the next of
    ``statuses`` (the last one repeats); with ``blackhole`` it reads the request and
    never answers."""

    def __init__(self, statuses: tuple[int, ...] = (200,), blackhole: bool = False,
                 path: bytes = b"/hooks/relay?src=test") -> None:
        self.path = path
        self.statuses = list(statuses)
        self.blackhole = blackhole
        #: (headers with lower-case names, raw body, arrival time) per request.
        self.requests: list[tuple[dict[str, str], bytes, float]] = []
        self.port = 0
        self._server: Optional[asyncio.AbstractServer] = None
        self._writers: list[asyncio.StreamWriter] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hooks/relay?src=test"

    async def __aenter__(self) -> "Receiver":
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for writer in self._writers:
            writer.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.append(writer)
        conn = h11.Connection(h11.SERVER)
        headers: dict[str, str] = {}
        body = b""
        target = b""
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                data = await reader.read(65536)
                if not data:
                    return
                conn.receive_data(data)
            elif isinstance(event, h11.Request):
                headers = {k.decode().lower(): v.decode() for k, v in event.headers}
                target = event.target
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                break
        if target != self.path:
            raise ConnectionError("unexpected webhook target")  # (the target is not shown)
        self.requests.append((headers, body, time.monotonic()))
        if self.blackhole:
            await asyncio.sleep(3600)
        status = self.statuses.pop(0) if len(self.statuses) > 1 else self.statuses[0]
        if status == 204:  # no body allowed
            out = conn.send(h11.Response(status_code=status, headers=[]))
        else:
            out = conn.send(h11.Response(status_code=status, headers=[("Content-Length", "2")]))
            out += conn.send(h11.Data(data=b"ok"))
        writer.write(out + conn.send(h11.EndOfMessage()))
        await writer.drain()
        writer.close()


def verify(secret: str, headers: dict[str, str], body: bytes) -> dict[str, Any]:
    """What a receiver does: check the signature over the timestamp and the raw body
    (``TIMESTAMP.BODY``), then parse it."""
    signed = headers["x-relay-timestamp"].encode() + b"." + body
    expected = "sha256=" + hmac.new(secret.encode(), signed, hashlib.sha256).hexdigest()
    assert hmac.compare_digest(headers["x-relay-signature"], expected)
    assert abs(int(headers["x-relay-timestamp"]) - time.time()) < 60
    assert headers["content-type"] == "application/json"
    payload = json.loads(body)
    assert headers["x-relay-event"] == payload["event"]
    assert headers["x-relay-delivery"] == payload["id"]
    return payload


# ----------------------------------------------------------------------------- API


def test_webhooks_api_and_validation(tmp_path):
    async def main():
        async with gateway_and_team(tmp_path) as (gw, keys):
            _, other = await gw.store.create_team_with_keys("team-b")
            sk = keys["sk"]
            status, _, hook = await api(gw, "POST", "/api/v1/webhooks", sk,
                                        {"url": "https://hooks.example.com/relay", "events": ["tunnel.deleted"]})
            assert status == 201
            assert hook["events"] == ["tunnel.deleted"] and hook["secret"].startswith("whsec_")
            assert len(hook["secret"]) > 40
            status, _, both = await api(gw, "POST", "/api/v1/webhooks", sk, {"url": "http://127.0.0.1:9/x"})
            assert status == 201 and both["events"] == ["tunnel.created", "tunnel.deleted"]
            status, _, listed = await api(gw, "GET", "/api/v1/webhooks", sk)
            assert [h["id"] for h in listed["webhooks"]] == [hook["id"], both["id"]]
            assert all("secret" not in h for h in listed["webhooks"])  # returned once only
            status, _, got = await api(gw, "GET", f"/api/v1/webhooks/{hook['id']}", sk)
            assert status == 200 and got["url"] == "https://hooks.example.com/relay" and "secret" not in got

            for body, code in [({}, "invalid_url"), ({"url": "ftp://x/"}, "invalid_url"),
                               ({"url": "http://"}, "invalid_url"), ({"url": "http://h:99999/"}, "invalid_url"),
                               ({"url": 5}, "invalid_url"), ({"url": "http://h/a b"}, "invalid_url"),
                               ({"url": "http://h/\u00e9"}, "invalid_url"), ({"url": "http://h/" + "a" * 3000}, "invalid_url"),
                               ({"url": "http://h/", "events": []}, "invalid_events"),
                               ({"url": "http://h/", "events": ["tunnel.updated"]}, "invalid_events"),
                               ({"url": "http://h/", "events": "tunnel.created"}, "invalid_events"),
                               ({"url": "http://h/", "secret": "mine"}, "unknown_field"),
                               ([], "invalid_request")]:
                status, _, answer = await api(gw, "POST", "/api/v1/webhooks", sk, body)
                assert status == 400 and answer["error"]["code"] == code, body
                if code in ("invalid_url", "invalid_events"):  # the message names the field
                    assert answer["error"]["message"].startswith(code.removeprefix("invalid_") + ":")

            # Team scoping and management rights.
            assert (await api(gw, "GET", f"/api/v1/webhooks/{hook['id']}", other["sk"]))[0] == 404
            assert (await api(gw, "DELETE", f"/api/v1/webhooks/{hook['id']}", other["sk"]))[0] == 404
            assert (await api(gw, "GET", "/api/v1/webhooks", other["sk"]))[2] == {"webhooks": []}
            assert (await api(gw, "DELETE", f"/api/v1/webhooks/{hook['id']}", keys["dk"]))[0] == 403
            assert (await api(gw, "GET", f"/api/v1/webhooks/{hook['id']}", keys["dk"]))[0] == 403
            assert (await api(gw, "DELETE", f"/api/v1/webhooks/{hook['id']}", sk))[0] == 204
            assert (await api(gw, "DELETE", f"/api/v1/webhooks/{hook['id']}", sk))[0] == 404
            assert (await api(gw, "GET", f"/api/v1/webhooks/{uuid.uuid4()}", sk))[0] == 404

    run(main)


# ----------------------------------------------------------------------------- delivery


def test_signed_delivery_on_create_and_delete_with_a_retry_after_500(tmp_path):
    async def main():
        async with gateway_and_team(tmp_path) as (gw, keys), Receiver(statuses=(500, 204)) as receiver:
            gw.tunnels_api.webhooks.backoff = 0.05
            sk = keys["sk"]
            status, _, hook = await api(gw, "POST", "/api/v1/webhooks", sk, {"url": receiver.url})
            assert status == 201
            # A hook of another team and one for deletions only must not get tunnel.created.
            _, other = await gw.store.create_team_with_keys("team-b")
            async with Receiver() as bystander:
                await api(gw, "POST", "/api/v1/webhooks", other["sk"], {"url": bystander.url})
                async with running_agent(gw, keys["ak"], name="box") as agent:
                    tunnel = await create(gw, sk, target="127.0.0.1:8188", agent_id=agent.agent_id, name="web")
                    await wait_until(lambda: len(receiver.requests) >= 2)
                    first, second = receiver.requests[:2]
                    # The 500 was retried: same delivery, same body, after the backoff.
                    assert first[1] == second[1]
                    assert first[0]["x-relay-delivery"] == second[0]["x-relay-delivery"]
                    assert second[2] - first[2] >= 0.04
                    payload = verify(hook["secret"], second[0], second[1])
                    assert payload["event"] == "tunnel.created"
                    assert payload["data"]["id"] == tunnel["id"] and payload["data"]["name"] == "web"
                    assert payload["team_id"] == (await gw.store.list_teams())[0].id

                    assert (await api(gw, "DELETE", f"/api/v1/tunnels/{tunnel['id']}", sk))[0] == 204
                    await wait_until(lambda: len(receiver.requests) >= 3)
                    payload = verify(hook["secret"], receiver.requests[2][0], receiver.requests[2][1])
                    assert payload["event"] == "tunnel.deleted" and payload["data"]["id"] == tunnel["id"]
                    assert payload["data"]["status"] == "deleted"
                    # A wrong secret does not verify.
                    with pytest.raises(AssertionError):
                        verify("whsec_wrong", receiver.requests[2][0], receiver.requests[2][1])
                await asyncio.sleep(0.2)
                assert bystander.requests == []
                assert len(receiver.requests) == 3
                assert gw.tunnels_api.webhooks.delivered == 2

    run(main)


def test_a_blackholed_receiver_does_not_slow_the_api(tmp_path):
    async def main():
        async with gateway_and_team(tmp_path) as (gw, keys), Receiver(blackhole=True) as hole:
            dispatcher = gw.tunnels_api.webhooks
            dispatcher.timeout = 3.0
            dispatcher.attempts = 2
            dispatcher.backoff = 0.05
            sk = keys["sk"]
            for _ in range(3):
                await api(gw, "POST", "/api/v1/webhooks", sk, {"url": hole.url})
            async with running_agent(gw, keys["ak"], name="box") as agent:
                started = time.monotonic()
                tunnels = [await create(gw, sk, target="127.0.0.1:8188", agent_id=agent.agent_id)
                           for _ in range(3)]
                for tunnel in tunnels:
                    assert (await api(gw, "DELETE", f"/api/v1/tunnels/{tunnel['id']}", sk))[0] == 204
                elapsed = time.monotonic() - started
                # Six API calls, each of which queued three deliveries to a receiver that
                # never answers: together they took less than one delivery's timeout.
                assert elapsed < dispatcher.timeout, elapsed
                await wait_until(lambda: len(hole.requests) >= 8)  # delivering meanwhile (8 slots)
                assert dispatcher.delivered == 0
                # The attempts give up after their timeouts; failures are counted, not raised.
                await wait_until(lambda: dispatcher.failed >= 8, timeout=30)

    run(main)


def test_dispatcher_queue_is_bounded_dropping_the_oldest():
    async def main():
        dispatcher = WebhookDispatcher(queue_limit=3, timeout=0.5, attempts=1)
        hook = Webhook(id="h", team_id="t", url="http://127.0.0.1:9/", events=("tunnel.created",),
                       created_at=0.0, secret="s")
        for i in range(10):
            await dispatcher.publish([hook], "tunnel.created", "t", {"n": i})
        assert dispatcher.dropped == 7 and dispatcher.pending == 3
        queued = [json.loads(d.body)["data"]["n"] for d in dispatcher._queue]
        assert queued == [7, 8, 9]  # the newest survive
        await dispatcher.close()
        assert dispatcher.pending == 0

    run(main)


def test_post_json_and_sign():
    async def main():
        async with Receiver(statuses=(201, 503)) as receiver:
            body = b'{"k": 1}'
            assert await post_json(receiver.url, body, {"X-Test": "1"}) == 201
            assert await post_json(receiver.url, body, {}) == 503
            headers, got, _ = receiver.requests[0]
            assert got == body and headers["x-test"] == "1" and headers["host"] == f"127.0.0.1:{receiver.port}"
        # Nothing listening: an OSError, quickly.
        with pytest.raises(OSError):
            await post_json(f"http://127.0.0.1:{receiver.port}/hooks/relay?src=test", b"{}", {}, timeout=2)
        async with Receiver(blackhole=True) as hole:
            started = time.monotonic()
            with pytest.raises(TimeoutError):
                await post_json(hole.url, b"{}", {}, timeout=0.3)
            assert time.monotonic() - started < 2

    run(main)
    assert sign("key", "1700000000", b"body") == \
        "sha256=" + hmac.new(b"key", b"1700000000.body", hashlib.sha256).hexdigest()


# ----------------------------------------------------------------------------- issue 12 (9b, 9h)


def test_the_signature_covers_the_timestamp_so_a_delivery_cannot_be_replayed(tmp_path):
    """A real delivery to a real receiver: its signature verifies over ``TIMESTAMP.BODY``
    and not over the body alone; the same body and signature with another timestamp (a
    replay made to look fresh) fail the documented check (relay.gateway.api.webhooks.verify),
    and so does a stale timestamp with its own valid signature."""
    from relay.gateway.api.webhooks import verify as receiver_verify

    async def main():
        async with gateway_and_team(tmp_path) as (gw, keys), Receiver() as receiver:
            sk = keys["sk"]
            status, _, hook = await api(gw, "POST", "/api/v1/webhooks", sk, {"url": receiver.url})
            assert status == 201
            async with running_agent(gw, keys["ak"], name="box") as agent:
                await create(gw, sk, target="127.0.0.1:8188", agent_id=agent.agent_id)
                await wait_until(lambda: len(receiver.requests) >= 1)
            headers, body, _ = receiver.requests[0]
            secret, stamp, signature = hook["secret"], headers["x-relay-timestamp"], headers["x-relay-signature"]
            assert receiver_verify(secret, stamp, body, signature)
            verify(secret, headers, body)
            body_only = "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
            assert signature != body_only, "the signature does not cover the timestamp"
            later = str(int(stamp) + 3600)
            assert not receiver_verify(secret, later, body, signature, now=int(stamp) + 3600)
            with pytest.raises(AssertionError):
                verify(secret, {**headers, "x-relay-timestamp": later}, body)
            # Validly signed but old: refused by the tolerance.
            assert not receiver_verify(secret, stamp, body, signature, now=int(stamp) + 3600)
            assert not receiver_verify("whsec_wrong", stamp, body, signature)

    run(main)


def test_webhook_urls_are_logged_without_path_query_or_userinfo(tmp_path, caplog):
    """Slack/Discord-style URLs carry their secret in the path: a failing webhook is
    retried and finally given up, and no log record at any level (DEBUG included) shows
    the path, the query or the userinfo; the host and port are shown."""
    caplog.set_level(logging.DEBUG)
    secret_path = "/services/T0SECRET/B0SECRET/XyZsEcReTtOkEn"

    async def main():
        async with gateway_and_team(tmp_path) as (gw, keys), \
                Receiver(statuses=(500,), path=f"{secret_path}?token=QUERYSECRET".encode()) as receiver:
            dispatcher = gw.tunnels_api.webhooks
            dispatcher.backoff, dispatcher.attempts = 0.02, 3
            url = f"http://user:pa55word@127.0.0.1:{receiver.port}{secret_path}?token=QUERYSECRET"
            status, _, _ = await api(gw, "POST", "/api/v1/webhooks", keys["sk"], {"url": url})
            assert status == 201
            async with running_agent(gw, keys["ak"], name="box") as agent:
                await create(gw, keys["sk"], target="127.0.0.1:8188", agent_id=agent.agent_id)
                await wait_until(lambda: dispatcher.failed >= 1, timeout=20)

    run(main)
    text = "\n".join(record.getMessage() for record in caplog.records)
    assert "retrying" in text and "failed after 3 attempts" in text
    for secret in ("T0SECRET", "XyZsEcReTtOkEn", "QUERYSECRET", "pa55word", "user:"):
        assert secret not in text, f"{secret} was logged"
    assert "http://127.0.0.1:" in text
