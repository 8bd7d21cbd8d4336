"""Webhooks: tell a team's HTTP endpoints when its tunnels are created or deleted.

Delivery, as a receiver sees it: ``POST`` to the registered URL with a JSON body

    {"id": DELIVERY_UUID, "event": "tunnel.created", "created_at": "...Z",
     "team_id": ..., "data": {... the tunnel as the API shows it ...}}

and the headers ``X-Relay-Event``, ``X-Relay-Delivery`` (the same id on every retry of
one delivery, so a receiver can drop duplicates), ``X-Relay-Timestamp`` (Unix seconds of
this attempt) and ``X-Relay-Signature: sha256=<hex HMAC-SHA256, keyed with the webhook's
secret, of TIMESTAMP + "." + the raw body>`` (as Stripe signs). The timestamp is signed
so that a recorded delivery cannot be replayed later with a fresh timestamp. Receivers:

1. rebuild ``X-Relay-Timestamp`` + ``"."`` + the exact body bytes received, compute the
   HMAC and compare it with the header in constant time (``hmac.compare_digest``);
2. refuse a timestamp more than a few minutes (we suggest :data:`TOLERANCE`, 5 min)
   away from their clock;
3. only then parse the body, and drop ``X-Relay-Delivery`` ids already seen.

Deliveries go through the gateway's egress policy (:mod:`relay.gateway.egress`): a URL
with a literal forbidden address is refused at registration (400 ``egress_not_allowed``),
and every attempt checks the addresses the name resolves to (a refused one is a failed
attempt). Logs name a webhook by ``scheme://host[:port]`` only
(:func:`~relay.gateway.egress.redact_url`): the path and query of a Slack or Discord
webhook URL are its secret.

Any 2xx answer is success. Anything else (another status, a refused or reset connection,
no answer within :data:`TIMEOUT`) is retried after 0.5 s, 1 s, 2 s, 4 s: at most
:data:`ATTEMPTS` attempts, then the delivery is logged as failed and dropped.

Never blocking the API: :meth:`WebhookDispatcher.publish` only appends to a bounded
in-memory queue (when full the oldest pending delivery is dropped, and logged) and
records the new deliveries in the store (one small SQLite transaction; no network). A
background task takes deliveries off the queue and runs up to :data:`CONCURRENCY` at a
time, so one slow or black-holed receiver delays nobody else for longer than its
timeouts.

Surviving a restart: every delivery not finished yet is a row of the store's
``webhook_deliveries`` table (with the attempts already made), deleted once it is
delivered, fails for good or is dropped; the table is bounded like the queue (the oldest
rows go first). At start, :meth:`WebhookDispatcher.resume` queues what a previous run
left (shutdown, crash), oldest first, with its remaining attempts. An attempt cut short
by the shutdown is made again, so a receiver may see one delivery id twice: that is what
``X-Relay-Delivery`` is for.

The HTTP client is a few lines over h11 (already a dependency of the server) on asyncio
streams, with one deadline around each whole attempt.
"""
from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import ssl
import time
import uuid
from collections import deque
from dataclasses import dataclass
from typing import Any, Optional
from urllib.parse import urlsplit

import h11

from relay import __version__
from relay.gateway.egress import EgressPolicy, redact_url
from relay.gateway.http.server import HttpError
from relay.gateway.store import Store, Webhook

__all__ = ["EVENTS", "WebhookDispatcher", "parse_webhook_request", "post_json", "sign", "verify"]

log = logging.getLogger("relay.gateway.api.webhooks")

#: Events a webhook can subscribe to.
EVENTS: tuple[str, ...] = ("tunnel.created", "tunnel.deleted")
#: Seconds one delivery attempt (connect, send, read the answer) may take.
TIMEOUT = 5.0
#: Attempts per delivery, and the delay before the first retry (doubling after each).
ATTEMPTS = 5
BACKOFF = 0.5
#: Deliveries waiting at most; beyond it the oldest is dropped.
QUEUE_LIMIT = 1000
#: Deliveries in flight at once.
CONCURRENCY = 8
#: The largest response body read from a receiver (the rest is not read).
MAX_RESPONSE = 64 * 1024
MAX_URL = 2048


#: How far from now a receiver should accept ``X-Relay-Timestamp`` (seconds).
TOLERANCE = 300


def sign(secret: str, timestamp: str, body: bytes) -> str:
    """The ``X-Relay-Signature`` value: ``sha256=`` + hex HMAC-SHA256 of
    ``timestamp.body`` (the ``X-Relay-Timestamp`` value, a dot, the raw body)."""
    message = timestamp.encode("ascii") + b"." + body
    return "sha256=" + hmac.new(secret.encode(), message, hashlib.sha256).hexdigest()


def verify(secret: str, timestamp: str, body: bytes, signature: str, *,
           now: Optional[float] = None, tolerance: float = TOLERANCE) -> bool:
    """What a receiver does (module docstring): the signature matches ``timestamp.body``
    and the timestamp is within ``tolerance`` seconds of ``now``."""
    try:
        fresh = abs((time.time() if now is None else now) - int(timestamp)) <= tolerance
    except ValueError:
        return False
    return fresh and hmac.compare_digest(sign(secret, timestamp, body), signature)


def parse_webhook_request(body: Any) -> tuple[str, tuple[str, ...]]:
    """Validate a ``POST /api/v1/webhooks`` body: ``url`` (http or https, required) and
    ``events`` (a non-empty subset of :data:`EVENTS`, default all). Raises 400 naming
    the wrong field."""
    if not isinstance(body, dict):
        raise HttpError(400, "invalid_request", "request body must be a JSON object")
    unknown = sorted(set(body) - {"url", "events"})
    if unknown:
        raise HttpError(400, "unknown_field", f"unknown field {unknown[0]!r}; a webhook takes url, events")
    url = body.get("url")
    # Printable ASCII only: it goes into an HTTP request line as it is.
    ascii_url = isinstance(url, str) and url.isascii() and url.isprintable() and " " not in url
    split = urlsplit(url) if ascii_url else None
    try:
        port_ok = split is not None and (split.port is None or 0 < split.port < 65536)
    except ValueError:
        port_ok = False
    if (not isinstance(url, str) or split is None or split.scheme not in ("http", "https") or not split.hostname
            or not port_ok or len(url) > MAX_URL):
        raise HttpError(400, "invalid_url", f"url: must be an http:// or https:// URL of at most {MAX_URL} characters")
    events = body.get("events", list(EVENTS))
    if not isinstance(events, list) or not events or any(e not in EVENTS for e in events):
        raise HttpError(400, "invalid_events", f"events: must be a non-empty list of {', '.join(EVENTS)}")
    return url, tuple(dict.fromkeys(events))


async def post_json(url: str, body: bytes, headers: dict[str, str], *,
                    timeout: float = TIMEOUT, ssl_context: Optional[ssl.SSLContext] = None,
                    egress: Optional[EgressPolicy] = None) -> int:
    """POST ``body`` to ``url`` over HTTP/1.1; returns the response status. Raises
    OSError/TimeoutError/h11 errors when there is no proper answer within ``timeout``.
    With ``egress`` the connection goes through that policy (EgressRefused, an OSError,
    if it refuses every address); without, it goes where the URL says."""
    split = urlsplit(url)
    tls = split.scheme == "https"
    host = split.hostname or ""
    port = split.port or (443 if tls else 80)
    target = (split.path or "/") + (f"?{split.query}" if split.query else "")
    host_header = split.netloc.rpartition("@")[2]  # never send userinfo as Host
    conn = h11.Connection(h11.CLIENT)
    async with asyncio.timeout(timeout):
        context = (ssl_context or ssl.create_default_context()) if tls else None
        if egress is not None:
            reader, writer = await egress.open_connection(host, port, ssl_context=context)
        else:
            reader, writer = await asyncio.open_connection(host, port, ssl=context)
        try:
            request = h11.Request(method="POST", target=target, headers=[
                ("Host", host_header), ("User-Agent", f"relay-webhooks/{__version__}"),
                ("Content-Type", "application/json"), ("Content-Length", str(len(body))),
                ("Connection", "close"), *headers.items()])
            writer.write(conn.send(request) + conn.send(h11.Data(data=body))
                         + conn.send(h11.EndOfMessage()))
            await writer.drain()
            status: Optional[int] = None
            received = 0
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    data = await reader.read(16384)
                    conn.receive_data(data)  # b"" = EOF: h11 then reports the end or an error
                    continue
                if isinstance(event, h11.Response):
                    status = event.status_code
                elif isinstance(event, h11.Data):
                    received += len(event.data)
                    if received > MAX_RESPONSE:  # we only need the status: stop reading
                        break
                elif isinstance(event, (h11.EndOfMessage, h11.ConnectionClosed)):
                    break
            if status is None:
                raise ConnectionError("the receiver closed the connection without an answer")
            return status
        finally:
            writer.close()


@dataclass
class Delivery:
    """One event for one webhook, with its attempts so far."""

    hook: Webhook
    event: str
    body: bytes
    id: str
    attempts: int = 0


class WebhookDispatcher:
    """The background sender. ``publish`` from anywhere on the loop; ``close`` at shutdown.

    ``timeout``, ``attempts`` and ``backoff`` are attributes so tests can shorten them.
    """

    def __init__(self, *, timeout: float = TIMEOUT, attempts: int = ATTEMPTS,
                 backoff: float = BACKOFF, queue_limit: int = QUEUE_LIMIT,
                 concurrency: int = CONCURRENCY,
                 ssl_context: Optional[ssl.SSLContext] = None,
                 store: Optional[Store] = None,
                 egress: Optional[EgressPolicy] = None) -> None:
        self._store = store  # None: pending deliveries live in memory only
        #: Where deliveries may go (default: global addresses only, see relay.gateway.egress).
        self.egress = egress if egress is not None else EgressPolicy()
        self._concurrency = concurrency
        self.timeout = timeout
        self.attempts = attempts
        self.backoff = backoff
        self.queue_limit = queue_limit
        self._ssl = ssl_context
        self._queue: deque[Delivery] = deque()
        self._wakeup = asyncio.Event()
        self._slots = asyncio.Semaphore(concurrency)
        self._runner: Optional[asyncio.Task] = None
        self._inflight: set[asyncio.Task] = set()
        #: Counters, for tests and logs.
        self.delivered = 0
        self.failed = 0
        self.dropped = 0

    async def publish(self, hooks: list[Webhook], event: str, team_id: str, data: Any) -> None:
        """Queue ``event`` for each of ``hooks`` (and record them in the store); the
        deliveries are made in the background."""
        if not hooks:
            return
        new: list[Delivery] = []
        for hook in hooks:
            delivery_id = str(uuid.uuid4())
            body = json.dumps({
                "id": delivery_id, "event": event, "team_id": team_id,
                "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "data": data,
            }).encode()
            delivery = Delivery(hook, event, body, delivery_id)
            new.append(delivery)
            await self._enqueue(delivery)
        if self._store is not None:
            try:
                await self._store.add_webhook_deliveries(
                    [(d.id, d.hook.id, d.event, d.body) for d in new],
                    keep=self.queue_limit + self._concurrency)
            except Exception as exc:  # still delivered from memory; only a restart loses it
                log.error("cannot record webhook deliveries: %s", exc)
        self._start()

    async def resume(self) -> int:
        """Queue the deliveries a previous run of the gateway left unfinished (see the
        module docstring); returns how many. Call once, at start, before publishing."""
        if self._store is None:
            return 0
        try:
            pending = await self._store.pending_webhook_deliveries(self.queue_limit)
        except Exception as exc:
            log.error("cannot read pending webhook deliveries: %s", exc)
            return 0
        for hook, event, body, delivery_id, attempts in pending:
            await self._enqueue(Delivery(hook, event, body, delivery_id, attempts))
        if pending:
            log.info("resuming %d pending webhook deliveries", len(pending))
            self._start()
        return len(pending)

    async def _enqueue(self, delivery: Delivery) -> None:
        if len(self._queue) >= self.queue_limit:
            old = self._queue.popleft()
            self.dropped += 1
            log.warning("webhook queue full (%d): dropped %s for %s", self.queue_limit,
                        old.event, redact_url(old.hook.url))
            self._queue.append(delivery)
            await self._forget(old)
            return
        self._queue.append(delivery)

    def _start(self) -> None:
        self._wakeup.set()
        if self._runner is None or self._runner.done():
            self._runner = asyncio.get_running_loop().create_task(self._run())

    async def _forget(self, delivery: Delivery) -> None:
        """The delivery is over: its row goes."""
        if self._store is not None:
            try:
                await self._store.delete_webhook_delivery(delivery.id)
            except Exception as exc:  # at worst it is sent again after a restart
                log.error("cannot remove webhook delivery %s: %s", delivery.id, exc)

    async def _record_attempts(self, delivery: Delivery) -> None:
        if self._store is not None:
            try:
                await self._store.set_webhook_delivery_attempts(delivery.id, delivery.attempts)
            except Exception as exc:
                log.error("cannot record attempts of webhook delivery %s: %s", delivery.id, exc)

    @property
    def pending(self) -> int:
        """Deliveries queued or in flight."""
        return len(self._queue) + len(self._inflight)

    async def _run(self) -> None:
        while True:
            while not self._queue:
                self._wakeup.clear()
                await self._wakeup.wait()
            await self._slots.acquire()  # wait for a free slot before taking the next one
            if not self._queue:  # drained while we waited
                self._slots.release()
                continue
            delivery = self._queue.popleft()
            task = asyncio.get_running_loop().create_task(self._deliver(delivery))
            self._inflight.add(task)
            task.add_done_callback(self._inflight.discard)

    async def _deliver(self, delivery: Delivery) -> None:
        """All attempts of one delivery, with backoff between them."""
        try:
            delay = self.backoff
            while True:
                delivery.attempts += 1
                problem = await self._attempt(delivery)
                if problem is None:
                    await self._forget(delivery)  # counted once its row is gone too
                    self.delivered += 1
                    return
                if delivery.attempts >= self.attempts:
                    log.warning("webhook %s to %s failed after %d attempts: %s", delivery.event,
                                redact_url(delivery.hook.url), delivery.attempts, problem)
                    await self._forget(delivery)
                    self.failed += 1
                    return
                await self._record_attempts(delivery)
                log.info("webhook %s to %s: %s; retrying in %.1fs", delivery.event,
                         redact_url(delivery.hook.url), problem, delay)
                await asyncio.sleep(delay)
                delay *= 2
        finally:
            self._slots.release()

    async def _attempt(self, delivery: Delivery) -> Optional[str]:
        """One POST; None on a 2xx answer, else what went wrong."""
        timestamp = str(int(time.time()))
        headers = {
            "X-Relay-Event": delivery.event,
            "X-Relay-Delivery": delivery.id,
            "X-Relay-Timestamp": timestamp,
            "X-Relay-Signature": sign(delivery.hook.secret, timestamp, delivery.body),
        }
        try:
            status = await post_json(delivery.hook.url, delivery.body, headers,
                                     timeout=self.timeout, ssl_context=self._ssl, egress=self.egress)
        except TimeoutError:
            return f"no answer within {self.timeout:g}s"
        except (OSError, h11.ProtocolError, ssl.SSLError) as exc:
            return f"{type(exc).__name__}: {exc}"
        return None if 200 <= status < 300 else f"HTTP {status}"

    async def close(self) -> None:
        """Stop sending. Pending deliveries stay in the store for the next start (without
        a store they are dropped)."""
        tasks = [t for t in (self._runner, *self._inflight) if t is not None]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        self._queue.clear()
