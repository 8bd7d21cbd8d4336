"""What both agents hold and do the same way, whatever loop runs them: their settings,
their state (logged as it changes), status reports, the reconnect delay, their hello,
what to do with each stream the gateway opens (:meth:`AgentBase.plan_stream`) and each
control message it sends (:meth:`AgentBase.on_control`).

``relay.agent.client.Agent`` (asyncio) and ``relay.agent.trio_client.TrioAgent`` (trio)
build on :class:`AgentBase` and add their loop's connecting, serving and waiting: a
stream is served as its plan says, a task runs ``agent.tasks.run`` as a task of the
loop (relay.agent.tasks), a binding listens with ``agent.binder`` (relay.agent.bind).
"""
from __future__ import annotations

import logging
import random
import secrets
import socket
import ssl
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Optional

from relay import __version__
from relay.agent.gateways import TargetRing
from relay.agent.policy import (
    DATAGRAM_PROTOCOLS,
    STREAM_PROTOCOLS,
    TargetRefused,
    allowed_by_list,
    backoff_delay,
    not_allowed_message,
    parse_allowlist,
    parse_gateway_url,
    parse_target,
)
from relay.agent.tasks import AgentTasks, stream_denied
from relay.mux.connection import MuxConfig
from relay.mux.errors import ErrorCode
from relay.mux.terminal import TERMINAL_PROTOCOL

log = logging.getLogger("relay.agent")

#: A connection that lasted this long resets the reconnect backoff.
STABLE_CONNECTION = 10.0


@dataclass(frozen=True)
class StreamPlan:
    """How to serve a stream the gateway opened (:meth:`AgentBase.plan_stream`)."""

    #: ``tcp`` or ``http`` (spliced to the target), ``udp`` (datagrams to it) or
    #: ``terminal`` (a shell: host and port are empty).
    protocol: str
    host: str = ""
    port: int = 0
    #: Speak TLS to the target (an https tunnel's share link; relay.agent.policy.target_tls).
    tls: bool = False


class AgentBase:
    """Settings and shared behaviour of an agent (see the subclasses for the arguments)."""

    #: Appended to the "connecting" log line (which loop runs the agent).
    _backend_note = ""
    #: The current session while connected (a MuxSession or a TrioMuxSession).
    session: Any
    #: Local ports bound for tunnels on the gateway's request (relay.agent.bind: a
    #: Binder or a TrioBinder).
    binder: Any

    def __init__(self, gateway_url: str, key: str, *, name: Optional[str] = None,
                 labels: Iterable[str] = (), allow: Iterable[Any] = (),
                 mux_config: Optional[MuxConfig] = None,
                 backoff_initial: float = 0.5, backoff_max: float = 30.0, jitter: float = 0.2,
                 ssl_context: Optional[ssl.SSLContext] = None,
                 more_gateways: Iterable[str] = ()) -> None:
        self.tls, self.host, self.port, self.path, self.gateway_url = parse_gateway_url(gateway_url)
        #: Every gateway this agent may use, in order (a fleet's gateways; the asyncio
        #: agent holds sessions to several at once: relay.agent.gateways).
        self.gateway_urls = [parse_gateway_url(url) for url in (gateway_url, *more_gateways)]
        self._key = key
        self.name = name or _default_name()
        self.labels = sorted(set(labels))
        self.allow: set[tuple[str, int]] = parse_allowlist(allow)
        self._mux_config = mux_config
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        self.jitter = jitter
        self._ssl = ssl_context if ssl_context is not None else (ssl.create_default_context() if self.tls else None)
        #: The id the gateway gave us (from its welcome), once connected.
        self.agent_id: Optional[str] = None
        #: Sent in every hello: the same for all reconnects of this agent object, so the
        #: gateway tells this agent coming back from another process with the same key
        #: and name (a clone, or a restart whose old connection is not dead yet).
        self.instance_id = secrets.token_hex(8)
        self.session = None
        self.state = "idle"
        #: True once a session was established: the key worked, so a later refusal (the
        #: key revoked, the name taken) is logged and retried with backoff, not fatal.
        self.ever_connected = False
        #: Task handlers by kind (relay.agent.tasks; the CLI adds echo, sleep, count).
        self.tasks = AgentTasks()
        #: Stream policies, ``fn(metadata) -> True/None | False/reason`` (relay.agent.tasks).
        self.allow_stream: list[Any] = []
        #: Declared container services (relay.agent.services.ServiceSpec), sent in the
        #: hello; their targets are allowed implicitly.
        self.services: list[Any] = []
        #: The web terminal this agent serves (relay.agent.terminal.TerminalSpec), or
        #: None: terminal streams are refused. Advertised in the hello.
        self.terminal: Any = None

    def __repr__(self) -> str:  # never show the key
        return f"{type(self).__name__}({self.gateway_url!r}, name={self.name!r})"

    # ------------------------------------------------------------------ policy

    def is_allowed(self, host: str, port: int) -> bool:
        """May the gateway reach ``host:port`` through this agent? A declared service's
        target, or one the allowlist allows (relay.agent.policy)."""
        if any((s.host, s.port) == (host.lower(), port) for s in self.services):
            return True
        return allowed_by_list(self.allow, host, port)

    def allow_hello(self) -> dict[str, Any]:
        """``{"allow": ["HOST:PORT", ...]}`` for the hello while this agent decides by
        its allowlist (the stock ``is_allowed``), so the gateway refuses a tunnel to a
        target we would refuse when the tunnel is opened, not with a 502 on every
        request later. A subclass that decides by its own rules says nothing, and the
        gateway leaves the decision to it."""
        if type(self).is_allowed is not AgentBase.is_allowed:
            return {}
        return {"allow": [f"[{h}]:{p}" if ":" in h else f"{h}:{p}" for h, p in sorted(self.allow)]}

    def hello_info(self, config: MuxConfig, connection: int = 0) -> dict[str, Any]:
        """The hello (SETTINGS ``info``) of the agent's connection number ``connection``."""
        return {"name": self.name, "labels": self.labels, "version": __version__,
                "instance": self.instance_id, "connection": connection,
                "limits": {"max_streams": config.max_streams},
                "services": [spec.to_info() for spec in self.services],
                **({"terminal": self.terminal.to_info()} if self.terminal is not None else {}),
                **self.allow_hello()}

    def plan_stream(self, metadata: Any) -> StreamPlan:
        """How to serve a stream the gateway opened with ``metadata``, or
        :class:`~relay.agent.policy.TargetRefused` with the code and message the gateway's
        client sees: the ``allow_stream`` policies first, then the target's form and
        protocol, then the allowlist. A terminal stream is planned as such; whether a
        shell is served is the terminal's own decision (relay.agent.terminal)."""
        denied = stream_denied(self.allow_stream, metadata)
        if denied is not None:
            raise TargetRefused(ErrorCode.NOT_ALLOWED, denied)
        if isinstance(metadata, dict) and metadata.get("protocol") == TERMINAL_PROTOCOL:
            return StreamPlan(TERMINAL_PROTOCOL)
        host, port = parse_target(metadata, STREAM_PROTOCOLS | DATAGRAM_PROTOCOLS)
        if not self.is_allowed(host, port):
            log.warning("refused stream to %s:%d: not on this agent's allowlist", host, port)
            raise TargetRefused(ErrorCode.NOT_ALLOWED, not_allowed_message(host, port, self.name, self.allow))
        return StreamPlan(metadata.get("protocol", "tcp"), host, port, metadata.get("tls") is True)

    # ------------------------------------------------------------------ control messages

    def on_control(self, message: Any, session: Any) -> None:
        """A control message from the gateway on ``session`` (answers go back on it):
        its welcome, a ``bind``/``unbind`` of the Tunnels API's connect, a ``task`` to
        run (seed 001) or a ``task.cancel``. Anything else is ignored (a newer gateway
        may send more)."""
        kind = message.get("type") if isinstance(message, dict) else None
        if kind == "welcome":
            self.agent_id = str(message.get("agent_id"))
            log.info("registered as agent %s (%s)", self.agent_id, self.name)
        elif kind == "bind":

            def reply(result: dict[str, Any]) -> None:
                if session is not None and not session.is_closed:
                    session.send_control(result)

            self.binder.on_control(message, reply)
        elif kind == "unbind":
            self.binder.unbind(str(message.get("tunnel_id")))
        elif kind == "task" and session is not None:
            self._start_task(session, message)
        elif kind == "task.cancel":
            self.tasks.cancel(str(message.get("task_id")))

    def _start_task(self, session: Any, message: dict[str, Any]) -> None:
        """Run ``self.tasks.run`` for the task ``message`` as a task of the loop,
        registered with ``self.tasks.started`` and cancelled when ``session`` ends."""
        raise NotImplementedError

    def backoff_delay(self, attempt: int) -> float:
        """Delay before reconnect attempt ``attempt`` (0-based); see policy.backoff_delay."""
        return backoff_delay(attempt, self.backoff_initial, self.backoff_max, self.jitter)

    def _live_sessions(self) -> list[Any]:
        """Every session held now (several for an agent with ``connections`` > 1)."""
        sessions = list(getattr(self, "sessions", None) or [])
        if self.session is not None and self.session not in sessions:
            sessions.append(self.session)
        return sessions

    def report_status(self, status: str) -> None:
        """Tell the gateway(s) our status (``idle``, ``busy`` or ``unhealthy``); ignored
        while not connected."""
        for session in self._live_sessions():
            if not session.is_closed:
                session.send_control({"type": "status", "status": status})

    def close(self) -> None:
        """Drop the current connection(s) (``run`` would reconnect: cancel it to stop)."""
        for session in self._live_sessions():
            session.abort(ErrorCode.NO_ERROR, "agent stopping")

    @staticmethod
    def refusal(session: Any) -> Optional[str]:
        """Why the gateway ended ``session`` if it refused this agent (a GOAWAY
        ``NOT_ALLOWED``: credential revoked, name already connected ...), else None."""
        goaway = getattr(session, "goaway_received", None)
        if goaway is None or goaway.error_code != ErrorCode.NOT_ALLOWED:
            return None
        return f"the gateway refused this agent: {goaway.message or 'not allowed'}"

    def _refused(self, reason: str, delay: float) -> None:
        """Log a refusal where operators look (ERROR), with the delay before trying again."""
        self.state = "refused"
        log.error("%s; retrying in %.1fs", reason, delay)

    def _set_state(self, state: str, detail: str = "", target: Optional[str] = None) -> None:
        """Record and log a state change (``target``: the gateway it concerns). While
        another session is up, the agent stays "connected" whatever one connection does."""
        if state == self.state and not detail and target is None:
            return
        if state == "connected" or not self._live_sessions():
            self.state = state
        if state == "connecting":
            log.info("connecting to %s as %r%s", target or self.gateway_url, self.name, self._backend_note)
        elif state == "connected":
            log.info("connected to %s", target or self.gateway_url)
        else:
            log.info("%s%s", state, f": {detail}" if detail else "")


def _default_name() -> str:
    return socket.gethostname() or "agent"


class Redial:
    """When and where connection number ``connection`` of ``agent`` dials next, after
    each attempt: the loop of either agent dials :attr:`target`, then asks one of
    :meth:`ended`, :meth:`rejected` or :meth:`failed` for the delay before the next
    dial (logged here, as the state changes).

    The backoff grows with every attempt (AgentBase.backoff_delay) and starts over after
    a connection that lasted :data:`STABLE_CONNECTION` seconds and was not refused. With
    several gateways, a connection that was up moves to the next gateway no other
    connection uses (relay.agent.gateways.TargetRing) within ``backoff_initial / 4``,
    spread at random so a gateway's agents do not all land on a survivor at once; a
    failed dial moves on too, after at most ``backoff_initial``. A gateway that holds
    this agent through another of its connections already (a GOAWAY ``REFUSED``) is
    dialled again with the growing delay."""

    def __init__(self, agent: AgentBase, ring: TargetRing, connection: int, count: int) -> None:
        self.agent = agent
        self.ring = ring
        self.connection = connection
        self.count = count
        #: Where to dial next.
        self.target = ring.first(connection)
        self.attempt = 0

    def retarget(self) -> None:
        """The ring's targets changed (the names resolved again): a target that left
        them is not dialled; the next one no other connection uses is."""
        if self.target not in self.ring.targets:
            self.target = self.ring.next(self.connection)

    def ended(self, ended: list[Any], lasted: float) -> float:
        """The session (``ended``: it, once it existed) ended after ``lasted`` seconds."""
        refused, duplicate = self._why_ended(ended)
        if refused is None and not duplicate and lasted >= STABLE_CONNECTION:
            self.attempt = 0
        return self._next(ended, refused, duplicate, "connection lost")

    def rejected(self, error: Exception) -> float:
        """The gateway rejected the key (401/403): raises ``error`` if the key never
        worked (a wrong key); a key that worked was revoked, maybe for a while."""
        if not self.agent.ever_connected:
            self.agent._set_state("rejected")
            raise error
        return self._next([], f"{error} (was the key revoked?)", False, "")

    def failed(self, ended: list[Any], error: BaseException) -> float:
        """The dial or the session failed with ``error``."""
        refused, duplicate = self._why_ended(ended)
        return self._next(ended, refused, duplicate, str(error) or type(error).__name__)

    def _why_ended(self, ended: list[Any]) -> tuple[Optional[str], bool]:
        """``(refusal, duplicate)`` for the session that ended (if it got that far): the
        gateway's refusal of this agent, or True if the gateway holds this agent process
        through another of its connections already (a GOAWAY ``REFUSED``)."""
        if not ended:
            return None, False
        goaway = getattr(ended[0], "goaway_received", None)
        duplicate = goaway is not None and goaway.error_code == ErrorCode.REFUSED
        return self.agent.refusal(ended[0]), duplicate

    def _next(self, ended: list[Any], refused: Optional[str], duplicate: bool, reason: str) -> float:
        agent = self.agent
        delay = agent.backoff_delay(self.attempt)
        self.attempt += 1
        several = len(self.ring.targets) > 1
        if duplicate:
            reason = f"{self.target.label} is a gateway this agent is connected to already"
        if several and refused is None:  # another gateway serves as well, and this one may be dead
            self.target = self.ring.next(self.connection)
            if ended and not duplicate:
                delay = random.uniform(0.0, agent.backoff_initial / 4)
            elif not duplicate:
                delay = min(delay, agent.backoff_initial)
        if refused is not None:
            agent._refused(refused, delay)
        else:
            prefix = f"connection {self.connection + 1}/{self.count}: " if self.count > 1 else ""
            agent._set_state("disconnected", f"{prefix}{reason}; retrying in {delay:.1f}s"
                             + (f" with {self.target.label}" if several else ""))
        return delay

