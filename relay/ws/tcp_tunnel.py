"""The TCP-over-WebSocket convention of ``/tunnel/TOKEN/tcp`` (``relay connect``).

One WebSocket carries one TCP connection (one mux stream to the tunnel's target). A byte
stream needs an end (half-close) and an abort (reset) in each direction, which WebSocket
has not as such, so (docs/PROTOCOL.md section 14.2):

* **binary** messages carry the bytes; their boundaries mean nothing (an empty one is
  allowed and carries nothing);
* the **text** message ``EOF`` (:data:`EOF_MESSAGE`) is a half-close: the sender sends no
  more binary messages, and keeps reading. The gateway turns it into the stream's FIN
  after the bytes before it; ``relay connect`` into ``shutdown(SHUT_WR)`` of its local
  connection. Any other text message is a protocol error (close 1003, a reset);
* **close 1000** is a clean end: the sender's direction has ended (it implies ``EOF`` if
  none was sent). The gateway sends it once both directions have ended, after the last
  byte; ``relay connect`` then closes its local connection after the last byte;
* **any other close code**, or a connection that ends without a closing handshake, is a
  **reset**: the bytes were cut short. The gateway sends :data:`CLOSE_RESET` (4000, the
  reason names the mux error code) when the stream is reset or the agent's session
  ends, and resets the stream (CANCEL) on a reset from the client; ``relay connect``
  aborts its local connection with a TCP RST, and sends 4000 when its local connection
  was reset.

The same URL also speaks the multiplexer (docs/PROTOCOL.md section 14.1): a client that
offers the WebSocket subprotocol :data:`MUX_SUBPROTOCOL` and gets it back carries one
mux session on the WebSocket, one stream per TCP connection (``relay connect``).
"""
from __future__ import annotations

__all__ = ["CLOSE_RESET", "EOF_MESSAGE", "MUX_SUBPROTOCOL", "reset_reason"]

#: Text message payload: "no more bytes from me; keep sending yours" (half-close).
EOF_MESSAGE = b"EOF"
#: Close code (private-use range 4000-4999): the byte stream was reset, not ended.
CLOSE_RESET = 4000
#: WebSocket subprotocol of a tcp tunnel URL carrying one mux session (many TCP
#: connections, a stream each) instead of one TCP connection.
MUX_SUBPROTOCOL = "relay.mux.v1"


def reset_reason(exc: object) -> str:
    """A close reason for a reset, from the exception that ended the stream (the
    framing cuts it to fit a close frame)."""
    return str(exc) if exc is not None else "stream reset"
