"""The Tunnels API's ``connect``: an agent listens on a loopback port that reaches a tunnel.

``POST /api/v1/tunnels/{id}/connect`` asks an agent (the "receiver") to bind
``127.0.0.1:local_port`` and relay each connection to the tunnel's hub port (the agent's
side is :mod:`relay.agent.bind`). Binding can fail on the agent (the port is taken, or
below 1024 without the privilege), so the answer waits for the agent's result:

* gateway → agent: ``{"type": "bind", "request_id", "tunnel_id", "local_port", "hub":
  {"host", "port"}, "protocol"}``;
* agent → gateway: ``{"type": "bind.result", "request_id", "tunnel_id", "ok": true,
  "local_port"}`` or ``{..., "ok": false, "error": "why"}``.

Success is recorded in the store (one port per tunnel and agent) and answered 200 with
the connection string; a failure is ``502 bind_failed`` with the agent's reason; no
answer within :data:`BIND_TIMEOUT` (an agent too old to send results, or a stuck one) is
``504 bind_timeout``; the receiver leaving meanwhile is ``409 agent_offline``.

In a fleet, a receiver held by another gateway is asked through it: the ``bind`` message
(with the hub address of the gateway the request landed on) travels as a ``bind``
control request (relay.gateway.fleet.control); the holder sends it to the agent and
answers the agent's ``bind.result`` (:meth:`Bindings.serve_peer`), and the gateway that
was asked records the binding and answers as for a local receiver.

Bindings outlive the receiver's connection: whenever it connects again (a network blip,
an agent restart, a gateway restart) the gateway re-sends each of its stored bindings,
with the hub address of now; the agent answers a binding it already serves without
rebinding. A failure then (the port taken meanwhile) is logged as a WARNING and retried
at the next connection. Deleting the tunnel deletes its bindings (store cascade).
"""
from __future__ import annotations

import asyncio
import logging
import secrets
from typing import TYPE_CHECKING, Any, Optional
from urllib.parse import urlsplit

from relay.gateway.agents.registry import ConnectedAgent
from relay.gateway.http.server import HttpError
from relay.gateway.store import Tunnel
from relay.mux.errors import ErrorCode

if TYPE_CHECKING:
    from relay.gateway.app import Gateway
    from relay.gateway.fleet.control import ControlCall

__all__ = ["BIND_TIMEOUT", "Bindings"]

log = logging.getLogger("relay.gateway.agents.bindings")

#: How long ``connect`` waits for the agent's bind result.
BIND_TIMEOUT = 10.0
#: Longest error text taken from an agent's result (it ends up in an API answer and logs).
MAX_ERROR = 300


class Bindings:
    """Sends ``bind`` messages, waits for their results, re-sends stored bindings."""

    def __init__(self, gateway: Gateway) -> None:
        self.gw = gateway
        # request id -> (the receiver's session, future of its result message)
        self._waiting: dict[str, tuple[Any, asyncio.Future]] = {}

    def hub(self, tunnel: Tunnel) -> dict[str, Any]:
        """Where the receiver reaches the tunnel: the hub port on the gateway host."""
        tunnels = self.gw.tunnels
        hub = tunnels.hub(tunnel.id) if tunnels else None
        hub_host = hub.host if hub is not None and hub.host else (tunnels.hub_host if tunnels else None)
        if hub_host in ("", "0.0.0.0", "::"):  # listening everywhere: name the gateway's host
            hub_host = urlsplit(self.gw.url).hostname
        return {"host": hub_host, "port": tunnel.hub_port}

    def _message(self, tunnel: Tunnel, local_port: int, request_id: str) -> dict[str, Any]:
        return {"type": "bind", "request_id": request_id, "tunnel_id": tunnel.id,
                "local_port": local_port, "hub": self.hub(tunnel), "protocol": tunnel.protocol}

    async def bind(self, receiver: ConnectedAgent, tunnel: Tunnel, local_port: int) -> dict[str, Any]:
        """Have ``receiver`` listen on ``local_port`` for ``tunnel``, wait for its result,
        record the binding; returns the hub address. Raises HttpError 409/502/504."""
        message = self._message(tunnel, local_port, secrets.token_hex(8))
        answer = await (self._ask_elsewhere(receiver, message) if receiver.remote else self._ask(receiver, message))
        if answer is None:
            raise HttpError(504, "bind_timeout",
                            f"agent {receiver.agent_id} ({receiver.name}) did not report binding "
                            f"127.0.0.1:{local_port} within {BIND_TIMEOUT:.0f}s (an agent too old "
                            f"to report it?)")
        if answer.get("ok") is not True:
            raise HttpError(502, "bind_failed",
                            f"agent {receiver.agent_id} ({receiver.name}) cannot listen on "
                            f"127.0.0.1:{local_port}: {_error(answer)}")
        await self.gw.store.put_binding(tunnel.team_id, tunnel.id, receiver.agent_id, local_port)
        return message["hub"]

    async def _ask(self, receiver: ConnectedAgent, message: dict[str, Any]) -> Optional[dict[str, Any]]:
        """Send ``message`` to ``receiver`` (held here) and wait for its ``bind.result``
        (None: no answer within :data:`BIND_TIMEOUT`). Raises HttpError 409 if the
        receiver leaves first."""
        request_id = message["request_id"]
        session = receiver.session
        result: asyncio.Future = asyncio.get_running_loop().create_future()
        self._waiting[request_id] = (session, result)
        try:
            try:
                session.send_control(message)
            except Exception as exc:  # the session died between the lookup and the send
                raise _offline(receiver, exc) from None
            closed = asyncio.ensure_future(session.wait_closed())
            try:
                done, _ = await asyncio.wait({result, closed}, timeout=BIND_TIMEOUT,
                                             return_when=asyncio.FIRST_COMPLETED)
            finally:
                closed.cancel()
            if result not in done:
                if closed in done:
                    raise _offline(receiver, "its connection ended before it answered")
                return None
            answer: dict[str, Any] = result.result()
            return answer
        finally:
            self._waiting.pop(request_id, None)

    async def _ask_elsewhere(self, receiver: ConnectedAgent,
                             message: dict[str, Any]) -> Optional[dict[str, Any]]:
        """:meth:`_ask` for a receiver held by another gateway of the fleet."""
        fleet = self.gw.fleet
        if fleet is None:
            raise _offline(receiver, "it is held by another gateway and this one is not in a fleet")
        try:
            reply = await fleet.control.ask_agent(receiver, "bind", message)
            try:
                answer = await reply.next(BIND_TIMEOUT + 2.0)  # the holder's own wait, and the hops
            finally:
                reply.close()
        except TimeoutError:
            return None
        except (ConnectionError, ValueError) as exc:  # refused (it left), or the peer session ended
            raise _offline(receiver, exc) from None
        return answer if isinstance(answer, dict) else None

    async def serve_peer(self, call: "ControlCall") -> None:
        """A ``bind`` control request from another gateway for an agent held here:
        the message is checked and rebuilt (only a bind goes to the agent), the agent's
        result is the answer; no answer in time ends the request without one."""
        body, receiver = call.body, call.agent
        assert receiver is not None  # a request for an agent (checked by the channel)
        if not isinstance(body, dict) or not isinstance(body.get("request_id"), str) \
                or not isinstance(body.get("tunnel_id"), str) or not isinstance(body.get("local_port"), int) \
                or not isinstance(body.get("hub"), dict) or not isinstance(body.get("protocol"), str):
            call.refuse(ErrorCode.PROTOCOL_ERROR, "a bind request carries a bind message")
            return
        message = {"type": "bind", "request_id": body["request_id"], "tunnel_id": body["tunnel_id"],
                   "local_port": body["local_port"], "hub": body["hub"], "protocol": body["protocol"]}
        try:
            answer = await self._ask(receiver, message)
        except HttpError as exc:
            call.refuse(ErrorCode.REFUSED, exc.message)
            return
        if answer is not None:
            call.send(answer)

    def unbind(self, team_id: str, agent_id: str, tunnel_id: str) -> None:
        """Tell the agent, if it is online, to stop listening for the tunnel (its binding
        is already gone from the store, so it is not re-sent at its next connection)."""
        entry = self.gw.registry.get(team_id, agent_id)
        if entry is None:
            return
        try:
            entry.session.send_control({"type": "unbind", "tunnel_id": tunnel_id})
        except Exception as exc:  # gone meanwhile: it will not get the binding again
            log.info("cannot send unbind to agent %s: %s", agent_id, exc)

    def on_control(self, entry: ConnectedAgent, message: Any) -> bool:
        """Take a ``bind.result`` from an agent; False for any other message."""
        if not isinstance(message, dict) or message.get("type") != "bind.result":
            return False
        request_id = message.get("request_id")
        waiting = self._waiting.get(request_id) if isinstance(request_id, str) else None
        if waiting is not None and waiting[0] is entry.session:  # only the asked agent answers
            if not waiting[1].done():
                waiting[1].set_result(message)
        elif message.get("ok") is not True:  # a re-sent binding (see agent_connected)
            log.warning("agent %s (%s) cannot bind tunnel %s again on 127.0.0.1:%s: %s",
                        entry.name, entry.agent_id, message.get("tunnel_id"),
                        message.get("local_port"), _error(message))
        return True

    async def agent_connected(self, entry: ConnectedAgent) -> None:
        """Re-send the agent's stored bindings (it may have restarted and lost them)."""
        for tunnel, local_port in await self.gw.store.list_bindings(entry.team_id, entry.agent_id):
            try:
                entry.session.send_control(self._message(tunnel, local_port, secrets.token_hex(8)))
            except Exception as exc:  # gone again already: the next connection re-sends
                log.info("cannot re-send bindings to agent %s: %s", entry.agent_id, exc)
                return
            log.info("re-sent binding of tunnel %s on 127.0.0.1:%d to agent %s (%s)",
                     tunnel.id, local_port, entry.name, entry.agent_id)


def _offline(receiver: ConnectedAgent, why: Any) -> HttpError:
    return HttpError(409, "agent_offline", f"agent {receiver.agent_id} is not connected: {why}")


def _error(message: dict[str, Any]) -> str:
    error = message.get("error")
    return error[:MAX_ERROR] if isinstance(error, str) and error else "no reason given"

