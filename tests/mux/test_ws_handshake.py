"""The opening handshake against wsproto's own client and server, in memory (sans-IO)."""
from __future__ import annotations

import json

import h11
import pytest
from wsproto import ConnectionType, WSConnection
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    Message,
    RejectConnection,
    RejectData,
    Request,
)

from relay.ws import FrameParser, Opcode, encode_frame
from relay.ws.handshake import (
    ClientHandshake,
    HandshakeError,
    HandshakeRejected,
    accept_response,
    parse_upgrade_request,
    reject_response,
)


def h11_request(data: bytes) -> h11.Request:
    server = h11.Connection(h11.SERVER)
    server.receive_data(data)
    event = server.next_event()
    assert isinstance(event, h11.Request)
    return event


# --- our client, wsproto's server ----------------------------------------------------

@pytest.mark.parametrize("bytewise", [False, True], ids=["whole", "bytewise"])
def test_client_against_wsproto_server(bytewise):
    client = ClientHandshake("gw.example.com", "/agent?id=7", subprotocols=["relay.v1", "x"],
                             extra_headers=[("Authorization", "Bearer secret")])
    server = WSConnection(ConnectionType.SERVER)
    server.receive_data(client.request_bytes())
    request = next(server.events())
    assert isinstance(request, Request)
    assert (request.host, request.target) == ("gw.example.com", "/agent?id=7")
    assert request.subprotocols == ["relay.v1", "x"]
    assert (b"authorization", b"Bearer secret") in request.extra_headers

    response = server.send(AcceptConnection(subprotocol="relay.v1"))
    first_frames = server.send(Message(data=b"hello")) + server.send(Message(data=b"again"))
    wire = response + first_frames
    if bytewise:
        results = [client.receive_data(wire[i:i + 1]) for i in range(len(response))]
        assert results[:-1] == [None] * (len(response) - 1)
        accepted = results[-1]
        leftover = accepted.leftover + wire[len(response):]
    else:
        accepted = client.receive_data(wire)
        leftover = accepted.leftover
    assert accepted.subprotocol == "relay.v1"
    assert leftover == first_frames
    assert FrameParser(1024, require_mask=False).feed(leftover) == [
        (Opcode.BINARY, b"hello"), (Opcode.BINARY, b"again")]

    # And our masked frames are accepted by wsproto's server connection.
    server.receive_data(encode_frame(Opcode.BINARY, b"up", mask=True))
    event = next(server.events())
    assert isinstance(event, BytesMessage) and event.data == b"up"


def test_client_sees_rejection_with_its_body():
    client = ClientHandshake("gw.example.com", "/agent")
    server = WSConnection(ConnectionType.SERVER)
    server.receive_data(client.request_bytes())
    next(server.events())
    body = b'{"error": {"code": "unauthorized", "message": "bad token"}}'
    wire = server.send(RejectConnection(status_code=401, has_body=True, headers=[
        (b"content-length", str(len(body)).encode())]))
    assert client.receive_data(wire) is None  # waits for the body to explain itself
    with pytest.raises(HandshakeRejected) as info:
        client.receive_data(server.send(RejectData(data=body, body_finished=True)))
    assert info.value.status_code == 401
    assert info.value.body == body
    assert "401" in str(info.value) and "bad token" in str(info.value)


def test_client_rejection_body_ends_at_eof():
    client = ClientHandshake("h", "/")
    client.request_bytes()
    assert client.receive_data(b"HTTP/1.1 503 Busy\r\n\r\nslow down") is None
    with pytest.raises(HandshakeRejected) as info:
        client.receive_data(b"")
    assert (info.value.status_code, info.value.body) == (503, b"slow down")


def _response_101(client: ClientHandshake, **changes) -> bytes:
    from wsproto.utilities import generate_accept_token

    headers = {"Upgrade": "websocket", "Connection": "Upgrade",
               "Sec-WebSocket-Accept": generate_accept_token(client._nonce).decode()}
    headers.update(changes)
    lines = ["HTTP/1.1 101 Switching Protocols"]
    lines += [f"{k}: {v}" for k, v in headers.items() if v is not None]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def test_client_accepts_a_valid_hand_made_101():
    client = ClientHandshake("h", "/", subprotocols=["a"])
    client.request_bytes()
    accepted = client.receive_data(_response_101(client, **{
        "Connection": "keep-alive, Upgrade", "Upgrade": "WebSocket",
        "Sec-WebSocket-Protocol": "a"}) + b"\x82\x00")
    assert (accepted.subprotocol, accepted.leftover) == ("a", b"\x82\x00")


@pytest.mark.parametrize("changes, fragment", [
    ({"Sec-WebSocket-Accept": "d3Jvbmc="}, "Sec-WebSocket-Accept"),
    ({"Sec-WebSocket-Accept": None}, "Sec-WebSocket-Accept"),
    ({"Upgrade": "h2c"}, "Upgrade: websocket"),
    ({"Connection": "close"}, "Connection: Upgrade"),
    ({"Sec-WebSocket-Protocol": "unoffered"}, "not offered"),
    ({"Sec-WebSocket-Extensions": "permessage-deflate"}, "extension"),
])
def test_client_refuses_invalid_101(changes, fragment):
    client = ClientHandshake("h", "/")
    client.request_bytes()
    with pytest.raises(HandshakeError) as info:
        client.receive_data(_response_101(client, **changes))
    assert fragment in str(info.value)


def test_client_refuses_malformed_http_and_early_eof():
    client = ClientHandshake("h", "/")
    client.request_bytes()
    with pytest.raises(HandshakeError, match="malformed"):
        client.receive_data(b"NOT HTTP AT ALL\r\n\r\n")
    client = ClientHandshake("h", "/")
    client.request_bytes()
    with pytest.raises(HandshakeError):
        client.receive_data(b"")


# --- wsproto's client, our server ----------------------------------------------------

def test_server_against_wsproto_client():
    client = WSConnection(ConnectionType.CLIENT)
    request_bytes = client.send(Request(
        host="gw.example.com", target="/agent", subprotocols=["relay.v1", "other"],
        extra_headers=[(b"Authorization", b"Bearer secret")]))
    upgrade = parse_upgrade_request(h11_request(request_bytes))
    assert (upgrade.host, upgrade.target) == ("gw.example.com", "/agent")
    assert upgrade.subprotocols == ["relay.v1", "other"]
    assert (b"authorization", b"Bearer secret") in upgrade.headers

    response = accept_response(upgrade, subprotocol="relay.v1",
                               extra_headers=[("X-Relay-Gateway", "g1")])
    client.receive_data(response + encode_frame(Opcode.BINARY, b"welcome"))
    events = list(client.events())
    assert isinstance(events[0], AcceptConnection)
    assert events[0].subprotocol == "relay.v1"
    assert (b"x-relay-gateway", b"g1") in events[0].extra_headers
    assert isinstance(events[1], BytesMessage) and events[1].data == b"welcome"

    # wsproto's client frames are masked; our server-side parser takes them.
    assert FrameParser(1024, require_mask=True).feed(client.send(Message(data=b"up"))) == [
        (Opcode.BINARY, b"up")]


def test_our_client_against_our_server():
    client = ClientHandshake("localhost:8080", "/agent", subprotocols=["relay.v1"])
    upgrade = parse_upgrade_request(h11_request(client.request_bytes()))
    accepted = client.receive_data(accept_response(upgrade, "relay.v1"))
    assert accepted.subprotocol == "relay.v1"
    assert accepted.leftover == b""


def test_accept_refuses_unoffered_subprotocol():
    upgrade = parse_upgrade_request(h11_request(ClientHandshake("h", "/").request_bytes()))
    with pytest.raises(ValueError):
        accept_response(upgrade, subprotocol="relay.v1")


GOOD = {"Host": "h", "Upgrade": "websocket", "Connection": "Upgrade",
        "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==", "Sec-WebSocket-Version": "13"}


@pytest.mark.parametrize("method, changes, status, fragment", [
    ("POST", {}, 405, "GET"),
    ("GET", {"Connection": "keep-alive"}, 400, "Connection"),
    ("GET", {"Upgrade": "h2c"}, 400, "Upgrade"),
    ("GET", {"Sec-WebSocket-Version": "8"}, 426, "Version"),
    ("GET", {"Sec-WebSocket-Version": None}, 400, "Version"),
    ("GET", {"Sec-WebSocket-Key": None}, 400, "Key"),
])
def test_server_refuses_invalid_upgrades(method, changes, status, fragment):
    headers = {**GOOD, **changes}
    request = h11.Request(method=method, target="/agent", headers=[
        (k, v) for k, v in headers.items() if v is not None])
    with pytest.raises(HandshakeError) as info:
        parse_upgrade_request(request)
    error = info.value
    assert error.status_code == status
    assert fragment in error.message

    # The rejection is a complete HTTP response with the project's JSON error body.
    reader = h11.Connection(h11.CLIENT)
    reader.send(h11.Request(method="GET", target="/", headers=[("Host", "h")]))
    reader.receive_data(reject_response(error))
    response = reader.next_event()
    assert response.status_code == status
    if status == 426:
        assert (b"sec-websocket-version", b"13") in response.headers
    body = reader.next_event().data
    assert isinstance(reader.next_event(), h11.EndOfMessage)
    assert json.loads(body) == {"error": {"code": "bad_websocket_upgrade",
                                          "message": error.message}}
