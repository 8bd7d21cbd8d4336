"""Forwarding: agents held by another gateway, seen from here, and forwarded streams
served at the gateway that holds the agent.

On the gateway a request lands on (B), :meth:`Registry.get
<relay.gateway.agents.registry.Registry.get>` falls back to the fleet for an agent it
does not hold, and gets a :class:`RemoteAgent`: a ``ConnectedAgent`` whose ``session``
is a :class:`ForwardSession`. Its ``open_stream_nowait(metadata)`` opens a stream on
the peer session to the holder (A) with the metadata ``{"agent": id, "team": team,
"meta": metadata}``, and returns that stream: every caller (hub ports, the HTTP proxy,
the TCP-over-WebSocket relay, share links) splices it as it would a stream to a local
agent, so nothing else changes and flow control is the mux's own on both hops.

On A, :func:`serve_forwarded` checks the OPEN: the agent must be held *here*, in the
team the metadata names (a peer forwarding for another team's agent is refused
NOT_ALLOWED and logged: a peer's word is not trusted beyond the fleet secret it
proved). Then it opens a stream to the agent with the inner metadata (the gateway's
stream hooks apply as for any stream) and joins the two (relay.gateway.fleet.bridge).
An agent no longer held here (it moved) is refused REFUSED; the forwarding gateway's
cache is corrected by the registry's events. :func:`held_here` is that check, shared
with control requests (relay.gateway.fleet.control: streams whose metadata has
``"ctl"``, which :func:`serve_forwarded` hands to the fleet's control channel).
"""
from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional

from relay.aio.stream import MuxStream
from relay.gateway.agents.registry import ConnectedAgent
from relay.gateway.fleet.bridge import StreamTransport, join_streams
from relay.gateway.fleet.control import CONTROL_KEY
from relay.gateway.fleet.leases import Location
from relay.mux.errors import ErrorCode

if TYPE_CHECKING:
    from relay.gateway.fleet import Fleet

__all__ = ["ForwardSession", "RemoteAgent", "held_here", "serve_forwarded"]

log = logging.getLogger("relay.gateway.fleet.forward")


class ForwardSession:
    """Stands for an agent's session on another gateway: streams opened on it travel
    over the peer session to that gateway (module docstring)."""

    def __init__(self, fleet: "Fleet", agent_id: str, location: Location) -> None:
        self._fleet = fleet
        self.agent_id = agent_id
        self.location = location
        #: What an agent's hello would say; unknown here (the holder's checks apply).
        self.peer_info: dict[str, Any] = {}
        #: Streams are counted on the peer session, not per remote agent.
        self.streams: dict[int, MuxStream] = {}
        self.agent: Any = None

    def __repr__(self) -> str:
        return f"<ForwardSession agent={self.agent_id} via={self.location.gateway_id} epoch={self.location.epoch}>"

    @property
    def is_closed(self) -> bool:
        """True once the agent's session on that gateway is gone or changed, or the peer
        session to that gateway is down (callers that cached this agent look it up again
        and may find another of its gateways), or the fleet stopped."""
        fleet = self._fleet
        return (fleet.closed or fleet.registry.locations.get(self.agent_id, {}).get(self.location.gateway_id)
                is not self.location or not fleet.peers.is_up(self.location.gateway_id))

    @property
    def established(self) -> bool:
        return not self.is_closed

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default  # no socket to this agent here

    def open_stream_nowait(self, metadata: Optional[dict[str, Any]] = None) -> MuxStream:
        """Open a stream to the agent through its gateway. Raises ConnectionError if the
        peer session to that gateway is not open (yet)."""
        gateway_id = self.location.gateway_id
        peer = self._fleet.peers.session(gateway_id)
        if peer is None:
            raise ConnectionError(f"the gateway holding the agent ({gateway_id}) is not reachable yet")
        self._fleet.metrics.forwarded_out += 1
        return peer.open_stream_nowait({"agent": self.agent_id, "team": self.location.team_id,
                                        "meta": metadata or {}})

    async def open_stream(self, metadata: Optional[dict[str, Any]] = None) -> MuxStream:
        stream = self.open_stream_nowait(metadata)
        await stream.wait_accepted()
        return stream

    def send_control(self, message: Any) -> None:
        # Control messages to an agent held elsewhere are control requests to its gateway
        # (relay.gateway.fleet.control), made by the component that needs the answer.
        raise ConnectionError("the agent is held by another gateway: ask it with a control request")

    async def ping(self) -> None:
        peer = self._fleet.peers.session(self.location.gateway_id)
        if peer is None:
            raise ConnectionError("the agent's gateway is not reachable")
        await peer.ping()

    def abort(self, *args: Any, **kwargs: Any) -> None:
        pass  # the holder ends the agent's session, never us

    close = abort


@dataclass
class RemoteAgent(ConnectedAgent):
    """An agent connected to another gateway of the fleet (``session`` is a
    :class:`ForwardSession`)."""

    gateway_id: str = ""
    remote: bool = True


def held_here(fleet: "Fleet", stream: MuxStream, agent_id: str, team_id: str,
              what: str) -> Optional[ConnectedAgent]:
    """The agent a peer's stream names, if held here in the team named; else the stream
    is refused: NOT_ALLOWED (and a WARNING) when the agent is here in another team (a
    forged or confused request: a peer is trusted no further than the fleet secret it
    proved), REFUSED when it is not here (it moved; the peer's cache catches up)."""
    registry = fleet.gateway.registry
    entry = registry.local(team_id, agent_id)
    if entry is not None:
        return entry
    metrics = fleet.metrics
    if registry.local_any(agent_id) is not None:
        metrics.forwarded_in["forged"] += 1
        log.warning("refused %s forwarded by a peer for agent %s as team %s: the agent is in "
                    "another team", what, agent_id, team_id)
        stream.refuse(ErrorCode.NOT_ALLOWED, "no such agent in that team")
        return None
    metrics.forwarded_in["not_here"] += 1
    stream.refuse(ErrorCode.REFUSED, "the agent is not connected to this gateway")
    return None


def serve_forwarded(fleet: "Fleet", stream: MuxStream) -> None:
    """A stream another gateway opened on a peer session: a control request
    (relay.gateway.fleet.control), or a stream for an agent (module docstring)."""
    meta = stream.metadata
    if isinstance(meta, dict) and CONTROL_KEY in meta:
        fleet.control.serve(stream)
        return
    agent_id = meta.get("agent") if isinstance(meta, dict) else None
    team_id = meta.get("team") if isinstance(meta, dict) else None
    inner = meta.get("meta") if isinstance(meta, dict) else None
    metrics = fleet.metrics
    if not isinstance(agent_id, str) or not isinstance(team_id, str) or not isinstance(inner, dict):
        metrics.forwarded_in["malformed"] += 1
        stream.refuse(ErrorCode.PROTOCOL_ERROR, "a forwarded stream names an agent, a team and metadata")
        return
    entry = held_here(fleet, stream, agent_id, team_id, "a stream")
    if entry is None:
        return
    try:
        target = entry.session.open_stream_nowait(inner)
    except ConnectionError as exc:
        metrics.forwarded_in["not_here"] += 1
        stream.refuse(ErrorCode.REFUSED, f"the agent is not reachable: {exc}")
        return
    metrics.forwarded_in["joined"] += 1
    joined = join_streams(stream, target, metrics)
    if not target.answered:
        task = asyncio.get_running_loop().create_task(_answer_when_accepted(target, joined))
        fleet.track(task)


async def _answer_when_accepted(target: MuxStream, transport: StreamTransport) -> None:
    """Accept the forwarded stream as soon as the agent accepted ours (a refusal is
    passed on by the join itself)."""
    try:
        await target.wait_accepted()
    except ConnectionError:
        return
    if not transport.is_closing():
        transport._answer()
