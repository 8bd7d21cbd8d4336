"""Serving share links: ``/s/{share_token}/...`` through the HTTP reverse proxy.

A share (see :mod:`relay.gateway.api.shares`) is a link to an http or https tunnel of the
Tunnels API (https: the agent speaks TLS to the target, see below).
What arrives at its URL is checked, then proxied exactly like a seed 000 HTTP tunnel
(:mod:`relay.gateway.http.proxy`: streaming both ways, keep-alive, SSE, WebSocket
upgrades, ``X-Forwarded-*``): ``/s/{share_token}`` is stripped, the rest of the path and
the query go to the tunnel's target through its agent, ``X-Forwarded-Prefix`` says what
was stripped.

Every request is checked, including each one on a kept-alive connection: unknown token
404, expired 410, method not allowed 405 (``Allow``), over the rate limit 429
(``Retry-After``), tunnel paused 503, agent offline 503, a target the agent cannot reach
502 (from the proxy). How, given that the proxy owns the connection after the first
request: the first request is checked by the route handler, which raises the error
(with its headers) as any handler does; a later request that fails the checks is handed
back by the proxy to the gateway's HTTP server, whose route runs the same checks again
and answers the error. A passing request is counted against the rate limit once.

The share and its tunnel are read from the store once and kept in memory until anything
is committed to the store (its generation changes), so a request on a known link makes
no database round trip, and a deleted share, a paused or deleted tunnel, is seen on the
very next request (PostgreSQL: once the commit's notification arrived).

An https tunnel's target speaks HTTP inside TLS. The gateway still proxies plain HTTP
(it parses every request to check it): the stream it opens carries ``"tls": true`` in
its metadata, and the agent wraps its connection to the target in TLS (docs/PROTOCOL.md,
"Stream metadata"), with the target's host as SNI. The agent does not verify the
target's certificate: the target is one its owner chose and the agent allows, and
services on a machine's own port (where https tunnels usually point) mostly carry
self-signed certificates; the link from the client to the gateway is what the client
verifies.

``/s/{share_token}`` without the slash is redirected (308) to ``/s/{share_token}/`` after
the token and expiry checks, so pages with relative links work.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional

from relay.aio import SessionClosedError
from relay.aio.stream import MuxStream
from relay.gateway.api.shares import check_share
from relay.gateway.http.proxy import (
    MaybeUpstream,
    ProxyError,
    ProxyStats,
    RequestHead,
    Upstream,
    origin_form,
    serve_connection,
)
from relay.gateway.http.server import HttpError, HttpProtocol, Request, Response, Router, json_response, store_failure
from relay.gateway.store import Share, StoreError, Tunnel, hash_token

if TYPE_CHECKING:
    from relay.gateway.api.tunnels import TunnelsApi

__all__ = ["SHARE_PREFIX", "ShareProxy"]

SHARE_PREFIX = "/s/"
#: Shares (with their tunnels) kept in memory at most.
CACHE_MAX = 4096


class ShareProxy:
    """The share URL routes of one gateway; live proxy counters per share."""

    def __init__(self, api: "TunnelsApi") -> None:
        self._api = api
        # Share id -> counters and open client connections (to cut them when the share
        # or its tunnel goes away).
        self._stats: dict[str, ProxyStats] = {}
        # Token hash -> (share, tunnel), valid while the store's generation stays the same.
        self._rows: dict[str, tuple[Share, Tunnel]] = {}
        self._generation: Any = None

    def register(self, router: Router) -> None:
        router.add("*", SHARE_PREFIX + "{share_token}", self._add_slash)
        router.add("*", SHARE_PREFIX + "{share_token}/{rest:path}", self._proxy, raw=True)

    def stats(self, share_id: str) -> Optional[ProxyStats]:
        return self._stats.get(share_id)

    def forget(self, share_ids: list[str]) -> None:
        """The shares were deleted (or their tunnel paused): close their connections."""
        for share_id in share_ids:
            stats = self._stats.pop(share_id, None)
            if stats is not None:
                for client in list(stats.clients):
                    client.close()

    # -- checks

    def _cached(self, token: str) -> Optional[tuple[Share, Tunnel]]:
        """The share of ``token`` and its tunnel, from memory while the store's generation
        is unchanged (any commit empties it: a deleted share or a paused tunnel is seen
        on the next request); None if not there. Keyed by the token's hash."""
        generation = self._api.gw.store.generation()
        if generation != self._generation:
            self._rows.clear()
            self._generation = generation
        return self._rows.get(hash_token(token))

    async def _lookup(self, token: str) -> tuple[Share, Tunnel]:
        """The share of ``token`` and its tunnel (cached, else read); 404 if unknown."""
        rows = self._cached(token)
        if rows is not None:
            return rows
        before = self._generation
        store = self._api.gw.store
        share = await store.get_share_by_token(token)
        tunnel = await store.get_tunnel(share.team_id, share.tunnel_id) if share is not None else None
        if share is None or tunnel is None:
            raise HttpError(404, "share_not_found", "no such share link")
        if self._cached(token) is None and self._generation == before:  # nothing committed meanwhile
            if len(self._rows) >= CACHE_MAX:
                self._rows.clear()
            self._rows[hash_token(token)] = (share, tunnel)
        return share, tunnel

    async def _admit(self, token: str, method: str, count: bool) -> Upstream:
        """Run every check for one request and return where it goes; raises HttpError.
        ``count``: count it against the rate limit (once per request)."""
        return self._admit_rows(await self._lookup(token), token, method, count)

    def _admit_rows(self, rows: tuple[Share, Tunnel], token: str, method: str, count: bool) -> Upstream:
        api = self._api
        share, tunnel = rows
        now = api.clock()
        check_share(share, method, now)  # expiry and method; counts nothing
        if tunnel.status == "paused":
            raise HttpError(503, "tunnel_paused", "the shared tunnel is paused")
        if tunnel.protocol not in ("http", "https"):  # shares are only created on these
            raise HttpError(502, "not_an_http_tunnel", "the shared tunnel does not carry HTTP")
        agent = api.gw.registry.get(tunnel.team_id, tunnel.agent_id)
        if agent is None:
            raise HttpError(503, "agent_offline", "the tunnel's agent is not connected")
        if count:  # last, so a request refused for another reason uses no budget
            check_share(share, method, now, api.limiter)
        session = agent.session
        host = f"[{tunnel.target_host}]" if ":" in tunnel.target_host else tunnel.target_host
        target = f"{host}:{tunnel.target_port}"
        meta: dict[str, Any] = {"protocol": "http", "target": target}
        if tunnel.protocol == "https":  # the agent speaks TLS to the target (module docstring)
            meta["tls"] = True

        def open_stream() -> MuxStream:
            try:
                return session.open_stream_nowait(meta)
            except (SessionClosedError, ConnectionError) as exc:
                raise ProxyError(503, "agent_offline", f"the tunnel's agent is not reachable: {exc}") from None

        stats = self._stats.get(share.id)
        if stats is None:
            stats = self._stats[share.id] = ProxyStats()
        prefix = (SHARE_PREFIX + token).encode()
        return Upstream(open_stream=open_stream, key=(id(session), target), target=b"/",
                        headers=[(b"x-forwarded-prefix", prefix)], host=target.encode(),
                        stats=stats, prefix=prefix)

    # -- routes

    async def _add_slash(self, request: Request) -> Response:
        token = request.params["share_token"]
        share, _ = await self._lookup(token)
        check_share(share, "GET", self._api.clock())  # expired: 410 rather than a redirect
        location = f"{SHARE_PREFIX}{token}/"
        query = request.target.partition("?")[2]
        if query:
            location += "?" + query
        return json_response({"location": location}, 308, {"Location": location})

    async def _proxy(self, request: Request) -> None:
        """Raw route: check the first request (errors answered normally), then hand the
        connection to the proxy, which asks :meth:`_resolve` about every request."""
        try:
            prime = getattr(self._api.limiter, "prime", None)
            if prime is not None:  # a fleet: learn the others' count before deciding
                share, _ = await self._lookup(request.params["share_token"])
                if share.rate_limit is not None:
                    await prime(share.id, self._api.clock())
            await self._admit(request.params["share_token"], request.method, count=True)
        except HttpError as exc:
            # Every refused share request ends here (a kept-alive one is handed back by
            # _resolve and routed here), so each refusal is counted once.
            self._api.gw.traffic.count("share_refusals", exc.code)
            raise
        transport, data = request.take_over_raw()
        first = [True]

        def resolve(head: RequestHead) -> MaybeUpstream:
            counted, first[0] = first[0], False  # the first request was counted above
            return self._resolve(head, count=not counted)

        serve_connection(transport, data, resolve, fallback=self._http_server,
                         connections=self._api.gw._connections)

    def _http_server(self, declined: bool = False) -> HttpProtocol:
        return HttpProtocol(self._api.gw.router, self._api.gw._connections, declined=declined)

    def _resolve(self, request: RequestHead, count: bool) -> MaybeUpstream:
        """Where a request on a share proxy connection goes. None hands the connection
        back to the HTTP server: for other paths, and for a request that fails a check
        (the route answers it there, with the error's headers)."""
        target = origin_form(request.target)  # absolute-form: keep the path
        prefix = SHARE_PREFIX.encode()
        if not target.startswith(prefix):
            return None
        end = target.find(b"/", len(prefix))
        if end < 0:
            return None  # /s/{token} or /s/{token}?...: the redirect
        token = target[len(prefix):end].decode("ascii", "replace")
        method = request.method.decode("ascii", "replace")
        rows = self._cached(token)
        if rows is None:  # not in memory: ask the store first (a slow path)
            return self._resolve_slowly(token, method, count, target[end:])
        try:
            upstream = self._admit_rows(rows, token, method, count)
        except HttpError:
            return None
        upstream.target = target[end:]
        return upstream

    async def _resolve_slowly(self, token: str, method: str, count: bool, rest: bytes) -> Optional[Upstream]:
        try:
            upstream = await self._admit(token, method, count)
        except HttpError:
            return None
        except StoreError as exc:
            raise ProxyError(503, "store_unavailable", store_failure("share URL", exc)) from None
        upstream.target = rest
        return upstream
