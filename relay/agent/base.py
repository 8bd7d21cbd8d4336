"""What both agents hold and do the same way, whatever loop runs them: their settings,
their state (logged as it changes), status reports and the reconnect delay.

``relay.agent.client.Agent`` (asyncio) and ``relay.agent.trio_client.TrioAgent`` (trio)
build on :class:`AgentBase` and add their loop's connecting, serving and waiting.
"""
from __future__ import annotations

import logging
import secrets
import socket
import ssl
from collections.abc import Iterable
from typing import Any, Optional

from relay.agent.policy import backoff_delay, parse_allowlist, parse_gateway_url
from relay.mux.connection import MuxConfig
from relay.mux.errors import ErrorCode

log = logging.getLogger("relay.agent")


class AgentBase:
    """Settings and shared behaviour of an agent (see the subclasses for the arguments)."""

    #: Appended to the "connecting" log line (which loop runs the agent).
    _backend_note = ""
    #: The current session while connected (a MuxSession or a TrioMuxSession).
    session: Any

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

    def __repr__(self) -> str:  # never show the key
        return f"{type(self).__name__}({self.gateway_url!r}, name={self.name!r})"

    def is_allowed(self, host: str, port: int) -> bool:
        """May the gateway reach ``host:port`` through this agent? (Each agent says.)"""
        raise NotImplementedError

    def allow_hello(self, stock_is_allowed: Any) -> dict[str, Any]:
        """``{"allow": ["HOST:PORT", ...]}`` for the hello while this agent decides by
        its allowlist (``stock_is_allowed``: the class's own ``is_allowed``), so the
        gateway refuses a tunnel to a target we would refuse when the tunnel is
        opened, not with a 502 on every request later. A subclass that decides by
        its own rules says nothing, and the gateway leaves the decision to it."""
        if type(self).is_allowed is not stock_is_allowed:
            return {}
        return {"allow": [f"[{h}]:{p}" if ":" in h else f"{h}:{p}" for h, p in sorted(self.allow)]}

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
