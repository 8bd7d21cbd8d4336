"""Tunnel sessions (seed 000): records in the store, and raw TCP hub ports for tcp ones
(UDP hub ports for udp ones: relay.gateway.agents.udp_hub).

Every session has a lifetime (relay.gateway.agents.session_lifetime: an optional TTL and
an idle timeout, defaults documented there): :class:`TunnelManager` checks them once a
second (:attr:`TunnelManager.sweep_interval`) and closes what is over through
:attr:`TunnelManager.on_expired` (the gateway's close, which also cuts live HTTP
clients). The agent is ``tunnel`` while it has an open session that is not bound to a
task, and returns to ``idle`` when the last such session closes (by the API, the admin
token, expiry, or its agent being gone for good).

A tcp tunnel session gets a hub port: a listener on the gateway host (``hub_host``,
127.0.0.1 by default, an ephemeral port) where every accepted TCP connection becomes one
mux stream to the agent, opened with the metadata
``{"protocol": "tcp", "target": "127.0.0.1:PORT"}`` and relayed with
:class:`~relay.aio.StreamSplice` (Protocol to Protocol, backpressure end to end). The
agent is looked up when each connection arrives, so a hub port keeps working across an
agent reconnect; while the agent is offline connections are closed at once.

In a fleet (docs/FLEET.md) a session's hub port is reserved in the store (one open
session per port, and none a Tunnels API tunnel holds: the gateway that opens it binds
a free port and tries another on a conflict) and every gateway listens on it
(:meth:`TunnelManager.sync_sessions`, told by the ``tunnel_sessions`` events the
:attr:`TunnelManager.session_listeners` publish); every gateway also watches every
session's lifetime, idle timeouts judged on the whole fleet's traffic
(:attr:`TunnelManager.shared_activity`).

If the agent refuses a stream (its allowlist: NOT_ALLOWED; nothing listening:
CONNECT_FAILED) the client's connection is aborted at once and the reason is logged
and kept as the session's ``last_error``.

Checked before a tunnel exists (:meth:`TunnelManager.target_refusal`, answered 4xx by
the API):

* the agent's policy, when its hello reports it (``"allow": ["HOST:PORT", ...]``, an
  empty list meaning loopback hosts only, the stock agents' rule; the targets of its
  declared ``services`` are allowed too; relay.allowlist decides exactly as the agent
  does): a target it would refuse → 403 ``target_not_allowed``, nothing created. The
  stock agents report it unless a subclass decides by its own ``is_allowed``; an agent
  whose hello does not report ``allow`` (such a subclass, an older agent), or that is
  offline, decides alone on every connection (NOT_ALLOWED).
* loops: a target that is the gateway's own listening or hub port (loopback,
  ``localhost`` or unspecified addresses when the agent runs on the gateway's host, or
  not connected so that nobody can tell; any address of the gateway's own host
  otherwise) → 400 ``target_is_gateway``: every connection to such a hub port would
  make the agent connect to a hub port again, until the process ran out of files. A
  target given as a DNS name is resolved here (Tunnels API) and each address judged the
  same way (:meth:`TunnelManager.resolved_loop_refusal`).

At connection time, because hub ports come and go after a tunnel was created, the same
loop check runs for every accepted hub connection (refused: closed at once, with
``last_error``), and a hub port carries at most :data:`MAX_HUB_CONNECTIONS` connections
at once (more are closed at once), which bounds what any loop the checks cannot see
(a name whose DNS answer changes later, a chain through other machines) can consume.
"""
from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections import Counter
from collections.abc import Awaitable, Iterable
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Protocol

from relay.aio import MuxSession, SessionClosedError, StreamRefused, StreamSplice, WebSocketTransport
from relay.aio.stream import MuxStream, abort_with_reset, limit_unsent_on_listener
from relay.allowlist import allowed_by_list, not_allowed_message, parse_allowlist, parse_host_port
from relay.gateway.agents import udp_hub
from relay.gateway.agents.registry import Registry, end_session
from relay.gateway.agents.session_lifetime import DEFAULT_IDLE_TIMEOUT as SESSION_IDLE_TIMEOUT
from relay.gateway.agents.session_lifetime import DEFAULT_TTL as SESSION_TTL
from relay.gateway.agents.session_lifetime import Lifetime
from relay.gateway.egress import EgressPolicy, is_ip_literal
from relay.gateway.store import ConflictError, Store, TunnelSession
from relay.mux.connection import MuxConfig
from relay.mux.datagrams import DEFAULT_IDLE_TIMEOUT
from relay.mux.errors import ErrorCode
from relay.ws.tcp_tunnel import CLOSE_RESET, EOF_MESSAGE, reset_reason

__all__ = ["HubListener", "SharedActivity", "TunnelManager", "policy_refusal"]

log = logging.getLogger("relay.gateway.agents.tunnel_sessions")

DEFAULT_TARGET_PORT = 8188
#: Live connections one hub port carries at most (each holds a socket here, a stream and
#: a socket at the agent); past it new ones are closed at once.
MAX_HUB_CONNECTIONS = 1024
#: How long the check of a target's name may wait for DNS (then the agent decides).
NAME_LOOKUP_TIMEOUT = 2.0
#: Free ports tried for a new session's hub port (a fleet may have recorded a port
#: bound here for another tunnel meanwhile).
HUB_PORT_ATTEMPTS = 8


@dataclass
class HubListener:
    """The hub port of one tunnel (a TCP listener, or a UDP socket for a udp tunnel),
    and its live counters."""

    session_id: str
    team_id: str
    agent_id: str
    target_port: int
    server: Optional[asyncio.AbstractServer] = None
    port: int = 0
    connections: int = 0
    last_error: Optional[str] = None
    splices: set[StreamSplice] = field(default_factory=set)
    #: Host the agent connects to (seed 000 sessions: loopback; Tunnels API: its target).
    target_host: str = "127.0.0.1"
    #: ``tcp`` (a TCP listener; http/https Tunnels API tunnels too) or ``udp``.
    protocol: str = "tcp"
    #: A udp hub's counters (relay.gateway.agents.udp_hub.UdpStats); None for tcp.
    udp: Optional[udp_hub.UdpStats] = None
    #: Address it listens on (set when it listens: the manager's ``hub_host``, or its
    #: ``public_hub_host`` for a public Tunnels API tunnel).
    host: str = ""
    #: The TCP listener caps its sockets' unsent bytes, so every accepted connection
    #: inherits the cap (relay.aio.stream.limit_unsent_on_listener).
    unsent_limited: bool = False

    def __post_init__(self) -> None:
        if self.protocol == "udp" and self.udp is None:
            self.udp = udp_hub.UdpStats()


class _HubSplice(StreamSplice):
    """A splice that leaves its hub's set of live connections when it closes (a
    callback, not a task per connection: idle connections should cost little).

    Given ``manager``, it also keeps why the agent refused its stream, if it does
    (:meth:`TunnelManager._note_refusal`): the refusal reaches the splice as its reset,
    so no task per connection waits for the agent's answer."""

    # No instance dict: one per idle connection would be about 100 bytes.
    __slots__ = ("_hub", "_manager")

    def __init__(self, stream: MuxStream, hub: HubListener, manager: Optional["TunnelManager"] = None) -> None:
        super().__init__(stream)
        self._hub = hub
        self._manager = manager
        hub.splices.add(self)

    def connection_lost(self, exc: Optional[BaseException]) -> None:
        self._hub.splices.discard(self)
        super().connection_lost(exc)

    def _mux_reset(self, exc: BaseException) -> None:
        if self._manager is not None and isinstance(exc, StreamRefused):
            self._manager._note_refusal(self._hub, exc)
        super()._mux_reset(exc)


class _WsTunnelTransport(WebSocketTransport):
    """The WebSocket end of a TCP-over-WS connection (``relay connect``), as its splice's
    transport: binary messages carry the stream's bytes both ways, and the convention of
    relay.ws.tcp_tunnel (docs/PROTOCOL.md section 14.2) carries ends and resets:

    * the text message ``EOF`` from the client ends the stream (FIN after the bytes
      before it); the agent's end is sent as ``EOF`` (``write_eof``); once both
      directions have ended, close 1000 (``close``, after the last byte);
    * close 1000 from the client is its clean end (an ``EOF`` if none came before);
    * a stream reset (or the agent's session ending) is close 4000 (``send_reset``);
      any other close code from the client, or a connection that ends without a closing
      handshake, resets the stream (CANCEL), so the agent resets its target connection.
    """

    session: StreamSplice  # what it carries (see serve_websocket)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._clean = False  # a clean close 1000 was received, or sent by us
        self._reset_sent = False

    def can_write_eof(self) -> bool:
        return True

    def writelines(self, chunks: Any) -> None:
        """Several chunks at once (a splice may batch its writes): one message, since
        message boundaries carry no meaning on a byte stream."""
        self.write(b"".join(chunks))

    def write_eof(self) -> None:
        if not self.is_closing():
            self._transport.write(self._ws.encode_frame(self._ws.Opcode.TEXT, EOF_MESSAGE))

    def close(self) -> None:
        """Both directions ended: close 1000 after the last byte (WebSocketTransport's)."""
        self._clean = True
        super().close()

    def send_reset(self) -> None:
        """The stream was reset: close 4000 with the reason, so ``relay connect`` resets
        its local connection. If bytes are still waiting to go out (a client that does
        not read), the TCP connection is reset at once instead: the client sees a reset
        either way, and a reset need not deliver what was left."""
        if self._reset_sent:
            return
        self._reset_sent = True
        transport = self._transport
        if transport.is_closing():
            return
        if transport.get_write_buffer_size():
            self._close_sent = True
            abort_with_reset(transport)
            return
        self._send_close_code(CLOSE_RESET, reset_reason(self.session.stream.exception))
        transport.close()

    def _send_close_code(self, code: int, reason: str) -> None:
        if not self._close_sent and not self._transport.is_closing():
            ws = self._ws
            self._transport.write(ws.encode_frame(ws.Opcode.CLOSE, ws.encode_close_payload(code, reason)))
        self._close_sent = True

    def _text_received(self, payload: Any) -> bool:
        if bytes(payload) != EOF_MESSAGE:
            return super()._text_received(payload)  # close 1003: a reset (connection_lost)
        if not self.session.eof_received():  # the agent's side had ended: both are done
            self.close()
            return False
        return True

    def _close_received(self, payload: Any) -> None:
        ws = self._ws
        try:
            code, reason = ws.parse_close(payload)
        except ws.WebSocketProtocolError as exc:
            code, reason = exc.close_code, str(exc)
        if code == ws.CloseCode.NORMAL:
            self._clean = True
            self.session.eof_received()  # the client's end, after the bytes before it
        else:
            self.session.stream.abort(ErrorCode.CANCEL, f"the client closed with {code}"
                                      f"{': ' + reason if reason else ''}")
        super()._close_received(payload)

    def eof_received(self) -> None:
        """TCP EOF without a closing handshake: the client went away mid-stream."""
        if not self._clean:
            self.session.stream.abort(ErrorCode.CANCEL, "the client's connection ended without a close")
        return None

    def connection_lost(self, exc: Optional[BaseException]) -> None:
        if exc is None and not self._clean:
            exc = ConnectionResetError("the WebSocket ended without a clean close")
        super().connection_lost(exc)


#: Largest WebSocket message accepted from a TCP-over-WS client. Each message is
#: written to the stream whole, so this bounds what one client can make us buffer.
WS_MAX_MESSAGE = 1024 * 1024


class _Closed(asyncio.Protocol):
    """Protocol for a hub connection that cannot be served: close it at once."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.close()


def policy_refusal(hello: Any, host: str, port: int) -> Optional[str]:
    """Why the agent whose hello is ``hello`` would refuse ``host:port``, if its hello
    reports its policy (``allow``; module docstring), else None."""
    raw = hello.get("allow") if isinstance(hello, dict) else None
    if not isinstance(raw, list) or not all(isinstance(item, str) for item in raw):
        return None  # not reported: the agent decides alone
    try:
        allow = parse_allowlist(raw)
    except ValueError:
        return None
    services = hello.get("services") if isinstance(hello.get("services"), list) else []
    for service in services:
        try:
            if isinstance(service, dict) and parse_host_port(str(service.get("target"))) == (host.lower(), port):
                return None
        except ValueError:
            continue
    if allowed_by_list(allow, host, port):
        return None
    name = hello.get("name") if isinstance(hello.get("name"), str) else "?"
    return not_allowed_message(host.lower(), port, name, allow)


class SharedActivity(Protocol):
    """In a fleet, the tunnel sessions' activity as every gateway saw it
    (relay.gateway.fleet.activity)."""

    async def touch(self, sessions: list[tuple[str, float]]) -> None:
        """``(session id, idle timeout)``: traffic went through these sessions here."""

    async def remaining(self, session_ids: list[str]) -> dict[str, Optional[float]]:
        """Seconds until each session is idle by what the whole fleet saw (0: idle
        now; None or absent: unknown, e.g. Redis is unreachable)."""


class TunnelManager:
    """Opens and closes tunnel sessions and their hub ports."""

    def __init__(self, store: Store, registry: Registry, *, public_url: str,
                 hub_host: str = "127.0.0.1", public_hub_host: str = "0.0.0.0",
                 egress: Optional[EgressPolicy] = None,
                 udp_idle_timeout: float = DEFAULT_IDLE_TIMEOUT,
                 tunnel_domain: Optional[str] = None,
                 session_ttl: float = SESSION_TTL,
                 session_idle_timeout: float = SESSION_IDLE_TIMEOUT) -> None:
        self._store = store
        #: Defaults of a session's ``ttl`` and ``idle_timeout`` (seconds, 0: none).
        self.session_ttl = session_ttl
        self.session_idle_timeout = session_idle_timeout
        #: Open sessions' lifetimes, by session id (task-bound sessions have none).
        self._lifetimes: dict[str, Lifetime] = {}
        #: How often lifetimes are checked, seconds.
        self.sweep_interval = 1.0
        #: In a fleet: the activity of sessions as the whole fleet saw it (a session's
        #: traffic may pass through any gateway; relay.gateway.fleet.activity). None
        #: alone: what this gateway sees is all there is.
        self.shared_activity: Optional[SharedActivity] = None
        self._sweeper: Optional[asyncio.Task[None]] = None
        #: ``fn(session_id) -> (requests so far, live now)`` or None: activity of a
        #: session that has no hub port (the gateway adds its HTTP tunnels').
        self.activity_probes: list[Callable[[str], Optional[tuple[int, int]]]] = []
        #: ``await fn(team_id, agent_id, session_id)`` closes a session that expired.
        self.on_expired: Optional[Callable[[str, str, str], Awaitable[Any]]] = None
        #: With a domain, an http tunnel also gets ``tunnel_host_url`` (relay.gateway.http.tunnel_hosts).
        self.tunnel_domain = tunnel_domain
        #: Knows the gateway's own ports and addresses (loops are refused with it).
        self._egress = egress
        self._registry = registry
        self.public_url = public_url.rstrip("/")
        self.hub_host = hub_host
        #: Where the hub ports of public Tunnels API tunnels (``public: true``) listen:
        #: every interface by default, so other machines reach them whatever ``hub_host``.
        self.public_hub_host = public_hub_host
        #: Seconds without a datagram after which a udp flow ends (relay.mux.datagrams).
        self.udp_idle_timeout = udp_idle_timeout
        self._hubs: dict[str, HubListener] = {}
        #: The ports of ``_hubs``, made on demand (asked on every hub connection, by the
        #: loop check); None after any change to ``_hubs`` or a hub's port.
        self._hub_ports: Optional[frozenset[int]] = None
        #: relay connect's multiplexed sessions, by tunnel session id.
        self._mux_sessions: dict[str, set[MuxSession]] = {}
        self._tasks: set[asyncio.Task] = set()
        #: Tunnel connections accepted since start (hub ports and TCP-over-WS).
        self.connections_total = 0
        #: Streams the agents refused, by error code name (NOT_ALLOWED, CONNECT_FAILED ...).
        self.refused: Counter[str] = Counter()
        #: Called with the ids of the sessions :meth:`close` closed (a fleet tells the
        #: other gateways, which cut their own connections through them).
        self.closed_listeners: list[Callable[[list[str]], None]] = []
        #: Called with ``(team_id, agent_id, session_ids, opened)`` when :meth:`open`
        #: opened a session (``opened`` True) or :meth:`close` closed some (a fleet
        #: tells the other gateways: they listen on its hub port, and the gateway
        #: holding the agent sets its status).
        self.session_listeners: list[Callable[[str, str, list[str], bool], None]] = []
        #: Seed 000 sessions whose hub port listens here, and why the port of one could
        #: not be bound (in a fleet every gateway listens on every session's hub port:
        #: :meth:`sync_sessions`).
        self._session_hubs: set[str] = set()
        self._sync_errors: dict[str, str] = {}
        #: Serialises what opens and closes session hub ports (an open must not race a
        #: sync pass that read the store before it).
        self._sessions_lock = asyncio.Lock()
        #: In a fleet, hub ports are bound with SO_REUSEPORT, so gateways on one host
        #: can all listen on a tunnel's port (and a restart never finds it taken).
        self.reuse_port = False

    # -- checks before a tunnel exists

    def _agent_on_this_host(self, team_id: str, agent_id: str) -> bool:
        """Does the agent run on the gateway's host? Unknown (offline) counts as yes."""
        entry = self._registry.get(team_id, agent_id)
        peer = entry.session.get_extra_info("peername") if entry is not None else None
        if not peer or self._egress is None:
            return True
        return self._egress.is_own_host(str(peer[0]))

    def loop_refusal(self, team_id: str, agent_id: str, host: str, port: int,
                     future_ports: Iterable[int] = ()) -> Optional[str]:
        """Why a tunnel through this agent to ``host:port`` would loop into the gateway's
        own listening or hub port (or one of ``future_ports``, about to listen), or None
        (module docstring)."""
        egress = self._egress
        if egress is None:
            return None
        # Asked for every hub connection: a target port the gateway does not listen on
        # (the usual case) is answered before the agent's address is looked at.
        if not egress.is_own_port(port) and port not in future_ports:
            return None
        if egress.is_gateway(host, port, from_this_host=self._agent_on_this_host(team_id, agent_id),
                             future_ports=future_ports):
            return (f"{host}:{port} is this gateway's own listening or hub port "
                    f"as seen from the agent: a tunnel to it would connect to itself for ever")
        return None

    async def resolved_loop_refusal(self, team_id: str, agent_id: str, host: str, port: int,
                                    future_ports: Iterable[int] = ()) -> Optional[str]:
        """:meth:`loop_refusal` for a target given as a DNS name: the name is resolved
        (as an agent on this host would resolve it) and each address judged. Only for
        the gateway's own ports; a name that does not resolve here is left to the agent."""
        if self._egress is None or is_ip_literal(host):
            return None
        ports = set(self._egress.own_ports()) | set(future_ports)
        if port not in ports:
            return None
        try:
            async with asyncio.timeout(NAME_LOOKUP_TIMEOUT):
                infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except (OSError, TimeoutError):
            return None
        for address in dict.fromkeys(str(info[4][0]) for info in infos):
            loop = self.loop_refusal(team_id, agent_id, address, port, future_ports)
            if loop is not None:
                return f"{host} resolves to {address}: {loop}"
        return None

    def target_refusal(self, team_id: str, agent_id: str, host: str, port: int,
                       future_ports: Iterable[int] = ()) -> Optional[tuple[int, str, str]]:
        """``(status, code, message)`` if a tunnel to ``host:port`` must not open: a loop
        (400 ``target_is_gateway``) or a target the connected agent does not allow (403
        ``target_not_allowed``); None otherwise (module docstring)."""
        loop = self.loop_refusal(team_id, agent_id, host, port, future_ports)
        if loop is not None:
            return 400, "target_is_gateway", loop
        entry = self._registry.get(team_id, agent_id)
        reason = policy_refusal(entry.session.peer_info if entry is not None else None, host, port)
        if reason is not None:
            return 403, "target_not_allowed", reason
        return None

    # -- API operations

    async def open(self, team_id: str, agent_id: str, target_port: int,
                   protocol: str, host_header: Optional[str] = None, *,
                   ttl: Optional[float] = None, idle_timeout: Optional[float] = None,
                   task_id: Optional[str] = None) -> dict[str, Any]:
        """Open a session on a connected agent; returns the seed 000 response (plus
        ``hub_port`` for tcp and udp, ``expires_at`` and ``idle_timeout``). The caller has
        checked that the agent is online. ``host_header`` (http): the Host the target
        gets instead of the client's. ``ttl``/``idle_timeout``: seconds, None for the
        defaults, 0 for none (relay.gateway.agents.session_lifetime). ``task_id``: the
        session belongs to that task (no lifetime of its own; the agent's status is
        left as it is: busy with the task)."""
        lifetime: Optional[Lifetime] = None
        metadata: dict[str, Any] = {"host_header": host_header} if host_header else {}
        if task_id is not None:
            metadata["task_id"] = task_id
        else:
            ttl = self.session_ttl if ttl is None else ttl
            idle = self.session_idle_timeout if idle_timeout is None else idle_timeout
            lifetime = Lifetime(team_id, agent_id, time.time() + ttl if ttl else None,
                                idle, asyncio.get_running_loop().time())
            metadata.update(lifetime.metadata())
        async with self._sessions_lock:
            session, access, admin, hub = await self._create(team_id, agent_id, target_port, protocol,
                                                             metadata)
            if lifetime is not None:
                self._lifetimes[session.session_id] = lifetime
            if hub is not None:
                hub.session_id = session.session_id
                self._hubs[session.session_id] = hub
                self._hub_ports = None
                self._session_hubs.add(session.session_id)
        result: dict[str, Any] = {
            "session_id": session.session_id,
            "tunnel_url": self.tunnel_url(str(access), protocol),
            "admin_token": str(admin),
            "tunnel_protocol": protocol,
            **_lifetime_fields(metadata),
        }
        if protocol == "http" and self.tunnel_domain:
            from relay.gateway.http.tunnel_hosts import tunnel_host_url

            host_url = tunnel_host_url(str(access), self.tunnel_domain, self.public_url)
            if host_url is not None:
                result["tunnel_host_url"] = host_url
        agent = self._registry.get(team_id, agent_id)
        if agent is not None:  # its hello says --terminal: the admin_token opens a shell there
            from relay.gateway.web.terminal import terminal_enabled, terminal_url

            if terminal_enabled(agent.session.peer_info):
                result["terminal_url"] = terminal_url(self.public_url, str(access))
        if hub is not None:
            result["hub_port"] = hub.port
            log.info("%s tunnel %s: hub port %s:%d -> agent %s 127.0.0.1:%d", protocol,
                     session.session_id, self.hub_host, hub.port, agent_id, target_port)
        else:
            log.info("http tunnel %s -> agent %s port %d", session.session_id, agent_id, target_port)
        if task_id is None:
            self._registry.set_status(team_id, agent_id, "tunnel")
        self._tell(team_id, agent_id, [session.session_id], True)
        return result

    async def _create(self, team_id: str, agent_id: str, target_port: int, protocol: str,
                      metadata: dict[str, Any]) -> tuple[TunnelSession, Any, Any, Optional[HubListener]]:
        """The session's row and, for tcp and udp, its hub port: a free port bound here,
        then reserved in the store with the row. In a fleet the store refuses a port
        another gateway recorded meanwhile (for a session or a Tunnels API tunnel:
        every gateway listens on both), and another port is tried."""
        for attempt in range(HUB_PORT_ATTEMPTS):
            hub: Optional[HubListener] = None
            if protocol in ("tcp", "udp"):
                hub = HubListener("", team_id, agent_id, target_port, protocol=protocol)
                await self._listen(hub)
            try:
                session, access, admin = await self._store.create_tunnel_session(
                    team_id, agent_id, target_port, protocol, hub_port=hub.port if hub else None,
                    metadata=metadata or None)
            except ConflictError:
                if hub is None or attempt == HUB_PORT_ATTEMPTS - 1:
                    raise
                log.info("%s tunnel: hub port %d is another tunnel's in the store; trying another",
                         protocol, hub.port)
                self._stop_hub(hub)
                continue
            except BaseException:
                if hub is not None:
                    self._stop_hub(hub)
                raise
            return session, access, admin, hub
        raise AssertionError("unreachable")

    def _tell(self, team_id: str, agent_id: str, session_ids: list[str], opened: bool) -> None:
        for listener in list(self.session_listeners):
            try:
                listener(team_id, agent_id, session_ids, opened)
            except Exception:
                log.exception("tunnel session listener failed")

    async def close(self, team_id: str, agent_id: str, session_id: Optional[str] = None) -> list[str]:
        """Close one session (``session_id``) or all of the agent's; returns the closed ids.
        The agent returns to idle when none is left."""
        async with self._sessions_lock:  # a sync pass must not reopen what closes here
            if session_id is not None:
                row = await self._store.get_tunnel_session(team_id, session_id)
                if row is None or row.agent_id != agent_id or not row.is_open:
                    return []
                # The hub port stops before the store says closed: whoever reads "closed"
                # there must find the port refusing, not a listener still draining.
                self._close_hub(session_id)
                self._lifetimes.pop(session_id, None)
                if not await self._store.close_tunnel_session(team_id, session_id):
                    return []  # another gateway of a fleet closed it first (and tells the others)
                closed = [session_id]
            else:
                for row in await self._store.list_tunnel_sessions(team_id, agent_id):
                    self._close_hub(row.session_id)
                closed = await self._store.close_tunnel_sessions(team_id, agent_id)
            for sid in closed:
                self._close_hub(sid)
                self._lifetimes.pop(sid, None)
        entry = self._registry.get(team_id, agent_id)
        # Back to idle only from ``tunnel``: an agent busy with a task stays busy (the
        # task's end makes it idle), and a task's own session never held it.
        if entry is not None and entry.status == "tunnel" \
                and not holds_agent(await self._store.list_tunnel_sessions(team_id, agent_id)):
            self._registry.set_status(team_id, agent_id, "idle")
        if closed:
            for listener in list(self.closed_listeners):
                listener(closed)
            self._tell(team_id, agent_id, closed, False)
        return closed

    def closed_elsewhere(self, session_ids: Iterable[str]) -> None:
        """Another gateway closed these sessions: stop our hub ports for them."""
        for sid in session_ids:
            self._close_hub(sid)  # our hub port and our relay connect sessions
            self._lifetimes.pop(sid, None)

    async def sync_sessions(self) -> None:
        """In a fleet: listen on the hub port of every open tcp (udp) session of the
        store, whichever gateway opened it, stop listening on those of sessions closed
        anywhere, and watch every open session's lifetime (:meth:`sweep`). Idempotent;
        a port another program holds here is logged once and tried again next pass
        (the other gateways serve it meanwhile)."""
        now = asyncio.get_running_loop().time()
        async with self._sessions_lock:
            rows = {row.session_id: row for row in await self._store.list_tunnel_sessions(None)}
            for sid in list(self._session_hubs):
                if sid not in rows:
                    self._close_hub(sid)
            for sid in list(self._lifetimes):
                if sid not in rows:
                    del self._lifetimes[sid]
            for sid in list(self._sync_errors):
                if sid not in rows:
                    del self._sync_errors[sid]
            for sid, row in rows.items():
                lifetime = self._lifetime_of(row, now)
                if lifetime is not None and sid not in self._lifetimes:
                    self._lifetimes[sid] = lifetime
                if row.protocol not in ("tcp", "udp") or not row.hub_port or sid in self._hubs:
                    continue
                hub = HubListener(sid, row.team_id, row.agent_id, row.target_port, protocol=row.protocol)
                try:
                    await self._listen(hub, row.hub_port, exact=True)
                except OSError as exc:
                    error = f"cannot listen on hub port {row.hub_port}: {exc.strerror or exc}"
                    if self._sync_errors.get(sid) != error:
                        log.warning("%s tunnel %s: %s", row.protocol, sid, error)
                    self._sync_errors[sid] = error
                    continue
                self._sync_errors.pop(sid, None)
                self._hubs[sid] = hub
                self._hub_ports = None
                self._session_hubs.add(sid)
                log.info("%s tunnel %s: hub port %s:%d -> agent %s 127.0.0.1:%d (opened elsewhere)",
                         row.protocol, sid, self.hub_host, hub.port, row.agent_id, row.target_port)

    def _lifetime_of(self, row: TunnelSession, now: float) -> Optional[Lifetime]:
        """The lifetime of a session read from the store (its idle clock starts at
        ``now``); None for a task's session."""
        meta = row.metadata if isinstance(row.metadata, dict) else {}
        if meta.get("task_id"):
            return None
        expires_at = meta.get("expires_at")
        idle = meta.get("idle_timeout")
        idle = float(idle) if isinstance(idle, (int, float)) else self.session_idle_timeout
        return Lifetime(row.team_id, row.agent_id,
                        float(expires_at) if isinstance(expires_at, (int, float)) else None, idle, now)

    async def sessions(self, team_id: str, agent_id: str) -> list[dict[str, Any]]:
        """The agent's open sessions, for the API (no tokens: they are not stored)."""
        return [self._describe(row) for row in await self._store.list_tunnel_sessions(team_id, agent_id)]

    def hubs(self) -> list[HubListener]:
        """The live hub listeners (for metrics)."""
        return list(self._hubs.values())

    def hub_ports(self) -> frozenset[int]:
        """The ports the live hub listeners are bound to."""
        ports = self._hub_ports
        if ports is None:
            ports = self._hub_ports = frozenset(hub.port for hub in self._hubs.values() if hub.port)
        return ports

    def hub(self, session_id: str) -> Optional[HubListener]:
        return self._hubs.get(session_id)

    def tunnel_url(self, token: str, protocol: str) -> str:
        """``http(s)://HOST/tunnel/TOKEN/`` or, for tcp (udp), ``ws(s)://HOST/tunnel/TOKEN/tcp``
        (``.../udp``)."""
        if protocol in ("tcp", "udp"):
            base = self.public_url
            if base.startswith("https://"):
                base = "wss://" + base[len("https://"):]
            elif base.startswith("http://"):
                base = "ws://" + base[len("http://"):]
            return f"{base}/tunnel/{token}/{protocol}"
        return f"{self.public_url}/tunnel/{token}/"

    async def restore(self) -> None:
        """At start: reopen hub ports of tcp sessions left open by the last run, on the
        same port when it is free (else the session is closed: its URL would lie), and
        take up every open session's lifetime (relay.gateway.agents.session_lifetime:
        the TTL goes on, the idle clock starts afresh). Sessions of tasks, which ended
        with the last run (relay.gateway.api.tasks), are closed. In a fleet the other
        gateways serve these sessions too: a port that cannot be bound here is tried
        again later (:meth:`sync_sessions`) rather than closing the session, and task
        sessions are left to the gateway that owns their task."""
        now = asyncio.get_running_loop().time()
        for team in await self._store.list_teams():
            for row in await self._store.list_tunnel_sessions(team.id):
                lifetime = self._lifetime_of(row, now)
                if lifetime is None:  # a task's session: the task ended with the last run
                    if self.reuse_port:  # in a fleet, only its gateway's tasks did (tasks.start)
                        continue
                    await self._store.close_tunnel_session(row.team_id, row.session_id)
                    continue
                self._lifetimes[row.session_id] = lifetime
                if row.protocol not in ("tcp", "udp"):
                    continue
                hub = HubListener(row.session_id, row.team_id, row.agent_id, row.target_port,
                                  protocol=row.protocol)
                try:
                    await self._listen(hub, row.hub_port or 0, exact=True)
                except OSError as exc:
                    if self.reuse_port:  # in a fleet the others serve it: retried (sync_sessions)
                        log.warning("tcp tunnel %s: cannot reopen hub port %s here (%s)",
                                    row.session_id, row.hub_port, exc)
                        continue
                    log.warning("tcp tunnel %s: cannot reopen hub port %s (%s); closing it",
                                row.session_id, row.hub_port, exc)
                    await self._store.close_tunnel_session(row.team_id, row.session_id)
                    self._lifetimes.pop(row.session_id, None)
                    continue
                self._hubs[row.session_id] = hub
                self._hub_ports = None
                self._session_hubs.add(row.session_id)
                log.info("tcp tunnel %s: hub port %s:%d reopened", row.session_id, self.hub_host, hub.port)

    # -- lifetimes

    def start_sweeping(self) -> None:
        """Check lifetimes every :attr:`sweep_interval` seconds until :meth:`shutdown`."""
        if self._sweeper is None:
            self._sweeper = asyncio.get_running_loop().create_task(self._sweep_forever())

    async def _sweep_forever(self) -> None:
        while True:
            await asyncio.sleep(self.sweep_interval)
            try:
                await self.sweep()
            except Exception:  # a store hiccup: the next sweep tries again
                log.exception("checking tunnel session lifetimes failed")

    def _activity(self, session_id: str) -> tuple[int, int]:
        """(connections/requests so far, open now) of a session."""
        hub = self._hubs.get(session_id)
        count, live = 0, 0
        if hub is not None:
            count, live = hub.connections, len(hub.splices)
            if hub.udp is not None:
                count += hub.udp.flows
                live += len(hub.udp.live)
        for probe in self.activity_probes:
            found = probe(session_id)
            if found is not None:
                count, live = count + found[0], live + found[1]
        return count, live

    async def sweep(self) -> list[str]:
        """Close the sessions whose TTL passed or that have been idle too long; returns
        their ids. In a fleet, a session idle here is idle only if no other gateway saw
        traffic through it meanwhile (:attr:`shared_activity`), and the activity seen
        here is shared with the others."""
        now, monotonic = time.time(), asyncio.get_running_loop().time()
        over: list[tuple[str, Lifetime, str]] = []
        shared = self.shared_activity
        to_share: list[tuple[str, float]] = []
        idle_here: list[str] = []
        for sid, lifetime in list(self._lifetimes.items()):
            why = lifetime.why_over(now, monotonic, *self._activity(sid))
            if shared is not None and lifetime.share_due(monotonic):
                to_share.append((sid, lifetime.idle_timeout))
            if why == "idle" and shared is not None:
                idle_here.append(sid)
            elif why is not None:
                over.append((sid, lifetime, why))
        if to_share:
            assert shared is not None
            await shared.touch(to_share)
        if idle_here:
            assert shared is not None
            left = await shared.remaining(idle_here)
            for sid in idle_here:
                found = self._lifetimes.get(sid)
                if found is not None and found.idle_elsewhere(monotonic, left.get(sid)):
                    over.append((sid, found, "idle"))
        closed = []
        for sid, lifetime, why in over:
            if self._lifetimes.pop(sid, None) is None:
                continue  # closed meanwhile
            log.info("tunnel session %s of agent %s closed: %s", sid, lifetime.agent_id,
                     "its ttl passed" if why == "ttl" else f"idle for {lifetime.idle_timeout:g}s")
            if self.on_expired is not None:
                await self.on_expired(lifetime.team_id, lifetime.agent_id, sid)
            else:
                await self.close(lifetime.team_id, lifetime.agent_id, sid)
            closed.append(sid)
        return closed

    async def shutdown(self) -> None:
        """Stop every hub listener (sessions stay open in the store for the next start)."""
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        for hub in list(self._hubs.values()):
            self._stop_hub(hub)
        self._hubs.clear()
        self._hub_ports = None
        for sessions in list(self._mux_sessions.values()):
            for session in list(sessions):
                session.abort(ErrorCode.GOING_AWAY, "gateway shutting down")
        self._mux_sessions.clear()
        for task in list(self._tasks):
            task.cancel()

    # -- hub ports

    async def open_hub(self, key: str, team_id: str, agent_id: str, target_host: str,
                       target_port: int, port: int = 0, protocol: str = "tcp",
                       public: bool = False) -> HubListener:
        """Listen on a hub port that is not a seed 000 session: a Tunnels API tunnel, keyed
        by its id. ``port`` 0 picks a free one; ``protocol`` ``udp`` binds a UDP hub port,
        anything else a TCP one; ``public`` binds it on :attr:`public_hub_host` instead of
        :attr:`hub_host`. Raises OSError if it cannot be bound. Stopped by
        :meth:`close_hub` (or :meth:`shutdown`)."""
        self._close_hub(key)
        hub = HubListener(key, team_id, agent_id, target_port, target_host=target_host,
                          protocol="udp" if protocol == "udp" else "tcp",
                          host=self.public_hub_host if public else self.hub_host)
        await self._listen(hub, port, exact=True)
        self._hubs[key] = hub
        self._hub_ports = None
        return hub

    def close_hub(self, key: str) -> None:
        """Stop the hub listener ``key`` (new connections are refused, live ones aborted)."""
        self._close_hub(key)

    async def _listen(self, hub: HubListener, port: int = 0, exact: bool = False) -> None:
        loop = asyncio.get_running_loop()
        hub.host = hub.host or self.hub_host
        if hub.protocol == "udp":
            # In a fleet, shared like TCP hub ports: the kernel keeps each client address
            # on one socket (a hash of the addresses), so a flow stays on one gateway.
            transport, _ = await loop.create_datagram_endpoint(
                lambda: udp_hub.UdpHubProtocol(self, hub), local_addr=(hub.host, port),
                reuse_port=self.reuse_port or None)
            udp_hub.size_buffers(transport)
            hub.server = transport  # type: ignore[assignment]  # close() stops it alike
            hub.port = transport.get_extra_info("sockname")[1]
            self._hub_ports = None
            return
        hub.server = await loop.create_server(lambda: self._hub_protocol(hub), hub.host, port,
                                              reuse_port=self.reuse_port or None)
        hub.port = hub.server.sockets[0].getsockname()[1]
        hub.unsent_limited = limit_unsent_on_listener(hub.server)
        self._hub_ports = None

    def serve_websocket(self, hub: HubListener, transport: asyncio.Transport, leftover: bytes) -> bool:
        """Run a TCP-over-WS connection (its 101 already sent): one stream to the agent,
        bytes in binary messages. False (and the transport closed) if the agent is gone.
        On a udp hub, one flow whose datagrams are the binary messages (relay.gateway.agents.udp_hub)."""
        if hub.protocol == "udp":
            udp_hub.serve_websocket(self, hub, transport, leftover)
            return True
        splice = self._splice(hub)
        if splice is None:
            transport.close()
            return False
        _WsTunnelTransport.attach(transport, splice, client=False, initial=leftover,
                                  max_message_size=WS_MAX_MESSAGE)
        transport.resume_reading()  # the HTTP layer paused it while the request was handled
        return True

    def _hub_protocol(self, hub: HubListener) -> asyncio.BaseProtocol:
        """One accepted hub connection -> one stream to the agent (or an instant close)."""
        splice = self._splice(hub)
        if splice is None:
            return _Closed()
        splice.unsent_limited = hub.unsent_limited  # accepted from the hub's listener: inherited
        # Compiled, StreamSplice is an extension type, which cannot subclass asyncio.Protocol.
        return splice  # type: ignore[return-value]  # a duck-typed protocol (see above)

    def _splice(self, hub: HubListener) -> Optional[StreamSplice]:
        """Open a stream to the tunnel's target and its splice; None if it cannot be
        opened (:meth:`open_target_stream`)."""
        stream = self.open_target_stream(hub)
        if stream is None:
            return None
        return _HubSplice(stream, hub, self)

    def open_target_stream(self, hub: HubListener) -> Optional[MuxStream]:
        """Open a stream to the tunnel's target, counted as one of the hub's connections;
        None if the agent is not connected, the target loops into the gateway, or the hub
        port is full (module docstring; the reason is kept as ``hub.last_error``). The
        caller makes it one of ``hub.splices`` (:class:`_HubSplice`)."""
        agent = self._registry.get(hub.team_id, hub.agent_id)
        if agent is None:
            hub.last_error = "agent offline"
            log.info("tcp tunnel %s: connection closed: agent %s is offline", hub.session_id, hub.agent_id)
            return None
        if len(hub.splices) >= MAX_HUB_CONNECTIONS:
            hub.last_error = f"more than {MAX_HUB_CONNECTIONS} connections at once"
            log.warning("tcp tunnel %s: connection closed: %s", hub.session_id, hub.last_error)
            return None
        loop = self.loop_refusal(hub.team_id, hub.agent_id, hub.target_host, hub.target_port)
        if loop is not None:  # e.g. a hub port bound after the tunnel was created
            hub.last_error = f"refused: {loop}"
            log.warning("tcp tunnel %s: connection closed: %s", hub.session_id, loop)
            return None
        session: MuxSession = agent.session
        try:
            host = f"[{hub.target_host}]" if ":" in hub.target_host else hub.target_host
            stream = session.open_stream_nowait(
                {"protocol": "tcp", "target": f"{host}:{hub.target_port}"})
        except (SessionClosedError, ConnectionError) as exc:
            hub.last_error = str(exc)
            return None
        hub.connections += 1
        self.connections_total += 1
        return stream

    def _watch(self, hub: HubListener, stream: MuxStream,
               on_accepted: Optional[Callable[[], None]] = None) -> None:
        """Keep why the agent refuses ``stream``, if it does, else call ``on_accepted``
        (a task until its answer)."""
        task = asyncio.get_running_loop().create_task(self._watch_answer(hub, stream, on_accepted))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _watch_answer(self, hub: HubListener, stream: MuxStream,
                            on_accepted: Optional[Callable[[], None]] = None) -> None:
        """Log why the agent refused a stream (the splice already aborted the client)."""
        try:
            await stream.wait_accepted()
            if on_accepted is not None:
                on_accepted()
        except StreamRefused as exc:
            self._note_refusal(hub, exc)
        except ConnectionError:
            pass  # reset or session gone: the splice handles it

    def _note_refusal(self, hub: HubListener, exc: StreamRefused) -> None:
        """Keep and log why the agent refused a stream of ``hub``."""
        try:
            code = ErrorCode(exc.error_code).name
        except ValueError:
            code = str(exc.error_code)
        hub.last_error = f"{code}: {exc.message}"
        self.refused[code] += 1
        log.warning("%s tunnel %s: agent refused the %s: %s", hub.protocol, hub.session_id,
                    "flow" if hub.protocol == "udp" else "connection", hub.last_error)

    def _close_hub(self, session_id: str) -> None:
        self._session_hubs.discard(session_id)
        hub = self._hubs.pop(session_id, None)
        self._hub_ports = None
        if hub is not None:
            self._stop_hub(hub)
            log.info("%s tunnel %s closed (hub port %d)", hub.protocol, session_id, hub.port)
        for session in self._mux_sessions.pop(session_id, ()):
            end_session(session, ErrorCode.NOT_ALLOWED, "the tunnel was closed")

    # -- relay connect's multiplexed sessions (relay.gateway.agents.tunnel_mux)

    def serve_mux(self, hub: HubListener, transport: asyncio.Transport, leftover: bytes,
                  config: Optional[MuxConfig] = None) -> None:
        """Run a multiplexed session on a tcp tunnel URL (its 101 with the subprotocol
        already sent): every stream the client opens is one connection to the target.
        It ends when the tunnel closes (here or, in a fleet, at another gateway)."""
        from relay.gateway.agents.tunnel_mux import start_tunnel_mux

        session = start_tunnel_mux(self, hub, transport, leftover, config)
        sessions = self._mux_sessions.setdefault(hub.session_id, set())
        sessions.add(session)
        task = asyncio.get_running_loop().create_task(session.wait_closed())
        self._tasks.add(task)

        def forget(_: object) -> None:
            self._tasks.discard(task)
            live = self._mux_sessions.get(hub.session_id)
            if live is not None:
                live.discard(session)
                if not live:
                    del self._mux_sessions[hub.session_id]

        task.add_done_callback(forget)

    def mux_sessions(self, session_id: str) -> int:
        """How many ``relay connect`` sessions run on the tunnel ``session_id`` here."""
        return len(self._mux_sessions.get(session_id, ()))

    @staticmethod
    def _stop_hub(hub: HubListener) -> None:
        if hub.server is not None:
            hub.server.close()
        for splice in list(hub.splices):
            splice.abort()
        hub.splices.clear()

    def _describe(self, row: TunnelSession) -> dict[str, Any]:
        hub = self._hubs.get(row.session_id)
        return {
            "session_id": row.session_id,
            "agent_id": row.agent_id,
            "target_port": row.target_port,
            "tunnel_protocol": row.protocol,
            "hub_port": row.hub_port,
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(row.created_at)),
            **_lifetime_fields(row.metadata if isinstance(row.metadata, dict) else {}),
            "connections": hub.connections if hub else 0,
            "active_connections": len(hub.splices) if hub else 0,
            "connect_sessions": self.mux_sessions(row.session_id),
            "last_error": hub.last_error if hub else None,
            **({"udp": hub.udp.as_dict()} if hub is not None and hub.udp is not None else {}),
        }


def holds_agent(sessions: Iterable[TunnelSession]) -> bool:
    """Do these open sessions keep their agent in status ``tunnel``? (A task's own
    session does not: the task keeps it busy, and the session ends with it.)"""
    return any(not (isinstance(row.metadata, dict) and row.metadata.get("task_id")) for row in sessions)


def _lifetime_fields(metadata: dict[str, Any]) -> dict[str, Any]:
    """A session's ``expires_at`` (ISO, or None), ``idle_timeout`` (seconds; 0 none) and
    ``task_id`` (task-bound sessions) for API answers."""
    if metadata.get("task_id"):
        return {"task_id": metadata["task_id"], "expires_at": None, "idle_timeout": 0}
    expires_at = metadata.get("expires_at")
    return {"expires_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(expires_at))
            if isinstance(expires_at, (int, float)) else None,
            "idle_timeout": metadata.get("idle_timeout", 0)}
