"""The agent: dial out to the gateway, say who we are, serve streams to allowed targets.

One outbound WebSocket to ``GATEWAY/api/v1/agent/connect`` with ``Authorization: Bearer
ak-...`` carries one mux session (the agent is the ``client=True`` side). The agent's
hello is its SETTINGS ``info``: ``{"name", "labels", "version", "limits"}`` (see
relay.gateway.agents.registry); the gateway answers with a ``welcome`` control message naming
the agent id. Liveness is the mux keepalive (PING after 15 s of silence, dead after 45 s).

Streams the gateway opens carry ``{"protocol": "tcp"|"http"|"udp", "target": "HOST:PORT"}``
(or ``{"protocol": "terminal", ...}``: a shell on a pty, only with ``terminal``,
relay.agent.terminal);
tcp and http are spliced byte for byte to the target, udp streams carry datagrams to and
from a connected UDP socket (relay.agent.udp, docs/PROTOCOL.md section 16) (for "http" the gateway speaks HTTP/1.1 to it
through the stream, so the agent needs no HTTP knowledge). A tcp or http stream with
``"tls": true`` (an https tunnel's share link) is spliced to a TLS connection to the
target, SNI the target's host, its certificate not verified
(relay.gateway.http.share_proxy says why). A target
is served only if allowed: with no ``--allow`` entries, any port on a loopback host
(127.0.0.1, localhost, ::1); with entries, exactly those ``HOST:PORT`` pairs. Anything
else is refused with NOT_ALLOWED and a message saying why; an unreachable target with
CONNECT_FAILED. The relay must never become an open proxy into the agent's network.

After any drop the agent reconnects with exponential backoff (0.5 s doubling to 30 s,
+-20 % jitter, reset after a connection that lasted 10 s and was not refused). Given
several gateways (a fleet: several ``--gateway`` URLs, or one name with several
addresses), it holds up to ``connections`` sessions at once, each to another gateway
(relay.agent.gateways); a session that drops is replaced by one to the next gateway
no other connection uses, dialled within ``backoff_initial / 4`` (spread at random), a
failed dial there backing off as usual. Host names are resolved again right before every
reconnect (:meth:`Agent.targets`), so a fleet whose DNS record changes is followed. A key
rejected (401/403) before it ever worked is permanent: :meth:`Agent.run` raises
:class:`AgentAuthError`. Once connected, a refusal (the gateway's GOAWAY NOT_ALLOWED, e.g.
"credential revoked" or another agent holding this name, or a later 401) is logged at
ERROR with its reason and retried with the growing delay. The key is never logged.
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import socket
import ssl
from collections.abc import Iterable, Sequence
from typing import Any, Optional

from relay.agent.base import AgentBase, Redial
from relay.agent.bind import Binder
from relay.agent.gateways import DialTarget, TargetRing, default_connections, expand, is_address
from relay.agent.policy import (  # re-exported: the agent's public names
    AGENT_PATH,
    LOOPBACK_HOSTS,
    STREAM_PROTOCOLS,
    TargetRefused,
    parse_host_port,
    target_tls,
)
from relay.agent.tasks import LoopTime
from relay.agent.terminal import TerminalSpec, serve_terminal_stream
from relay.agent.udp import serve_datagram_stream
from relay.aio import MuxSession, StreamRefused, connect_stream_to
from relay.aio.dial import dial_session
from relay.aio.stream import MuxStream
from relay.mux.connection import MuxConfig
from relay.mux.errors import ErrorCode
from relay.mux.terminal import TERMINAL_PROTOCOL
from relay.ws.handshake import ClientHandshake, HandshakeError, HandshakeRejected

__all__ = ["Agent", "AgentAuthError", "parse_host_port", "AGENT_PATH", "LOOPBACK_HOSTS", "STREAM_PROTOCOLS"]

log = logging.getLogger("relay.agent")

#: The upgrade must complete within this time.
HANDSHAKE_TIMEOUT = 15.0
#: A gateway's host name not resolved within this time keeps its last addresses.
RESOLVE_TIMEOUT = 5.0
#: What task handlers sleep and tell time with.
ASYNCIO_TIME = LoopTime(asyncio.sleep, lambda: asyncio.get_running_loop().time())


class AgentAuthError(Exception):
    """The gateway rejected the agent key (HTTP 401/403): retrying cannot help."""


class Agent(AgentBase):
    """An agent of one team. ``await agent.run()`` serves until cancelled.

    ``allow``: ``HOST:PORT`` strings (or pairs) the gateway may reach through us; empty
    means loopback only. ``labels`` are advertised to the gateway.
    """

    def __init__(self, gateway_url: str, key: str, *, name: Optional[str] = None,
                 labels: Iterable[str] = (), allow: Iterable[Any] = (),
                 mux_config: Optional[MuxConfig] = None,
                 backoff_initial: float = 0.5, backoff_max: float = 30.0, jitter: float = 0.2,
                 more_gateways: Iterable[str] = (),
                 ssl_context: Optional[ssl.SSLContext] = None,
                 terminal: Optional[TerminalSpec] = None, connections: Optional[int] = None) -> None:
        super().__init__(gateway_url, key, name=name, labels=labels, allow=allow, mux_config=mux_config,
                         backoff_initial=backoff_initial, backoff_max=backoff_max, jitter=jitter,
                         ssl_context=ssl_context, more_gateways=more_gateways)
        if connections is not None and connections < 1:
            raise ValueError("connections must be at least 1")
        #: Sessions held at once, each to another gateway (None: 2 if there are
        #: several gateway addresses, else 1; relay.agent.gateways).
        self.connections = connections
        #: The newest session while connected.
        self.session: Optional[MuxSession] = None
        #: Set while a session is established (tests and status reporting).
        self.connected = asyncio.Event()
        #: Local ports bound for tunnels on the gateway's request (relay.agent.bind).
        self.binder = Binder()
        #: Every established session (several with ``connections`` > 1).
        self.sessions: list[MuxSession] = []
        #: The web terminal this agent serves (``--terminal``; relay.agent.terminal), or
        #: None: terminal streams are refused. Advertised in the hello.
        self.terminal = terminal
        #: The shells running now (relay.agent.terminal.TerminalShell).
        self.shells: set[Any] = set()

    # ------------------------------------------------------------------ streams and control

    async def _on_stream(self, stream: MuxStream) -> None:
        """Serve one stream the gateway opened as planned (AgentBase.plan_stream):
        connect and splice, datagrams, or a shell."""
        try:
            plan = self.plan_stream(stream.metadata)
        except TargetRefused as exc:
            raise StreamRefused(exc.error_code, exc.message) from None
        if plan.protocol == TERMINAL_PROTOCOL:  # the web terminal
            await serve_terminal_stream(stream, self.terminal, self.name, self.shells)
            return
        host, port = plan.host, plan.port
        if plan.protocol == "udp":  # one connected UDP socket per flow
            try:
                await serve_datagram_stream(stream, host, port)
            except OSError as exc:
                log.info("udp stream to %s:%d failed: %s", host, port, exc)  # already refused
            return
        tls: dict[str, Any] = {"ssl": target_tls(), "server_hostname": host} if plan.tls else {}
        try:
            await connect_stream_to(stream, host, port, **tls)
        except OSError as exc:
            log.info("stream to %s:%d failed: %s", host, port, exc)  # already refused

    def _start_task(self, session: MuxSession, message: dict[str, Any]) -> None:
        ctx = self.tasks.context(session, message, ASYNCIO_TIME)
        task = asyncio.get_running_loop().create_task(self.tasks.run(ctx))
        self.tasks.started(ctx.task_id, task)
        task.add_done_callback(lambda _: self.tasks.finished(ctx.task_id, task))
        # The task belongs to this connection: when it ends, nobody awaits the answer.
        watcher = asyncio.ensure_future(session.wait_closed())
        watcher.add_done_callback(lambda _: task.cancel())
        task.add_done_callback(lambda _: watcher.cancel())

    # ------------------------------------------------------------------ connecting

    async def connect(self, target: Optional[DialTarget] = None, connection: int = 0) -> MuxSession:
        """Dial the gateway (``target``: one of :meth:`targets`; default: the first
        URL) as the agent's connection number ``connection`` and return the
        established session.

        Raises :class:`AgentAuthError` if the key is rejected, OSError/HandshakeError/
        TimeoutError for other failures.
        """
        target = target or DialTarget(self.gateway_urls[0])
        gateway = target.gateway
        config = self._mux_config or MuxConfig()
        config = dataclasses.replace(config, info={**config.info, **self.hello_info(config, connection)})
        holder: list[MuxSession] = []
        session = MuxSession(True, config, on_stream=self._on_stream,
                             on_control=lambda message: self.on_control(message, holder[0]))
        holder.append(session)
        hostport = gateway.host if gateway.port in (80, 443) else f"{gateway.host}:{gateway.port}"
        handshake = ClientHandshake(hostport, gateway.path,
                                    extra_headers=[("Authorization", f"Bearer {self._key}")])
        context = self._ssl if self._ssl is not None or not gateway.tls else ssl.create_default_context()
        if gateway.tls and self._ssl is None:
            self._ssl = context
        try:
            await dial_session(session, handshake, target.ip or gateway.host, gateway.port,
                               timeout=HANDSHAKE_TIMEOUT, ssl_context=context if gateway.tls else None,
                               server_hostname=gateway.host if target.ip else None)
        except HandshakeRejected as exc:
            if exc.status_code in (401, 403):
                raise AgentAuthError(f"the gateway rejected the agent key: {exc}") from None
            raise
        return session

    async def resolve(self, host: str, port: int) -> list[Any]:
        """``getaddrinfo`` tuples for a gateway's host name: the system's resolver (an
        embedding application may answer from its own by overriding this). Raises
        OSError if the name cannot be resolved now."""
        return await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)

    async def targets(self, previous: Sequence[DialTarget] = ()) -> list[DialTarget]:
        """Every place this agent may dial: each ``--gateway`` URL, and each address of
        a host name that resolves to several (relay.agent.gateways). Called at start
        and again before each reconnect (a fleet's addresses may change): a name that
        cannot be resolved now (an error, or no answer within :data:`RESOLVE_TIMEOUT`)
        keeps its targets from ``previous``, the last resolution."""
        found: list[DialTarget] = []
        for gateway in self.gateway_urls:
            infos: list[Any] = []
            if not is_address(gateway.host):
                try:
                    async with asyncio.timeout(RESOLVE_TIMEOUT):
                        infos = await self.resolve(gateway.host, gateway.port)
                except (OSError, TimeoutError) as exc:  # dialled by name, so the next dial says why
                    log.debug("cannot resolve %s now: %s", gateway.host, exc or "timeout")
                    infos = []
                    kept = [t for t in previous if t.gateway == gateway]
                    if kept:
                        found += [t for t in kept if t not in found]
                        continue
            found += [t for t in expand(gateway, infos) if t not in found]
        return found

    async def _follow_names(self, ring: TargetRing) -> None:
        """Resolve the gateways' host names again (before a reconnect): addresses
        added to a name are dialled, addresses removed are no longer."""
        if all(is_address(gateway.host) for gateway in self.gateway_urls):
            return
        targets = await self.targets(ring.targets)
        if set(targets) != set(ring.targets):  # a new order alone (round robin) changes nothing
            log.info("gateway addresses changed: now %s", ", ".join(t.label for t in targets))
            ring.update(targets)

    async def run_once(self, target: Optional[DialTarget] = None, connection: int = 0,
                       sessions: Optional[list[MuxSession]] = None) -> MuxSession:
        """One connection: connect, serve until the session ends; returns the session
        (ended). ``sessions`` (for the reason it ended) gets it as soon as it exists."""
        target = target or DialTarget(self.gateway_urls[0])
        self._set_state("connecting", target=target.label)
        session = await self.connect(target, connection)
        if sessions is not None:
            sessions.append(session)
        self.sessions.append(session)
        self.session = session
        self.ever_connected = True
        self.connected.set()
        self._set_state("connected", target=target.label)
        try:
            await session.wait_closed()
        finally:  # also on cancellation: a stopped agent must not leave its socket open
            session.abort(ErrorCode.NO_ERROR, "agent stopping")
            self.sessions.remove(session)
            self.session = self.sessions[-1] if self.sessions else None
            if not self.sessions:
                self.connected.clear()
        return session

    async def run(self) -> None:
        """Serve forever, reconnecting with backoff after any drop, over up to
        :attr:`connections` sessions at once, each to another gateway (see
        relay.agent.gateways). Raises :class:`AgentAuthError` if the key is rejected
        before it ever worked; once it has, a refusal (key revoked, name taken by
        another agent) is logged at ERROR and retried with a growing delay: the
        gateway's operator may fix it, and a fleet of refused agents must not hammer
        the gateway."""
        targets = await self.targets()
        count = self.connections or default_connections(targets)
        ring = TargetRing(targets)
        if count > 1:
            log.info("holding up to %d sessions at once over %d gateway address(es)", count, len(targets))
        if count == 1:
            await self._keep(ring, 0, 1)
            return
        try:
            async with asyncio.TaskGroup() as group:
                for connection in range(count):
                    group.create_task(self._keep(ring, connection, count))
        except BaseExceptionGroup as failed:  # the first reason (a rejected key) as is
            raise failed.exceptions[0] from None

    async def _keep(self, ring: TargetRing, connection: int, count: int) -> None:
        """Connection number ``connection`` of the agent: dial, serve, dial again (when
        and where: relay.agent.base.Redial)."""
        redial = Redial(self, ring, connection, count)
        loop = asyncio.get_running_loop()
        while True:
            started = loop.time()
            ended: list[MuxSession] = []
            try:
                await self.run_once(redial.target, connection, ended)
                delay = redial.ended(ended, loop.time() - started)
            except AgentAuthError as exc:
                delay = redial.rejected(exc)
            except (OSError, HandshakeError, TimeoutError, ConnectionError) as exc:
                delay = redial.failed(ended, exc)
            await asyncio.sleep(delay)
            # Resolve the names again right before dialling: the fleet's addresses may
            # have changed (while we slept, too).
            await self._follow_names(ring)
            redial.retarget()

    def close(self) -> None:
        """Drop the current connection (``run`` would reconnect: cancel it to stop)."""
        super().close()
        self.binder.close()

