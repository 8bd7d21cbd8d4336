"""``relay connect``'s multiplexed session on a tcp tunnel URL (docs/PROTOCOL.md 14.1).

A client that offers the WebSocket subprotocol ``relay.mux.v1``
(:data:`relay.ws.tcp_tunnel.MUX_SUBPROTOCOL`) on ``/tunnel/TOKEN/tcp`` gets one mux
session on that WebSocket instead of one TCP connection; the client is the dialer (odd
stream ids). Every stream it opens is one TCP connection to the tunnel's target: the
gateway opens a stream to the agent exactly as for a hub port connection
(:meth:`TunnelManager.open_target_stream`: agent online, no loop into the gateway, the
hub's connection limit; in a fleet the agent may be held by another gateway) and joins
the two (:func:`relay.gateway.fleet.bridge.join_streams`): bytes, ends and resets cross
over, backpressure is end to end through both streams' windows, and a refusal by the
agent (NOT_ALLOWED, CONNECT_FAILED) reaches the client as the same refusal.

The session is authorised once, by the token in the URL, as the plain form is for each
connection; it ends when the tunnel closes (GOAWAY ``NOT_ALLOWED`` "the tunnel was
closed", every stream reset: :meth:`TunnelManager._close_hub`). The gateway opens no
stream towards the client: one that the client is sent would be refused.
"""
from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Optional

from relay.aio import MuxSession, WebSocketTransport
from relay.aio.stream import MuxStream
from relay.gateway.fleet.bridge import StreamTransport
from relay.mux.connection import MuxConfig
from relay.mux.errors import ErrorCode

if TYPE_CHECKING:
    from relay.gateway.agents.tunnel_sessions import HubListener, TunnelManager

__all__ = ["start_tunnel_mux"]

#: The metadata ``relay connect`` opens every stream with. A stream that carries exactly
#: this keeps this one shared copy instead of its own decoded dict (about 300 bytes per
#: idle connection: a connection through ``relay connect`` should cost no more than one
#: through the hub port, which has no stream from the client at all).
_TCP_METADATA = {"protocol": "tcp"}


def start_tunnel_mux(manager: TunnelManager, hub: HubListener, transport: asyncio.Transport,
                     leftover: bytes, config: Optional[MuxConfig] = None) -> MuxSession:
    """Run the mux session of one ``relay connect`` on ``transport`` (upgraded, paused by
    the HTTP layer): each incoming stream is joined to a new stream to ``hub``'s target."""
    session = MuxSession(False, config, on_stream=lambda stream: _serve_stream(manager, hub, stream))
    WebSocketTransport.attach(transport, session, client=False, initial=leftover)
    transport.resume_reading()  # the HTTP layer paused it while the request was handled
    return session


def _serve_stream(manager: TunnelManager, hub: HubListener, incoming: MuxStream) -> None:
    """One local connection of the client: a stream to the target, joined to it."""
    from relay.gateway.agents.tunnel_sessions import _HubSplice

    meta = incoming.metadata
    protocol = meta.get("protocol", "tcp") if isinstance(meta, dict) else None
    if protocol != "tcp":
        incoming.refuse(ErrorCode.PROTOCOL_ERROR, "a tcp tunnel carries streams of protocol 'tcp' only")
        return
    if meta == _TCP_METADATA:
        incoming.metadata = _TCP_METADATA
    outgoing = manager.open_target_stream(hub)
    if outgoing is None:
        incoming.refuse(ErrorCode.REFUSED, hub.last_error or "the tunnel's target is not reachable")
        return
    joined = StreamTransport(incoming)
    # Counted and cut with the hub's connections (a closed tunnel aborts them all).
    joined.start(_HubSplice(outgoing, hub))

    def answer() -> None:  # the agent accepted: so do we (a refusal crosses by the join)
        if not joined.is_closing():
            joined._answer()

    manager._watch(hub, outgoing, answer)
