"""The events are public API: the same behaviour whether relay.mux.events is compiled
(Cython dataclass extension types) or the pure-Python twin (frozen slotted dataclasses)."""
from __future__ import annotations

import copy
import dataclasses
import pickle

import pytest

from relay.mux import events
from relay.mux.events import (
    ConnectionTerminated,
    DataReceived,
    Event,
    StreamEnded,
    StreamReset,
    data_received,
)


def test_keyword_construction_defaults_and_repr() -> None:
    event = DataReceived(stream_id=3, data=b"hi", flow_controlled_length=2)
    assert event.end_stream is False
    assert repr(event) == "DataReceived(stream_id=3, data=b'hi', flow_controlled_length=2, end_stream=False)"
    assert repr(StreamReset(stream_id=1, error_code=8)) == (
        "StreamReset(stream_id=1, error_code=8, message='', remote=True)")
    with pytest.raises(TypeError):
        DataReceived(3, b"hi", 2)  # type: ignore[misc]  # keyword-only
    with pytest.raises(TypeError):
        StreamEnded()  # type: ignore[call-arg]  # no default


def test_fields_are_immutable() -> None:
    event = DataReceived(stream_id=3, data=b"hi", flow_controlled_length=2)
    with pytest.raises(AttributeError):
        event.stream_id = 4  # type: ignore[misc]
    assert event.stream_id == 3
    with pytest.raises(AttributeError):
        data_received(1, b"x", 1).data = b"y"  # type: ignore[misc]


def test_equality_hash_and_isinstance() -> None:
    a = StreamEnded(stream_id=5)
    assert a == StreamEnded(stream_id=5)
    assert a != StreamEnded(stream_id=7)
    assert a != DataReceived(stream_id=5, data=b"", flow_controlled_length=0)
    assert hash(a) == hash(StreamEnded(stream_id=5))
    assert isinstance(a, Event)
    assert {a, StreamEnded(stream_id=5)} == {a}


def test_fast_constructor_builds_the_same_event() -> None:
    assert data_received(1, b"abc", 3) == DataReceived(stream_id=1, data=b"abc", flow_controlled_length=3)
    fin = data_received(1, b"abc", 3, True)
    assert type(fin) is DataReceived and fin.end_stream is True


def test_dataclass_helpers_pickle_and_copy() -> None:
    event = DataReceived(stream_id=1, data=b"abc", flow_controlled_length=3, end_stream=True)
    assert dataclasses.is_dataclass(event)
    assert [f.name for f in dataclasses.fields(event)] == [
        "stream_id", "data", "flow_controlled_length", "end_stream"]
    assert dataclasses.asdict(event) == {
        "stream_id": 1, "data": b"abc", "flow_controlled_length": 3, "end_stream": True}
    assert dataclasses.replace(event, data=b"x") == DataReceived(
        stream_id=1, data=b"x", flow_controlled_length=3, end_stream=True)
    assert pickle.loads(pickle.dumps(event)) == event
    assert copy.copy(event) == event


def test_default_factory_gives_each_event_its_own_dict() -> None:
    first, second = ConnectionTerminated(error_code=0), ConnectionTerminated(error_code=0)
    assert first.extra == {} and first.extra is not second.extra


def test_every_event_is_a_dataclass_subclass_of_event() -> None:
    classes = [value for value in vars(events).values()
               if isinstance(value, type) and issubclass(value, Event) and value is not Event]
    assert len(classes) == 10
    assert all(dataclasses.is_dataclass(cls) for cls in classes)
