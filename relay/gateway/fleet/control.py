"""Control requests between gateways: what a gateway asks of an agent held elsewhere
that is not a byte stream to a target.

Streams to an agent's targets cross the fleet as forwarded streams
(relay.gateway.fleet.forward). Everything else a request may need from an agent is a
control message, and control messages only reach the gateway holding the agent: a task
handed to an idle agent and its progress (relay.gateway.api.tasks), a Tunnels API
``bind`` and its result (relay.gateway.agents.bindings), and the agent's hello (its
service declarations and target policy), which the service proxy, invoke and the
seed 000 tunnel checks read. Those travel as *control requests*: a stream on the same
peer session whose metadata is ``{"ctl": kind, "team": team id}``, plus ``"agent":
id`` when the request is for one agent. The requester writes one request frame; the
holder answers with frames and ends the stream (a reset: the holder could not serve
it). A frame is a 4-byte big-endian length and a JSON document.

One function decides at the holder (:meth:`ControlChannel.serve`): the kind must be
one a component registered; a request naming an agent is served only if the agent is
held *here*, in the team named (another team's agent: NOT_ALLOWED, logged and counted
``forged``, exactly as a forwarded stream is; an agent not held here: REFUSED); a
request naming only a team (a task offer) can only ever reach agents of that team. The
component's handler then runs with the request (:class:`ControlCall`).

Kinds, and who serves them:

* ``hello`` (an agent): ``{"info": the agent's SETTINGS info}`` (the fleet registry asks
  once per agent location it learns, off the request path).
* ``alive`` (an agent): ``{"alive": bool, "peer": "HOST:PORT"}``: whether the agent's
  session there answers a PING (relay.gateway.fleet.clones asks before admitting another
  process with the same key and name).
* ``bind`` (an agent): the bind message goes to the agent; its ``bind.result`` comes back.
* ``task`` (a team): run the task on an idle agent of the team whose labels cover it:
  ``{"t": "declined"}``, or ``{"t": "dispatched", "agent_id"}`` followed by each of the
  agent's task messages as ``{"t": "event", "message"}``, the last one final. The
  requester resetting the stream before the final message cancels the task on the
  agent (the task was cancelled, or its gateway went away).
* ``cancel`` (a team): ``{"task_id"}``, sent to the gateway that owns the task (its row
  names it) by a gateway asked to cancel it: ``{"task": the task, cancelled}`` or
  ``{"error": "task_not_found" | "task_finished"}``.
"""
from __future__ import annotations

import asyncio
import json
import logging
import struct
from collections.abc import Awaitable
from typing import TYPE_CHECKING, Any, Callable, Optional

from relay.aio.stream import MuxStream
from relay.gateway.agents.registry import ConnectedAgent
from relay.mux.errors import ErrorCode

if TYPE_CHECKING:
    from relay.gateway.fleet import Fleet

__all__ = ["CONTROL_KEY", "ControlCall", "ControlChannel", "ControlReply"]

log = logging.getLogger("relay.gateway.fleet.control")

#: The metadata key that makes a peer stream a control request.
CONTROL_KEY = "ctl"
#: Largest frame either side accepts (a task input is at most 256 KiB of JSON, an
#: agent's hello a few KiB).
MAX_FRAME = 4 * 1024 * 1024
#: The request frame must arrive within this time of the stream's opening.
REQUEST_TIMEOUT = 10.0
#: How long a requester waits for the peer session to the holder to open.
CONNECT_TIMEOUT = 5.0

_LENGTH = struct.Struct(">I")

Handler = Callable[["ControlCall"], Awaitable[None]]


def encode(frame: Any) -> bytes:
    data = json.dumps(frame, separators=(",", ":"), default=str).encode()
    if len(data) > MAX_FRAME:
        raise ValueError(f"a control frame of {len(data)} bytes is over the limit of {MAX_FRAME}")
    return _LENGTH.pack(len(data)) + data


async def read_frame(stream: MuxStream) -> Optional[Any]:
    """The next frame, or None at the end of the stream. Raises ConnectionError if the
    stream was reset, ValueError for a malformed frame."""
    try:
        header = await stream.readexactly(4)
    except asyncio.IncompleteReadError as exc:
        if exc.partial:
            raise ValueError("a control frame was cut short") from None
        if stream.exception is not None:
            raise stream.exception from None
        return None
    (length,) = _LENGTH.unpack(header)
    if length > MAX_FRAME:
        raise ValueError(f"a control frame of {length} bytes is over the limit of {MAX_FRAME}")
    try:
        data = await stream.readexactly(length)
    except asyncio.IncompleteReadError:
        if stream.exception is not None:
            raise stream.exception from None
        raise ValueError("a control frame was cut short") from None
    return json.loads(data)


class ControlCall:
    """One control request being served at the holder."""

    def __init__(self, stream: MuxStream, kind: str, team_id: str, agent: Optional[ConnectedAgent],
                 body: Any) -> None:
        self.stream = stream
        self.kind = kind
        self.team_id = team_id
        #: The agent the request names (held here, in ``team_id``), or None.
        self.agent = agent
        #: The request frame.
        self.body = body

    def __repr__(self) -> str:
        return f"<ControlCall {self.kind} team={self.team_id} agent={self.agent.agent_id if self.agent else None}>"

    @property
    def gone(self) -> bool:
        """True once the requester went away (the stream was reset)."""
        return self.stream.exception is not None

    def writable(self) -> bool:
        """True while the answer's send queue has room (a requester that reads slowly
        fills it: what may be dropped should be, rather than queued without bound)."""
        return self.stream.writable()

    def send(self, frame: Any) -> None:
        """Answer one frame (dropped if the requester went away)."""
        if self.stream.exception is None and not self.stream.is_closing():
            self.stream.write(encode(frame))

    def refuse(self, error_code: int, message: str) -> None:
        """End the request without an answer (the requester sees a reset)."""
        self.stream.abort(error_code, message)


class ControlReply:
    """The requester's side of one control request: the holder's answer frames."""

    def __init__(self, stream: MuxStream) -> None:
        self.stream = stream

    async def next(self, timeout: Optional[float] = None) -> Optional[Any]:
        """The next answer frame, or None once the holder ended the answer. Raises
        TimeoutError, ConnectionError (the holder refused or the peer session ended)
        or ValueError (a malformed frame)."""
        if timeout is None:
            return await read_frame(self.stream)
        async with asyncio.timeout(timeout):
            return await read_frame(self.stream)

    def close(self) -> None:
        """Done with the answer (resets the stream if the holder is still answering)."""
        if not self.stream.finished:
            self.stream.abort(ErrorCode.CANCEL, "the requester is done")


class ControlChannel:
    """Control requests of one gateway: sent to the holders, served for the others."""

    def __init__(self, fleet: "Fleet") -> None:
        self._fleet = fleet
        self._handlers: dict[str, Handler] = {}

    def handle(self, kind: str, handler: Handler) -> None:
        """Serve requests of ``kind`` with ``handler`` (the component owning the state)."""
        self._handlers[kind] = handler

    # -- requester

    async def request(self, gateway_id: str, kind: str, team_id: str, body: Any,
                      agent_id: Optional[str] = None) -> ControlReply:
        """Send a control request to ``gateway_id`` and return its answer to read.
        Raises ConnectionError if the gateway cannot be reached or refused it."""
        fleet = self._fleet
        session = await fleet.peers.wait_session(gateway_id, CONNECT_TIMEOUT)
        if session is None:
            raise ConnectionError(f"the gateway {gateway_id} is not reachable")
        meta: dict[str, Any] = {CONTROL_KEY: kind, "team": team_id}
        if agent_id is not None:
            meta["agent"] = agent_id
        fleet.metrics.controls_out[kind] += 1
        stream = session.open_stream_nowait(meta)
        try:
            stream.write(encode(body))
            await stream.wait_accepted()
        except BaseException:
            stream.abort(ErrorCode.CANCEL, "the request was abandoned")
            raise
        return ControlReply(stream)

    async def ask_agent(self, agent: ConnectedAgent, kind: str, body: Any) -> ControlReply:
        """:meth:`request` for ``agent``, held by another gateway (a RemoteAgent)."""
        gateway_id = getattr(agent, "gateway_id", "")
        return await self.request(gateway_id, kind, agent.team_id, body, agent_id=agent.agent_id)

    # -- holder

    def serve(self, stream: MuxStream) -> None:
        """A control request another gateway opened (module docstring)."""
        from relay.gateway.fleet.forward import held_here

        meta = stream.metadata
        kind, team_id, agent_id = meta.get(CONTROL_KEY), meta.get("team"), meta.get("agent")
        metrics = self._fleet.metrics
        handler = self._handlers.get(kind) if isinstance(kind, str) else None
        if handler is None or not isinstance(kind, str) or not isinstance(team_id, str) \
                or not (agent_id is None or isinstance(agent_id, str)):
            metrics.forwarded_in["malformed"] += 1
            stream.refuse(ErrorCode.PROTOCOL_ERROR, f"unknown or malformed control request {kind!r}")
            return
        agent: Optional[ConnectedAgent] = None
        if agent_id is not None:
            agent = held_here(self._fleet, stream, agent_id, team_id, f"a {kind} control request")
            if agent is None:
                return
        metrics.controls_in[kind] += 1
        stream.accept()
        self._fleet.spawn(self._run(handler, stream, kind, team_id, agent))

    async def _run(self, handler: Handler, stream: MuxStream, kind: str, team_id: str,
                   agent: Optional[ConnectedAgent]) -> None:
        try:
            async with asyncio.timeout(REQUEST_TIMEOUT):
                body = await read_frame(stream)
        except (TimeoutError, ConnectionError, ValueError) as exc:
            stream.abort(ErrorCode.PROTOCOL_ERROR, f"no valid request frame: {exc}")
            return
        call = ControlCall(stream, kind, team_id, agent, body)
        try:
            await handler(call)
        except Exception:
            log.exception("control request %s for team %s failed", kind, team_id)
            stream.abort(ErrorCode.INTERNAL_ERROR, "the control request failed at the holder")
            return
        stream.close()  # the answer is complete
