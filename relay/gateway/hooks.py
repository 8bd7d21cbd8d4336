"""Programmatic hooks of an embedded :class:`~relay.gateway.app.Gateway`.

Every gateway has ``gateway.hooks``, a :class:`GatewayHooks`. Hooks are plain callables
(or coroutine functions, where noted) appended to lists, so several parts of an
application can each add their own::

    gateway.hooks.on_agent_connected.append(lambda agent: print("hello", agent.name))
    gateway.hooks.allow_stream.append(
        lambda agent, meta: meta.get("target") != "127.0.0.1:22" or "no ssh here")

``agent`` is always the live :class:`~relay.gateway.agents.registry.ConnectedAgent` (``agent_id``,
``team_id``, ``name``, ``labels``, ``version``, ``status``, ``session``).

* ``authenticate`` (one slot, not a list; sync or async): ``fn(request, default)`` decides
  who an agent connecting to the agent endpoint is. ``request`` is the upgrade request
  (``request.headers``, ``request.peer``); ``default()`` runs the built-in ``ak-`` key
  check. Return a :class:`~relay.gateway.auth.Principal` of kind ``agent`` (see
  :func:`agent_principal`), or raise :class:`~relay.gateway.auth.AuthError` (answered
  before the upgrade, e.g. 401/403). Call ``default()`` and add checks to *extend* the
  built-in rule; ignore it to *replace* it.
* ``on_agent_connected(agent)`` / ``on_agent_disconnected(agent)`` (sync or async): after
  the agent is registered / after it is unregistered.
* ``allow_stream(agent, metadata)`` (sync only: streams are opened from synchronous code):
  called before a stream open is sent to the agent. ``True``/``None`` allow; ``False`` or a
  string deny (the string is the reason). A denied open never reaches the agent: the
  stream is refused locally with ``NOT_ALLOWED`` and the reason, exactly as if the agent
  had refused it, so an HTTP tunnel client gets a 502 whose message carries the reason and
  a hub-port connection is closed (the reason is the tunnel's ``last_error``).
* ``on_stream_closed(agent, metadata, bytes_up, bytes_down)`` (sync or async): when a
  stream the gateway opened to the agent is finished; ``bytes_up`` are the payload bytes
  written towards the agent, ``bytes_down`` those received from it.

A hook that raises is logged and otherwise ignored (except ``authenticate``, whose errors
are the answer); coroutines returned by hooks run as tasks, so a slow hook never stalls a
session.
"""
from __future__ import annotations

import asyncio
import inspect
import logging
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Optional, Protocol, Union

from relay.aio import MuxSession
from relay.aio.stream import MuxStream
from relay.gateway.auth import Principal
from relay.mux.errors import ErrorCode

if TYPE_CHECKING:
    from relay.gateway.agents.registry import ConnectedAgent

__all__ = ["AgentUpgradeRequest", "GatewayHooks", "GatewaySession", "agent_principal"]

log = logging.getLogger("relay.gateway.hooks")

class AgentUpgradeRequest(Protocol):
    """What an ``authenticate`` hook sees of an agent's upgrade request: the gateway's
    own :class:`~relay.gateway.server.Request`, or, for an agent endpoint mounted in
    another framework, :class:`~relay.gateway.embed.AgentRequest`."""

    @property
    def headers(self) -> Mapping[str, str]:
        """Lower-case names."""
        ...

    @property
    def peer(self) -> Any: ...

    def header(self, name: str) -> Optional[str]: ...


AgentHook = Callable[["ConnectedAgent"], Any]
StreamPolicy = Callable[["ConnectedAgent", dict[str, Any]], Union[bool, str, None]]
StreamClosedHook = Callable[["ConnectedAgent", dict[str, Any], int, int], Any]
Authenticate = Callable[[AgentUpgradeRequest, Callable[[], Principal]], Union[Principal, Awaitable[Principal]]]

#: Namespace of the credential ids :func:`agent_principal` derives (agent ids are
#: ``uuid5(credential id, name)``, so a stable subject gives stable agent ids).
_PRINCIPAL_NAMESPACE = uuid.UUID("6f1d6b4e-8c55-4f43-9b0e-2d3c1f7a9e10")


def agent_principal(team_id: str, subject: str) -> Principal:
    """A Principal for an agent an ``authenticate`` hook accepted by its own rules.
    ``team_id`` must be a team of the gateway's store; ``subject`` (e.g. your platform's
    machine id) keeps the agent's id stable across reconnects."""
    credential = str(uuid.uuid5(_PRINCIPAL_NAMESPACE, subject))
    return Principal(kind="agent", team_id=team_id, subject=subject, credential_id=credential)


@dataclass
class GatewayHooks:
    """The hooks of one gateway (see the module docstring for each one's contract)."""

    authenticate: Optional[Authenticate] = None
    on_agent_connected: list[AgentHook] = field(default_factory=list)
    on_agent_disconnected: list[AgentHook] = field(default_factory=list)
    allow_stream: list[StreamPolicy] = field(default_factory=list)
    on_stream_closed: list[StreamClosedHook] = field(default_factory=list)
    _tasks: set[asyncio.Future[Any]] = field(default_factory=set, repr=False)

    async def run_authenticate(self, request: AgentUpgradeRequest, default: Callable[[], Principal]) -> Principal:
        """The principal of a connecting agent: the hook's answer, or ``default()``."""
        if self.authenticate is None:
            return default()
        result = self.authenticate(request, default)
        if inspect.isawaitable(result):
            result = await result
        if not isinstance(result, Principal) or not result.is_agent or result.credential_id is None:
            raise TypeError("the authenticate hook must return an agent Principal (see agent_principal)")
        return result

    def stream_denied(self, agent: "ConnectedAgent", metadata: dict[str, Any]) -> Optional[str]:
        """None if every ``allow_stream`` hook allows the open, else the reason."""
        for policy in self.allow_stream:
            try:
                verdict = policy(agent, metadata)
            except Exception:  # a broken policy must fail closed, not open
                log.exception("allow_stream hook failed; denying the stream")
                return "stream policy failed"
            if verdict is False:
                return "denied by the gateway's stream policy"
            if isinstance(verdict, str):
                return verdict or "denied by the gateway's stream policy"
        return None

    def fire(self, hooks: list[Callable[..., Any]], *args: Any) -> None:
        """Call each hook with ``args``; log failures; run coroutines as tasks."""
        for hook in list(hooks):
            try:
                result = hook(*args)
            except Exception:
                log.exception("gateway hook %r failed", hook)
                continue
            if inspect.isawaitable(result):
                task = asyncio.ensure_future(result)
                self._tasks.add(task)
                task.add_done_callback(self._hook_done)

    def _hook_done(self, task: asyncio.Future[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("gateway hook failed", exc_info=task.exception())


class GatewaySession(MuxSession):
    """The gateway side of an agent's session, with the stream hooks applied: opens are
    checked by ``allow_stream`` and finished streams reported to ``on_stream_closed``.
    ``agent`` is set once the agent is registered (streams are opened only after)."""

    def __init__(self, hooks: GatewayHooks, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.hooks = hooks
        self.agent: Optional["ConnectedAgent"] = None

    def open_stream_nowait(self, metadata: Optional[dict[str, Any]] = None) -> MuxStream:
        agent = self.agent
        if agent is not None and self.hooks.allow_stream:
            reason = self.hooks.stream_denied(agent, metadata or {})
            if reason is not None:
                self._check_open()  # a closed session still says so first
                log.info("stream to agent %s denied: %s", agent.agent_id, reason)
                return self._refused_stream(metadata or {}, ErrorCode.NOT_ALLOWED, reason)
        return super().open_stream_nowait(metadata)

    def _stream_finished(self, stream: MuxStream) -> None:
        known = stream.stream_id in self._streams
        super()._stream_finished(stream)
        # Only streams we opened (the agent opens none to us) and only once.
        if known and stream.local and self.agent is not None and self.hooks.on_stream_closed:
            self.hooks.fire(self.hooks.on_stream_closed, self.agent, stream.metadata,
                            stream.bytes_sent, stream.bytes_received)
