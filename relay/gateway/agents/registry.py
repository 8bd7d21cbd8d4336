"""Connected agents: who is online in which team, and the MuxSession that reaches each.

The store keeps every agent ever seen (with its last status); this registry keeps only
the live connections. An agent's identity is stable across reconnects: its id is
``uuid5(credential id, name)``, so the same key and ``--name`` is the same agent after a
restart of either side, and two agents of one team need different names (or keys).

One connection per identity, and the one that holds it keeps it (:meth:`Registry.admit`).
A second connection with the same key and name is either the same agent coming back
(its hello carries the ``instance`` id of the process, unchanged across its reconnects),
a restarted agent whose old connection the gateway has not seen die yet, or a clone (a
copied machine: the default name is the host name, so clones collide). The same
instance replaces its old connection at once. Otherwise the holder gets a PING: if it
answers within :data:`PROBE_TIMEOUT` it is alive, and the newcomer is refused with a
GOAWAY ``NOT_ALLOWED`` "agent name ... is already connected" (a WARNING here; the
refused agent logs it at ERROR and retries with a growing delay); if not, it was dead
and is replaced. So two live clones never knock each other off: the first keeps the
name and all traffic, the second waits until the first goes away. In a fleet the rule
holds across gateways: a newcomer of another process is refused while a session of the
holder at another gateway answers a PING there (:attr:`Registry.admission`,
relay.gateway.fleet.clones).

An agent may hold sessions to several gateways of a fleet at once (``relay agent
--connections``); its hello then says which of its connections this is
(``connection``). Two of them reaching the same gateway (two URLs or addresses of one
gateway) is not a reconnect: while the first answers a PING, the second is refused
with a GOAWAY ``REFUSED`` (not ``NOT_ALLOWED``: nothing is wrong with the agent) and
tries another gateway. One gateway holds one session per agent; the fleet's registry
holds the list of its gateways (relay.gateway.fleet.registry).

The store's agent rows follow the live entries: written when an agent is admitted
(awaited: a store failure refuses the agent), and on every status change and
disconnect through one ordered queue (:class:`StoreWrites`), so callers on the event
loop's synchronous paths never wait for the database and the rows still end in the
order the changes happened. The live status is the registry's; the API shows it for
connected agents.

What the agent says about itself travels in its mux SETTINGS ``info`` (see
docs/PROTOCOL.md): ``{"name": str, "labels": [str, ...], "version": str, "instance":
str}``. Once
registered, the gateway sends the control message
``{"type": "welcome", "agent_id": ..., "team_id": ...}`` so the agent can log who it is.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, TypeVar

from relay.aio import MuxSession
from relay.gateway.store import Agent, Store
from relay.gateway.web.terminal import terminal_enabled
from relay.mux.errors import ErrorCode

__all__ = ["AgentNameTaken", "ConnectedAgent", "Registry", "StoreWrites", "agent_identity", "answers_ping",
           "end_session", "peer_address"]

T = TypeVar("T")

log = logging.getLogger("relay.gateway.agents")

MAX_NAME = 100
MAX_LABELS = 64
MAX_LABEL = 100
MAX_INSTANCE = 64
#: A connected agent whose identity another connection claims must answer a PING within
#: this time to keep it (a live agent answers in one round trip; a dead one never does).
PROBE_TIMEOUT = 3.0
#: A session the gateway ends (revoked credential, refused duplicate) has this long to
#: flush its GOAWAY and stream resets before its transport is aborted regardless: a peer
#: that does not read must not keep it open.
END_GRACE = 1.0


def end_session(session: MuxSession, error_code: int, message: str) -> None:
    """End an agent's session now and say why: a GOAWAY with ``error_code`` and
    ``message``, every open stream reset with the same reason (their clients are cut at
    once, not drained), the transport closed once that is written, aborted after
    :data:`END_GRACE` at the latest."""
    if session.is_closed:
        return
    session.close(error_code, message)  # GOAWAY first, so the peer learns the reason
    for stream in list(session.streams.values()):
        stream.abort(error_code, message)
    asyncio.get_running_loop().call_later(END_GRACE, session.abort, error_code, message)


@dataclass
class ConnectedAgent:
    """One live agent connection."""

    agent_id: str
    team_id: str
    name: str
    labels: list[str]
    version: str
    session: MuxSession
    connected_at: float = field(default_factory=time.time)
    peer: Any = None
    #: Live status (idle, busy, tunnel, unhealthy), as last set through the registry.
    status: str = "idle"
    #: The credential the agent connected with (revoking it ends the session).
    credential_id: Optional[str] = None
    #: The agent process's instance id from its hello ("" if it sent none).
    instance: str = ""
    #: Which of the agent's connections this is (relay.agent.gateways; None: not said).
    connection: Optional[int] = None
    #: Bumped by every status change: a status decided after a wait (see
    #: relay.gateway.app.Gateway.rest) is applied only if nothing changed meanwhile.
    status_seq: int = 0
    #: True for an agent held by another gateway of a fleet (its ``session`` forwards
    #: streams; control messages go as control requests, relay.gateway.fleet.control).
    remote: bool = False


class AgentNameTaken(Exception):
    """Another live connection holds this agent identity (same key and name): the
    newcomer is ended with a GOAWAY ``error_code`` (NOT_ALLOWED: another process holds
    the name; REFUSED: the same process holds it through another of its connections)."""

    def __init__(self, holder: Optional[ConnectedAgent], message: str,
                 error_code: int = ErrorCode.NOT_ALLOWED) -> None:
        super().__init__(message)
        self.holder = holder
        self.message = message
        self.error_code = error_code


def agent_instance(info: Any) -> str:
    """The ``instance`` id from an agent's hello ("" if absent or malformed)."""
    instance = info.get("instance") if isinstance(info, dict) else None
    return instance[:MAX_INSTANCE] if isinstance(instance, str) else ""


def agent_connection(info: Any) -> Optional[int]:
    """Which of its connections the agent says this is (``connection`` in its hello;
    None if absent or malformed: an agent holding one connection at a time)."""
    connection = info.get("connection") if isinstance(info, dict) else None
    return connection if isinstance(connection, int) and not isinstance(connection, bool) and \
        0 <= connection < 1024 else None


def agent_identity(info: Any) -> tuple[str, list[str], str]:
    """``(name, labels, version)`` from an agent's SETTINGS info, sanitised: anything
    malformed is replaced by a default rather than rejected, so an old or odd agent
    still connects."""
    info = info if isinstance(info, dict) else {}
    name = _text(info.get("name")).strip()[:MAX_NAME] or "agent"
    raw_labels = info.get("labels")
    labels: list[str] = []
    if isinstance(raw_labels, (list, tuple)):
        labels = sorted({_text(lbl)[:MAX_LABEL] for lbl in raw_labels if _text(lbl)})[:MAX_LABELS]
    version = _text(info.get("version"))[:50]
    return name, labels, version


def _text(value: Any) -> str:
    """``value`` if a string, without control characters and lone surrogates (which no
    database stores as text); "" otherwise."""
    if not isinstance(value, str):
        return ""
    if value.isprintable() and value.isascii():
        return value
    return "".join(c for c in value if c.isprintable() and not 0xD800 <= ord(c) <= 0xDFFF)


class StoreWrites:
    """Store writes made one at a time, in the order they were submitted, by one task:
    for paths that cannot wait (a status change in a control-message callback) but
    whose writes must not overtake each other."""

    def __init__(self) -> None:
        self._queue: deque[tuple[Callable[[], Awaitable[Any]], Optional[asyncio.Future], str]] = deque()
        self._runner: Optional[asyncio.Task] = None

    def submit(self, write: Callable[[], Awaitable[Any]], what: str) -> None:
        """Queue ``write()``; a failure is logged (``what`` names it)."""
        self._queue.append((write, None, what))
        self._start()

    def run(self, write: Callable[[], Awaitable[T]]) -> Awaitable[T]:
        """Queue ``write()`` and return its result (or exception) to await."""
        future: asyncio.Future = asyncio.get_running_loop().create_future()
        self._queue.append((write, future, ""))
        self._start()
        return future

    async def flush(self) -> None:
        """Wait until everything submitted so far was written (or failed)."""
        if self._queue or (self._runner is not None and not self._runner.done()):
            await self.run(_nothing)

    def _start(self) -> None:
        if self._runner is None or self._runner.done():
            self._runner = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        while self._queue:
            write, future, what = self._queue.popleft()
            try:
                result = await write()
            except Exception as exc:  # noqa: BLE001 - reported to the waiter, or logged
                if future is None:
                    log.warning("cannot record %s: %s", what, exc)
                elif not future.done():
                    future.set_exception(exc)
            else:
                if future is not None and not future.done():
                    future.set_result(result)


async def _nothing() -> None:
    return None


class Registry:
    """Live agents by id, and their status in the store."""

    def __init__(self, store: Store) -> None:
        self._store = store
        #: The store writes of agent rows, in order (see the module docstring).
        self.writes = StoreWrites()
        self._agents: dict[str, ConnectedAgent] = {}
        #: Bumped on every register/unregister, so users of :meth:`connected` (the service
        #: manager) can skip rescanning the agents while nothing changed.
        self.version = 0
        #: Called with the entry after every status change of a connected agent (e.g. the
        #: task dispatcher, to hand queued work to an agent that became idle).
        self.status_listeners: list[Callable[[ConnectedAgent], None]] = []
        # Admissions in progress by agent id: (lock, how many wait for it or hold it).
        self._claims: dict[str, tuple[asyncio.Lock, int]] = {}
        #: In a fleet: ``remote(team_id, agent_id)`` finds an agent another gateway holds
        #: (relay.gateway.fleet.registry), which :meth:`get` answers when it is not here.
        self.remote: Optional[Callable[[str, str], Optional[ConnectedAgent]]] = None
        #: In a fleet: the agents other gateways hold whose hello (known here) declares
        #: services, for the service manager's instances (see :meth:`for_services`).
        self.elsewhere: Optional[Callable[[], list[ConnectedAgent]]] = None
        #: In a fleet: ``admission(agent_id, name, instance)`` says where another live
        #: process with this identity is held by another gateway ("ADDRESS through gateway
        #: ID"), None if none is (relay.gateway.fleet.clones): :meth:`admit` then refuses
        #: the newcomer as it refuses a clone held here.
        self.admission: Optional[Callable[[str, str, str], Awaitable[Optional[str]]]] = None
        #: In a fleet: ``holders(team_id, agent_id)``, the ids of the gateways holding a
        #: session of the agent (the agent APIs' ``gateways``; absent alone).
        self.holders: Optional[Callable[[str, str], list[str]]] = None
        #: Called with each entry registered / unregistered (the fleet's leases).
        self.on_register: list[Callable[[ConnectedAgent], None]] = []
        self.on_unregister: list[Callable[[ConnectedAgent], None]] = []

    def get(self, team_id: str, agent_id: str) -> Optional[ConnectedAgent]:
        """The team's agent if it is connected now (another team's agent: None): held
        here, or in a fleet held by another gateway (its session then forwards)."""
        agent = self._agents.get(agent_id.lower())
        if agent is None or agent.team_id != team_id or agent.session.is_closed:
            remote = self.remote
            return remote(team_id, agent_id.lower()) if remote is not None else None
        return agent

    def local(self, team_id: str, agent_id: str) -> Optional[ConnectedAgent]:
        """The team's agent if this gateway holds its session (never a forward)."""
        agent = self._agents.get(agent_id.lower())
        if agent is None or agent.team_id != team_id or agent.session.is_closed:
            return None
        return agent

    def local_any(self, agent_id: str) -> Optional[ConnectedAgent]:
        """The agent held here, whatever its team (for refusing cross-team forwards)."""
        agent = self._agents.get(agent_id.lower())
        return agent if agent is not None and not agent.session.is_closed else None

    def is_online(self, agent_id: str) -> bool:
        agent = self._agents.get(agent_id)
        return agent is not None and not agent.session.is_closed

    def connected(self) -> list[ConnectedAgent]:
        """The agents held by this gateway."""
        return list(self._agents.values())

    def for_services(self) -> list[ConnectedAgent]:
        """What the service manager builds its instances from: the agents held here,
        and in a fleet those held by the other gateways whose hello declares services
        (their sessions forward). Bumps of :attr:`version` tell when this may have
        changed."""
        agents = list(self._agents.values())
        elsewhere = self.elsewhere
        if elsewhere is not None:
            agents.extend(a for a in elsewhere() if a.agent_id not in self._agents)
        return agents

    async def admit(self, team_id: str, credential_id: str, info: Any,
                    session: MuxSession) -> ConnectedAgent:
        """Register a newly connected agent unless a live connection holds its identity
        (see the module docstring). Raises :class:`AgentNameTaken` for a refused
        newcomer, ConnectionError if the newcomer's session ended meanwhile."""
        name, _, _ = agent_identity(info)
        agent_id = str(uuid.uuid5(uuid.UUID(credential_id), name))
        instance = agent_instance(info)
        async with self._claiming(agent_id):  # one admission per identity at a time
            old = self._agents.get(agent_id)
            connection = agent_connection(info)
            same_process = bool(instance) and instance == old.instance if old is not None else False
            if old is not None and not old.session.is_closed and same_process and connection != old.connection:
                # The same agent process dialled this gateway again through another of its
                # connections (two of its URLs lead here): one session per gateway is
                # enough, unless the old one is dead.
                if await answers_ping(old.session):
                    log.info("agent %r (%s): refused its connection %s, already connected here through "
                             "its connection %s", name, agent_id, connection, old.connection)
                    raise AgentNameTaken(old, (
                        f"agent {name!r} is connected to this gateway already (through another of its "
                        f"connections): try another gateway"), ErrorCode.REFUSED)
                log.info("agent %r (%s): its other connection from %s does not answer; replacing it",
                         name, agent_id, peer_address(old.peer))
            elif old is not None and not old.session.is_closed and not same_process:
                if await answers_ping(old.session):
                    peer = session.get_extra_info("peername")
                    log.warning(
                        "agent %r (%s) of team %s: refused a second connection from %s: the same "
                        "key and name is connected from %s and alive (a cloned machine? give each "
                        "agent its own --name)", name, agent_id, team_id, peer_address(peer),
                        peer_address(old.peer))
                    raise AgentNameTaken(old, (
                        f"agent name {name!r} is already connected with this key (from "
                        f"{peer_address(old.peer)}); another agent with the same key and name is "
                        f"running (a cloned machine?): give each agent its own --name"))
                log.info("agent %r (%s): its previous connection from %s does not answer; replacing it",
                         name, agent_id, peer_address(old.peer))
            admission = self.admission
            if admission is not None:
                elsewhere = await admission(agent_id, name, instance)
                if elsewhere is not None:
                    log.warning(
                        "agent %r (%s) of team %s: refused a second connection from %s: the same "
                        "key and name is connected from %s and alive (a cloned machine? give each "
                        "agent its own --name)", name, agent_id, team_id,
                        peer_address(session.get_extra_info("peername")), elsewhere)
                    raise AgentNameTaken(None, (
                        f"agent name {name!r} is already connected with this key (from {elsewhere}); "
                        f"another agent with the same key and name is running (a cloned machine?): "
                        f"give each agent its own --name"))
            if session.is_closed:
                raise ConnectionError("the connection ended before it was registered")
            return await self.register(team_id, credential_id, info, session)

    @contextlib.asynccontextmanager
    async def _claiming(self, agent_id: str) -> AsyncIterator[None]:
        lock, users = self._claims.get(agent_id, (None, 0))
        lock = lock or asyncio.Lock()
        self._claims[agent_id] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._claims[agent_id]
            if users == 1:
                del self._claims[agent_id]  # nobody else waits: keep no lock per agent ever seen
            else:
                self._claims[agent_id] = (lock, users - 1)

    async def register(self, team_id: str, credential_id: str, info: Any, session: MuxSession,
                       status: str = "idle") -> ConnectedAgent:
        """Record a newly connected agent (store row + live entry). A previous connection
        of the same agent (not yet noticed dead) is replaced and aborted."""
        name, labels, version = agent_identity(info)
        agent_id = str(uuid.uuid5(uuid.UUID(credential_id), name))
        store = self._store
        await self.writes.run(lambda: store.upsert_agent(team_id, agent_id, name, labels, version, status))
        entry = ConnectedAgent(agent_id, team_id, name, labels, version, session,
                               peer=session.get_extra_info("peername"), status=status,
                               credential_id=credential_id, instance=agent_instance(info),
                               connection=agent_connection(info))
        old = self._agents.get(agent_id)
        self._agents[agent_id] = entry
        self.version += 1
        if old is not None and old.session is not session and not old.session.is_closed:
            log.info("agent %s (%s) reconnected; dropping its previous connection", name, agent_id)
            old.session.abort(message="replaced by a new connection of the same agent")
        log.info("agent %s (%s) online in team %s from %s", name, agent_id, team_id, entry.peer)
        self._notify(self.on_register, entry)
        return entry

    @staticmethod
    def _notify(listeners: list[Callable[[ConnectedAgent], None]], entry: ConnectedAgent) -> None:
        for listener in list(listeners):
            try:
                listener(entry)
            except Exception:
                log.exception("agent registry listener failed")

    def unregister(self, entry: ConnectedAgent) -> None:
        """The connection ended: mark the agent offline, unless a newer connection of the
        same agent replaced it already."""
        if self._agents.get(entry.agent_id) is not entry:
            return
        del self._agents[entry.agent_id]
        self.version += 1
        entry.status_seq += 1
        self._notify(self.on_unregister, entry)
        self._record_status(entry.team_id, entry.agent_id, "offline")
        log.info("agent %s (%s) offline", entry.name, entry.agent_id)

    def expel(self, entry: ConnectedAgent, error_code: int, message: str) -> None:
        """End a connected agent's session for ``message`` (e.g. its credential was
        revoked): offline at once, so nothing new is routed to it while the session
        closes (see :func:`end_session`)."""
        self.unregister(entry)
        end_session(entry.session, error_code, message)

    def set_status(self, team_id: str, agent_id: str, status: str) -> None:
        """Record a status change of a connected agent (idle/tunnel/...)."""
        if self.is_online(agent_id):
            entry = self._agents[agent_id]
            entry.status = status
            entry.status_seq += 1
            self._record_status(team_id, agent_id, status)
            for listener in list(self.status_listeners):
                try:
                    listener(entry)
                except Exception:
                    log.exception("agent status listener failed")

    def _record_status(self, team_id: str, agent_id: str, status: str) -> None:
        store = self._store
        self.writes.submit(lambda: store.set_agent_status(team_id, agent_id, status), "agent status")

    def describe(self, agent: Agent) -> dict[str, Any]:
        """The API representation of an agent row, with live connection details."""
        live: Optional[ConnectedAgent] = self._agents.get(agent.id)
        online = live is not None and not live.session.is_closed
        if not online and self.remote is not None:  # held by another gateway of the fleet
            live = self.remote(agent.team_id, agent.id)
            online = live is not None
        body = {
            "agent_id": agent.id,
            "name": agent.name,
            "labels": agent.labels,
            "version": agent.version,
            "status": live.status if live is not None and online else "offline",
            "online": online,
            "first_seen": agent.first_seen,
            "last_seen": agent.last_seen,
            "connected_at": live.connected_at if live is not None and online else None,
            "open_streams": len(live.session.streams) if live is not None and online else 0,
            # From the hello of the session it is connected with: an offline agent's
            # next start may say otherwise, so it is false until then.
            "terminal": live is not None and online and terminal_enabled(live.session.peer_info),
        }
        if self.holders is not None:  # in a fleet: which gateways hold it (empty: offline)
            body["gateways"] = self.holders(agent.team_id, agent.id) if online else []
        return body

    def abort_all(self, message: str = "gateway shutting down") -> None:
        for entry in list(self._agents.values()):
            entry.session.abort(message=message)


async def answers_ping(session: MuxSession) -> bool:
    """True if the session's peer answers a PING within :data:`PROBE_TIMEOUT`."""
    try:
        async with asyncio.timeout(PROBE_TIMEOUT):
            await session.ping()
        return True
    except (TimeoutError, ConnectionError):
        return False


def peer_address(peer: Any) -> str:
    """``host:port`` of a peername tuple, for log lines and messages."""
    if isinstance(peer, tuple) and len(peer) >= 2:
        return f"[{peer[0]}]:{peer[1]}" if ":" in str(peer[0]) else f"{peer[0]}:{peer[1]}"
    return str(peer) if peer else "an unknown address"
