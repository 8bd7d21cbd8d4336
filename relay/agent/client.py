"""The agent: dial out to the gateway, say who we are, serve streams to allowed targets.

One outbound WebSocket to ``GATEWAY/api/v1/agent/connect`` with ``Authorization: Bearer
ak-...`` carries one mux session (the agent is the ``client=True`` side). The agent's
hello is its SETTINGS ``info``: ``{"name", "labels", "version", "limits"}`` (see
relay.gateway.registry); the gateway answers with a ``welcome`` control message naming
the agent id. Liveness is the mux keepalive (PING after 15 s of silence, dead after 45 s).

Streams the gateway opens carry ``{"protocol": "tcp"|"http", "target": "HOST:PORT"}``; both
are spliced byte for byte to the target (for "http" the gateway speaks HTTP/1.1 to it
through the stream, so the agent needs no HTTP knowledge). A target
is served only if allowed: with no ``--allow`` entries, any port on a loopback host
(127.0.0.1, localhost, ::1); with entries, exactly those ``HOST:PORT`` pairs. Anything
else is refused with NOT_ALLOWED and a message saying why; an unreachable target with
CONNECT_FAILED. The relay must never become an open proxy into the agent's network.

After any drop the agent reconnects with exponential backoff (0.5 s doubling to 30 s,
+-20 % jitter, reset after a connection that lasted 10 s). A rejected key (401/403) is
permanent: :meth:`Agent.run` raises :class:`AgentAuthError`. The key is never logged.
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import random
import ssl
from collections.abc import Iterable
from typing import Any, Optional
from urllib.parse import urlsplit

from relay import __version__
from relay.agent.bind import Binder
from relay.agent.tasks import AgentTasks, stream_denied
from relay.aio import MuxSession, StreamRefused, WebSocketTransport, connect_stream_to
from relay.aio.stream import MuxStream
from relay.mux.connection import MuxConfig
from relay.mux.errors import ErrorCode
from relay.ws.handshake import ClientHandshake, HandshakeError, HandshakeRejected

__all__ = ["Agent", "AgentAuthError", "parse_host_port", "AGENT_PATH"]

log = logging.getLogger("relay.agent")

AGENT_PATH = "/api/v1/agent/connect"
LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})
#: Stream protocols served; all are plain byte splices to the target.
STREAM_PROTOCOLS = frozenset({"tcp", "http"})
#: The upgrade must complete within this time.
HANDSHAKE_TIMEOUT = 15.0
#: A connection that lasted this long resets the reconnect backoff.
STABLE_CONNECTION = 10.0


class AgentAuthError(Exception):
    """The gateway rejected the agent key (HTTP 401/403): retrying cannot help."""


def parse_host_port(value: str) -> tuple[str, int]:
    """``HOST:PORT`` or ``[V6]:PORT`` -> ``(host, port)``; ValueError if malformed."""
    value = value.strip()
    if value.startswith("["):
        host, sep, port = value[1:].partition("]:")
    else:
        host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ValueError(f"expected HOST:PORT, got {value!r}")
    return host.lower(), int(port)


class _Handshake(asyncio.Protocol):
    """Protocol of the TCP connection until the 101 arrives, then hands it to the
    session (synchronously, in ``data_received``, so no byte can fall in between)."""

    def __init__(self, handshake: ClientHandshake, session: MuxSession) -> None:
        self._handshake = handshake
        self._session = session
        self.done: asyncio.Future = asyncio.get_running_loop().create_future()
        self._transport: Optional[asyncio.Transport] = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]
        transport.write(self._handshake.request_bytes())  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        self._feed(data)

    def eof_received(self) -> Optional[bool]:
        self._feed(b"")
        return None

    def connection_lost(self, exc: Optional[BaseException]) -> None:
        if not self.done.done():
            self.done.set_exception(ConnectionError(f"connection lost during the upgrade: {exc or 'closed'}"))

    def _feed(self, data: bytes) -> None:
        if self.done.done():
            return
        try:
            accepted = self._handshake.receive_data(data)
        except HandshakeError as exc:
            self.done.set_exception(exc)
            self._transport.close()
            return
        if accepted is not None:
            WebSocketTransport.attach(self._transport, self._session, client=True,
                                      initial=accepted.leftover)
            self.done.set_result(None)


class Agent:
    """An agent of one team. ``await agent.run()`` serves until cancelled.

    ``allow``: ``HOST:PORT`` strings (or pairs) the gateway may reach through us; empty
    means loopback only. ``labels`` are advertised to the gateway.
    """

    def __init__(self, gateway_url: str, key: str, *, name: Optional[str] = None,
                 labels: Iterable[str] = (), allow: Iterable[Any] = (),
                 mux_config: Optional[MuxConfig] = None,
                 backoff_initial: float = 0.5, backoff_max: float = 30.0, jitter: float = 0.2,
                 ssl_context: Optional[ssl.SSLContext] = None) -> None:
        split = urlsplit(gateway_url if "://" in gateway_url else "http://" + gateway_url)
        if split.scheme not in ("http", "https", "ws", "wss") or not split.hostname:
            raise ValueError(f"gateway URL must be http(s):// or ws(s)://HOST[:PORT]: {gateway_url!r}")
        self.tls = split.scheme in ("https", "wss")
        self.host = split.hostname
        self.port = split.port or (443 if self.tls else 80)
        path = split.path.rstrip("/")
        self.path = path if path.endswith(AGENT_PATH) else path + AGENT_PATH
        self.gateway_url = f"{split.scheme}://{split.netloc}{self.path}"
        self._key = key
        self.name = name or _default_name()
        self.labels = sorted(set(labels))
        self.allow: set[tuple[str, int]] = {parse_host_port(a) if isinstance(a, str) else (a[0].lower(), int(a[1]))
                                            for a in allow}
        self._mux_config = mux_config
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        self.jitter = jitter
        self._ssl = ssl_context if ssl_context is not None else (ssl.create_default_context() if self.tls else None)
        #: The id the gateway gave us (from its welcome), once connected.
        self.agent_id: Optional[str] = None
        #: The current session while connected.
        self.session: Optional[MuxSession] = None
        #: Set while a session is established (tests and status reporting).
        self.connected = asyncio.Event()
        #: Local ports bound for tunnels on the gateway's request (relay.agent.bind).
        self.binder = Binder()
        self.state = "idle"
        #: Task handlers by kind (relay.agent.tasks; the CLI adds echo, sleep, count).
        self.tasks = AgentTasks()
        self._newest: Optional[MuxSession] = None
        #: Stream policies, ``fn(metadata) -> True/None | False/reason`` (relay.agent.tasks).
        self.allow_stream: list[Any] = []
        #: Declared container services (relay.agent.services.ServiceSpec), sent in the
        #: hello; their targets are allowed implicitly.
        self.services: list[Any] = []

    def __repr__(self) -> str:  # never show the key
        return f"Agent({self.gateway_url!r}, name={self.name!r})"

    # ------------------------------------------------------------------ policy

    def is_allowed(self, host: str, port: int) -> bool:
        """May the gateway reach ``host:port`` through this agent?"""
        host = host.lower()
        if any((s.host, s.port) == (host, port) for s in self.services):
            return True
        if not self.allow:
            return host in LOOPBACK_HOSTS
        return (host, port) in self.allow

    async def _on_stream(self, stream: MuxStream) -> None:
        """Serve one stream the gateway opened: check the target, connect, splice."""
        meta = stream.metadata
        target = meta.get("target") if isinstance(meta, dict) else None
        protocol = meta.get("protocol", "tcp") if isinstance(meta, dict) else None
        denied = stream_denied(self.allow_stream, meta)
        if denied is not None:
            raise StreamRefused(ErrorCode.NOT_ALLOWED, denied)
        if protocol not in STREAM_PROTOCOLS:
            raise StreamRefused(ErrorCode.REFUSED, f"unsupported stream protocol {protocol!r}")
        try:
            host, port = parse_host_port(target if isinstance(target, str) else "")
        except ValueError:
            raise StreamRefused(ErrorCode.PROTOCOL_ERROR, f"bad target {target!r}: expected HOST:PORT") from None
        if not self.is_allowed(host, port):
            log.warning("refused stream to %s:%d: not on this agent's allowlist", host, port)
            raise StreamRefused(ErrorCode.NOT_ALLOWED,
                                f"target {host}:{port} is not allowed by agent {self.name!r} "
                                f"(allowed: {self._allow_text()})")
        try:
            await connect_stream_to(stream, host, port)
        except OSError as exc:
            log.info("stream to %s:%d failed: %s", host, port, exc)  # already refused

    def _allow_text(self) -> str:
        if not self.allow:
            return "loopback hosts only"
        return ", ".join(f"{h}:{p}" for h, p in sorted(self.allow))

    def _on_control(self, message: Any) -> None:
        if isinstance(message, dict) and message.get("type") == "welcome":
            self.agent_id = str(message.get("agent_id"))
            log.info("registered as agent %s (%s)", self.agent_id, self.name)
        elif isinstance(message, dict) and message.get("type") == "bind":  # Tunnels API connect
            self.binder.on_control(message)
        elif isinstance(message, dict) and message.get("type") == "task" and self._newest is not None:
            self.tasks.on_control(self._newest, message)  # seed 001 tasks

    # ------------------------------------------------------------------ connecting

    async def connect(self) -> MuxSession:
        """Dial the gateway and return the established session.

        Raises :class:`AgentAuthError` if the key is rejected, OSError/HandshakeError/
        TimeoutError for other failures.
        """
        config = self._mux_config or MuxConfig()
        info = {"name": self.name, "labels": self.labels, "version": __version__,
                "limits": {"max_streams": config.max_streams},
                "services": [spec.to_info() for spec in self.services]}
        config = dataclasses.replace(config, info={**config.info, **info})
        session = MuxSession(True, config, on_stream=self._on_stream, on_control=self._on_control)
        # Messages can arrive before connect() returns and self.session is set.
        self._newest = session
        hostport = self.host if self.port in (80, 443) else f"{self.host}:{self.port}"
        handshake = ClientHandshake(hostport, self.path,
                                    extra_headers=[("Authorization", f"Bearer {self._key}")])
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(HANDSHAKE_TIMEOUT):
            transport, proto = await loop.create_connection(
                lambda: _Handshake(handshake, session), self.host, self.port, ssl=self._ssl)
            try:
                await proto.done
            except HandshakeRejected as exc:
                if exc.status_code in (401, 403):
                    raise AgentAuthError(f"the gateway rejected the agent key: {exc}") from None
                raise
            except BaseException:
                transport.abort()
                raise
            try:
                await session.wait_established()
            except BaseException:
                session.abort()
                raise
        return session

    async def run_once(self) -> None:
        """One connection: connect, serve until the session ends."""
        self._set_state("connecting")
        session = await self.connect()
        self.session = session
        self.connected.set()
        self._set_state("connected")
        try:
            await session.wait_closed()
        finally:  # also on cancellation: a stopped agent must not leave its socket open
            session.abort(ErrorCode.NO_ERROR, "agent stopping")
            self.connected.clear()
            self.session = None

    async def run(self) -> None:
        """Serve forever, reconnecting with backoff after any drop. Raises
        :class:`AgentAuthError` if the key is rejected."""
        attempt = 0
        loop = asyncio.get_running_loop()
        while True:
            started = loop.time()
            try:
                await self.run_once()
                # Start the backoff over only after a connection that lasted: one the
                # gateway drops at once (e.g. a duplicate agent) must not loop tightly.
                if loop.time() - started >= STABLE_CONNECTION:
                    attempt = 0
                reason = "connection lost"
            except AgentAuthError:
                self._set_state("rejected")
                raise
            except (OSError, HandshakeError, TimeoutError, ConnectionError) as exc:
                reason = str(exc) or type(exc).__name__
            delay = self.backoff_delay(attempt)
            attempt += 1
            self._set_state("disconnected", f"{reason}; retrying in {delay:.1f}s")
            await asyncio.sleep(delay)

    def backoff_delay(self, attempt: int) -> float:
        """Delay before reconnect attempt ``attempt`` (0-based): exponential, capped,
        with jitter so many agents dropped at once do not return in lockstep."""
        base = min(self.backoff_max, self.backoff_initial * (2 ** min(attempt, 30)))
        return base * random.uniform(1 - self.jitter, 1 + self.jitter)

    def report_status(self, status: str) -> None:
        """Tell the gateway our status (``idle``, ``busy`` or ``unhealthy``); ignored
        while not connected."""
        if self.session is not None and not self.session.is_closed:
            self.session.send_control({"type": "status", "status": status})

    def close(self) -> None:
        """Drop the current connection (``run`` would reconnect: cancel it to stop)."""
        if self.session is not None:
            self.session.abort(ErrorCode.NO_ERROR, "agent stopping")
        self.binder.close()

    def _set_state(self, state: str, detail: str = "") -> None:
        if state == self.state and not detail:
            return
        self.state = state
        if state == "connecting":
            log.info("connecting to %s as %r", self.gateway_url, self.name)
        elif state == "connected":
            log.info("connected to %s", self.gateway_url)
        else:
            log.info("%s%s", state, f": {detail}" if detail else "")


def _default_name() -> str:
    import socket

    return socket.gethostname() or "agent"
