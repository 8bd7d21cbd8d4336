"""Revoking a credential ends what it authorised: the live sessions of its agents, and
the connections it opened that outlive a request.

A key is checked when an agent connects (the WebSocket upgrade); the session lives on
after that. So the gateway watches for revocations: every :data:`POLL_INTERVAL` it reads
the store's generation (SQLite: its WAL-index header, in shared memory; PostgreSQL: from memory,
its change notifications; both see commits of other processes, such as ``relay admin
key revoke`` while the gateway runs), and when anything was committed (or an agent connected) since its last look, it
asks the store which credentials of the connected agents are revoked. Each such agent is
expelled: offline at once, then a GOAWAY ``NOT_ALLOWED`` "credential revoked" and every
open stream reset (their clients cut), so a revocation takes effect within about
``POLL_INTERVAL`` plus a round trip. The agent cannot come back: its next upgrade is
refused with 401.

API requests are authenticated one by one against the store's current rows
(relay.gateway.auth), so the next request with a revoked sk-/dk- key is refused,
keep-alive or not. What outlives a request is *held* (:meth:`RevocationWatcher.hold`):
a client connection the service proxy took over, an upgrade relayed to an external
service, a task's event stream. When the credential that authorised it is revoked, the
same check cuts it with a reset. Agents authenticated by an ``authenticate`` hook with
ids of their own, and JWT users, are not in the credentials table and are never
expelled or cut here.
"""
from __future__ import annotations

import asyncio
import logging
from typing import Any, Optional

from relay.aio.stream import abort_with_reset
from relay.gateway.agents.registry import ConnectedAgent, Registry
from relay.gateway.store import Store
from relay.mux.errors import ErrorCode

__all__ = ["POLL_INTERVAL", "REVOKED_MESSAGE", "RevocationWatcher"]

log = logging.getLogger("relay.gateway.agents.revocation")

#: Seconds between two looks at the store's generation (cheap: no table read).
POLL_INTERVAL = 0.25
#: The GOAWAY and stream-reset message an expelled agent receives.
REVOKED_MESSAGE = "credential revoked"


class RevocationWatcher:
    """Expels connected agents whose credential was revoked (see the module docstring)."""

    def __init__(self, store: Store, registry: Registry, interval: float = POLL_INTERVAL) -> None:
        self._store = store
        self._registry = registry
        self._interval = interval
        self._seen: Optional[tuple[Any, int]] = None
        #: Client connections carrying what a credential authorised beyond one request:
        #: credential id -> transports (closed ones pruned as the set doubles).
        self._held: dict[str, set[Any]] = {}
        self._pruned_at: dict[str, int] = {}
        self._soon: set[asyncio.Task[None]] = set()

    def hold(self, principal: Any, transport: Any) -> None:
        """Cut ``transport`` with a reset if ``principal``'s credential is revoked while
        it is open (no-op for principals without a credential id: JWT users, hooks)."""
        credential_id = getattr(principal, "credential_id", None)
        if credential_id is None:
            return
        held = self._held.setdefault(credential_id, set())
        held.add(transport)
        if len(held) >= 2 * self._pruned_at.get(credential_id, 8):
            held.difference_update([t for t in held if t.is_closing()])
            self._pruned_at[credential_id] = max(len(held), 8)

    async def run(self) -> None:
        """Check every ``interval`` seconds until cancelled."""
        while True:
            await asyncio.sleep(self._interval)
            await self._check_logged()

    def check_soon(self) -> None:
        """Check now, in the background (told of a revocation elsewhere, e.g. by the fleet)."""
        task = asyncio.get_running_loop().create_task(self._check_logged())
        self._soon.add(task)  # held until done: the loop keeps only weak references
        task.add_done_callback(self._soon.discard)

    async def _check_logged(self) -> None:
        try:
            await self.check()
        except Exception as exc:  # a busy database must not stop the watch
            self._seen = None  # look again next time
            log.warning("cannot check for revoked credentials: %s", exc)

    def forget(self) -> None:
        """Make the next :meth:`check` ask the store whatever the generation says (a
        revocation made through another gateway's store connection, e.g. PostgreSQL)."""
        self._seen = None

    async def check(self) -> list[ConnectedAgent]:
        """Expel the connected agents whose credential is revoked now; returns them."""
        # The generation is read before the credentials: a revocation committed after the
        # query changes it, so the next check sees that one.
        seen = (self._store.generation(), self._registry.version)
        if seen == self._seen:
            return []
        self._seen = seen
        agents = [entry for entry in self._registry.connected() if entry.credential_id]
        if not agents and not self._held:
            return []
        revoked = await self._store.revoked_credentials(
            {entry.credential_id for entry in agents if entry.credential_id} | set(self._held))
        for credential_id in revoked & set(self._held):
            cut = [t for t in self._held.pop(credential_id) if not t.is_closing()]
            self._pruned_at.pop(credential_id, None)
            if cut:
                log.warning("credential %s revoked: cutting %d open connection(s) it authorised",
                            credential_id, len(cut))
            for transport in cut:
                abort_with_reset(transport)
        expelled = [entry for entry in agents if entry.credential_id in revoked]
        for entry in expelled:
            log.warning("agent %s (%s) of team %s: credential revoked; closing its session and "
                        "%d open stream(s)", entry.name, entry.agent_id, entry.team_id,
                        len(entry.session.streams))
            self._registry.expel(entry, ErrorCode.NOT_ALLOWED, REVOKED_MESSAGE)
        return expelled
