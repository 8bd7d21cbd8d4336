"""Peer sessions: one mux session over one WebSocket per pair of gateways.

A gateway that must forward to another dials its advertised URL at :data:`PEER_PATH`
with the fleet secret in :data:`SECRET_HEADER` and its id in :data:`GATEWAY_HEADER`.
The accepting side compares the secret in constant time and answers 401 before any
upgrade when it is wrong or missing (the secret is never logged or echoed). After the
101 both sides speak the relay's multiplexer, and either side may open streams on the
session (each stream is one forwarded request; relay.gateway.fleet.forward), so a pair
needs one session whichever dialled first: an accepted session is used for forwarding
too.

Sessions are opened on first need (a lookup, or the news that a gateway holds an
agent), kept while the peer's gateway lease lives, and dialled again with a growing
delay after a drop. Lookups never wait for a dial: until the session is up, forwards
to that gateway fail at once (503 / the client's connection closed), as for an
offline agent.
"""
from __future__ import annotations

import asyncio
import dataclasses
import hmac
import logging
import ssl
from typing import Any, Callable, Optional
from urllib.parse import urlsplit

from relay.aio import MuxSession
from relay.aio.dial import dial_session
from relay.mux.connection import MuxConfig
from relay.mux.errors import ErrorCode
from relay.ws.handshake import ClientHandshake, HandshakeError

__all__ = ["GATEWAY_HEADER", "PEER_PATH", "PeerPool", "SECRET_HEADER", "secret_matches"]

log = logging.getLogger("relay.gateway.fleet.peers")

PEER_PATH = "/api/v1/fleet/peer"
SECRET_HEADER = "X-Relay-Fleet-Secret"
GATEWAY_HEADER = "X-Relay-Gateway-Id"
#: A dial (TCP, upgrade, SETTINGS) must complete within this time.
DIAL_TIMEOUT = 5.0
#: Delay before dialling a peer again after a failure: doubles up to the maximum.
REDIAL_INITIAL = 0.2
REDIAL_MAX = 5.0


def secret_matches(expected: str, given: Optional[str]) -> bool:
    """Constant-time comparison of the fleet secret (a missing header never matches)."""
    if not given:
        return False
    return hmac.compare_digest(expected.encode(), given.encode())


class PeerPool:
    """The peer sessions of one gateway, by the other gateway's id."""

    def __init__(self, gateway_id: str, secret: str, on_stream: Callable[[Any], Any], *,
                 mux_config: Optional[MuxConfig] = None, metrics: Any = None,
                 ssl_context: Optional[ssl.SSLContext] = None) -> None:
        self.gateway_id = gateway_id
        self._secret = secret
        self._on_stream = on_stream
        self._config = mux_config or MuxConfig()
        self._metrics = metrics
        self._ssl = ssl_context
        #: Advertised URLs of the live gateways (kept by the fleet registry).
        self.urls: dict[str, str] = {}
        self._sessions: dict[str, MuxSession] = {}
        self._dialing: dict[str, asyncio.Task] = {}
        self._accepted: set[MuxSession] = set()
        self._closed = False

    def __repr__(self) -> str:  # never show the secret
        return f"PeerPool({self.gateway_id!r}, peers={sorted(self._sessions)})"

    def connected(self) -> int:
        """How many peers have an open session now."""
        return sum(1 for s in self._sessions.values() if not s.is_closed)

    def is_up(self, gateway_id: str) -> bool:
        """Is a session to ``gateway_id`` open now? (No dial is started.)"""
        session = self._sessions.get(gateway_id)
        return session is not None and not session.is_closed and session.established

    def load(self, gateway_id: str) -> Optional[int]:
        """Streams open now on the session to ``gateway_id``; None if it is not up."""
        session = self._sessions.get(gateway_id)
        if session is None or session.is_closed or not session.established:
            return None
        return len(session.streams)

    def session(self, gateway_id: str) -> Optional[MuxSession]:
        """The open session to ``gateway_id``, or None (a dial is started if needed)."""
        session = self._sessions.get(gateway_id)
        if session is not None and not session.is_closed and session.established:
            return session
        self.ensure(gateway_id)
        return None

    async def wait_session(self, gateway_id: str, timeout: float) -> Optional[MuxSession]:
        """:meth:`session`, waiting up to ``timeout`` for a dial in progress (for
        requests that may wait, such as control requests; streams never do)."""
        session = self.session(gateway_id)
        dialing = self._dialing.get(gateway_id)
        if session is not None or dialing is None:
            return session
        await asyncio.wait({dialing}, timeout=timeout)
        return self.session(gateway_id)

    def ensure(self, gateway_id: str) -> None:
        """Dial ``gateway_id`` unless a session is open or being opened."""
        if self._closed or gateway_id == self.gateway_id or gateway_id in self._dialing:
            return
        session = self._sessions.get(gateway_id)
        if session is not None and not session.is_closed:
            return
        task = asyncio.get_running_loop().create_task(self._keep(gateway_id))
        self._dialing[gateway_id] = task

    async def _keep(self, gateway_id: str) -> None:
        """Dial until a session is up (with backoff), while the peer is alive."""
        delay = REDIAL_INITIAL
        try:
            while not self._closed and gateway_id in self.urls:
                existing = self._sessions.get(gateway_id)
                if existing is not None and not existing.is_closed:
                    return  # the peer dialled us meanwhile
                try:
                    session = await self._dial(gateway_id, self.urls[gateway_id])
                except (OSError, HandshakeError, TimeoutError, ConnectionError) as exc:
                    if self._metrics is not None:
                        self._metrics.peer_failures += 1
                    log.warning("cannot open a peer session to gateway %s: %s; retrying in %.1fs",
                                gateway_id, exc, delay)
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, REDIAL_MAX)
                    continue
                self._adopt(gateway_id, session)
                log.info("peer session to gateway %s open", gateway_id)
                return
        finally:
            self._dialing.pop(gateway_id, None)

    async def _dial(self, gateway_id: str, url: str) -> MuxSession:
        parts = urlsplit(url)
        tls = parts.scheme in ("https", "wss")
        host = parts.hostname or "127.0.0.1"
        port = parts.port or (443 if tls else 80)
        hostport = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        headers = [(GATEWAY_HEADER, self.gateway_id)]
        if self._secret:
            headers.append((SECRET_HEADER, self._secret))
        handshake = ClientHandshake(hostport, PEER_PATH, extra_headers=headers)
        config = dataclasses.replace(self._config, info={**self._config.info, "gateway_id": self.gateway_id})
        session = MuxSession(True, config, on_stream=self._on_stream)
        context = (self._ssl or ssl.create_default_context()) if tls else None
        await dial_session(session, handshake, host, port, timeout=DIAL_TIMEOUT, ssl_context=context)
        return session

    def accepted(self, gateway_id: str, session: MuxSession) -> None:
        """A peer dialled us (secret checked): use its session for our forwards too,
        unless one to that peer is open already."""
        self._accepted.add(session)
        current = self._sessions.get(gateway_id)
        if current is None or current.is_closed:
            self._adopt(gateway_id, session)

    def _adopt(self, gateway_id: str, session: MuxSession) -> None:
        self._sessions[gateway_id] = session
        loop = asyncio.get_running_loop()
        task = loop.create_task(session.wait_closed())

        def ended(_: Any) -> None:
            self._accepted.discard(session)
            if self._sessions.get(gateway_id) is session:
                del self._sessions[gateway_id]
                if not self._closed:
                    log.info("peer session to gateway %s ended", gateway_id)
                    if gateway_id in self.urls:
                        self.ensure(gateway_id)  # kept: dial again while the peer lives

        task.add_done_callback(ended)

    def forget(self, gateway_id: str) -> None:
        """The peer's gateway lease is gone: close its session."""
        self.urls.pop(gateway_id, None)
        session = self._sessions.pop(gateway_id, None)
        if session is not None:
            session.abort(ErrorCode.GOING_AWAY, "the peer gateway's lease expired")

    async def close(self) -> None:
        self._closed = True
        for task in list(self._dialing.values()):
            task.cancel()
        for session in list(self._sessions.values()) + list(self._accepted):
            session.close(ErrorCode.GOING_AWAY, "gateway shutting down")
        self._sessions.clear()
        self._accepted.clear()
