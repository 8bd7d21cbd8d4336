"""What every binding does with the core's stream events, written once.

A binding (``relay.aio``, ``relay.trio``) keeps its stream objects in ``_streams`` by id;
each has ``_on_data(data, n)``, ``_on_remote_end()``, ``_on_accepted()`` and
``_on_reset(code, message, remote)``, and the session has ``_on_stream_opened(event)``.
Routing those events does not depend on the concurrency library, so it lives here; the
session-level events (hello, ping, control, goaway, termination) are handed back for
each binding to turn into its own futures or trio events.
"""
from __future__ import annotations

from typing import Any

from relay.mux.connection import MuxConnection
from relay.mux.events import DataReceived, Event, StreamAccepted, StreamEnded, StreamOpened, StreamReset


class StreamEventRouter:
    """Mixin for binding sessions: deliver stream events to their stream objects."""

    _conn: MuxConnection
    _streams: dict[int, Any]

    def _on_stream_opened(self, event: StreamOpened) -> None:
        raise NotImplementedError

    def _route_stream_events(self, events: list[Event]) -> list[Event]:
        """Deliver stream events; return the session-level ones, in order."""
        streams = self._streams
        session_events: list[Event] = []
        for event in events:
            # type(event) is ..., not isinstance(): the events are final classes, and this
            # is an identity test (mypy narrows on it too).
            if type(event) is DataReceived:
                stream = streams.get(event.stream_id)
                if stream is not None:
                    stream._on_data(event.data, event.flow_controlled_length)
                else:  # nobody will read it: give the window back
                    self._conn.acknowledge_received_data(event.stream_id, event.flow_controlled_length)
            elif type(event) is StreamEnded:
                stream = streams.get(event.stream_id)
                if stream is not None:
                    stream._on_remote_end()
            elif type(event) is StreamOpened:
                self._on_stream_opened(event)
            elif type(event) is StreamAccepted:
                stream = streams.get(event.stream_id)
                if stream is not None:
                    stream._on_accepted()
            elif type(event) is StreamReset:
                stream = streams.get(event.stream_id)
                if stream is not None:
                    stream._on_reset(event.error_code, event.message, event.remote)
            else:
                session_events.append(event)
        return session_events
