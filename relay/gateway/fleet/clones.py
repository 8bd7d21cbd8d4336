"""Clones across the fleet: the first live agent process keeps its identity.

Two ``relay agent`` processes with the same key and name are one agent identity (a
cloned machine; the default name is the host name). On one gateway the first keeps it
while it answers a PING, and the newcomer is refused with GOAWAY ``NOT_ALLOWED``
(relay.gateway.agents.registry). In a fleet the two may dial different gateways, and
the lease rules alone would let each new session of either process supersede the
other's (a new process raises the floor: relay.gateway.fleet.leases), so they would
take the agent from each other at every reconnect. The same rule therefore applies
across gateways, before the newcomer is admitted (:meth:`CloneGuard.admission`):

1. Redis says which process holds each live session of the agent (one round trip; the
   instance id of the agent's hello is in each lease). Sessions of the newcomer's own
   process (its other connections, or a reconnect) are not rivals, nor are sessions
   on gateways whose lease expired or this gateway's own (the local rule decides).
2. Each rival's gateway is asked, with an ``alive`` control request
   (relay.gateway.fleet.control), whether that session answers a PING there.
3. One that answers keeps the agent: the newcomer is refused as on one gateway. A
   holder that does not answer (a half-open connection), a gateway that no longer
   holds it, or one that cannot be asked (it does not take the question within
   :data:`ACCEPT_WAIT`: frozen, cut off) does not: the newcomer is admitted and its claim supersedes the old session, as
   before.

Redis unreachable: nothing can be known, the newcomer is admitted. Two clones admitted
at the same instant on two gateways (neither lease written yet when the other asked)
are settled once: the later claim wins, the other session is ended, and when its
process dials again the winner is alive and it is refused from then on.
"""
from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Optional

from relay.gateway.agents.registry import PROBE_TIMEOUT, answers_ping, peer_address
from relay.gateway.fleet.leases import safe_instance

if TYPE_CHECKING:
    from relay.gateway.fleet import Fleet
    from relay.gateway.fleet.control import ControlCall

__all__ = ["ACCEPT_WAIT", "ANSWER_WAIT", "CloneGuard"]

log = logging.getLogger("relay.gateway.fleet.clones")

#: How long a gateway holding a rival process has to take the question (a live one
#: takes it in a round trip; a frozen one never does, and must not hold the newcomer
#: up for long), then to answer it (its PING probe takes at most
#: relay.gateway.agents.registry.PROBE_TIMEOUT).
ACCEPT_WAIT = 1.5
ANSWER_WAIT = PROBE_TIMEOUT + 1.0


class CloneGuard:
    """The fleet-wide half of the "first live process keeps the name" rule."""

    def __init__(self, fleet: "Fleet") -> None:
        self._fleet = fleet

    async def admission(self, agent_id: str, name: str, instance: str) -> Optional[str]:
        """Where another live process with this identity is held by another gateway
        (``"ADDRESS through gateway ID"``), or None: admit the newcomer (module
        docstring). ``instance`` is the newcomer's ("" if it sent none)."""
        fleet = self._fleet
        if not fleet.redis_up:
            return None
        try:
            processes = await fleet.leases.processes(agent_id)
        except Exception as exc:
            fleet.redis_failed("look up the sessions of agent " + agent_id, exc)
            return None
        mine = safe_instance(instance)
        live = fleet.registry.gateways
        rivals = [(gateway_id, team_id) for gateway_id, (held, team_id) in processes.items()
                  if gateway_id != fleet.gateway_id and gateway_id in live and (not mine or held != mine)]
        if not rivals:
            return None
        answers = await asyncio.gather(*(self._probe(gateway_id, team_id, agent_id)
                                         for gateway_id, team_id in rivals))
        for (gateway_id, _), peer in zip(rivals, answers, strict=True):
            if peer is not None:
                return f"{peer} through gateway {gateway_id}"
        log.info("agent %r (%s): the other process holding it does not answer at gateway(s) %s; "
                 "admitting the new one", name, agent_id, ", ".join(g for g, _ in rivals))
        return None

    async def _probe(self, gateway_id: str, team_id: str, agent_id: str) -> Optional[str]:
        """The holder's address if its session at ``gateway_id`` answers a PING there."""
        try:
            async with asyncio.timeout(ACCEPT_WAIT):
                reply = await self._fleet.control.request(gateway_id, "alive", team_id, {}, agent_id=agent_id)
            try:
                answer = await reply.next(ANSWER_WAIT)
            finally:
                reply.close()
        except (TimeoutError, ConnectionError, ValueError) as exc:
            log.debug("agent %s: no answer from gateway %s about its session there: %s", agent_id, gateway_id,
                      exc or type(exc).__name__)
            return None
        if not isinstance(answer, dict) or answer.get("alive") is not True:
            return None
        peer = answer.get("peer")
        return peer if isinstance(peer, str) else "an unknown address"

    @staticmethod
    async def serve_alive(call: "ControlCall") -> None:
        """The ``alive`` control request: does the agent's session here answer a PING?"""
        assert call.agent is not None  # a request for an agent (checked by the channel)
        alive = await answers_ping(call.agent.session)
        call.send({"alive": alive, "peer": peer_address(call.agent.peer)})
