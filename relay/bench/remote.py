"""``relay bench`` against a gateway you run: given its URL, a team key and an agent
that runs with ``--bench``, open a tcp and an http tunnel to the agent's bench target
(closed again at the end); or given tunnel URLs already open, measure through them.

Byte rows go to the tcp tunnel's hub port when this machine reaches it (``--via
auto``/``hub``), else through ``relay connect`` (``--via ws``: TCP over a WebSocket to
the gateway's own port, the way that works through reverse proxies). Before anything is
measured each path is probed: an agent without ``--bench`` is refused with one line.
"""
from __future__ import annotations

import asyncio
import re
import urllib.parse
from typing import Any, Optional

from relay.bench import BenchError, BenchRefused
from relay.bench.local import Processes
from relay.bench.paths import BenchPath, probe, probe_http

__all__ = ["RemoteTunnels", "start_connect", "tunnel_paths"]

#: Seconds to see whether a hub port is reachable from here.
HUB_TIMEOUT = 3.0


def start_connect(procs: Processes, tunnel_url: str, ca_cert: Any = None) -> tuple[str, int]:
    """Run ``relay connect TUNNEL_URL`` on a free local port; its address."""
    extra = ["--ca-cert", str(ca_cert)] if ca_cert is not None else []
    procs.relay("connect", "connect", tunnel_url, "--listen", "127.0.0.1:0", "--log-level", "warning", *extra)
    found = procs.wait_for("connect", r"listening on ([\d.]+):(\d+)", "listen")
    return found.group(1), int(found.group(2))


def _refusal(agent: str, port: int) -> str:
    return (f"agent {agent} serves no bench target on 127.0.0.1:{port}: run it with `relay agent --bench` "
            f"(and --bench-port {port} if not the default)")


def _safe(url: str) -> str:
    """A tunnel URL without its token (a secret) for messages."""
    return re.sub(r"/(tunnel|s)/[^/]+", r"/\1/…", url)


class RemoteTunnels:
    """Tunnels opened for the run through the control API, closed by :meth:`close`."""

    def __init__(self, gateway_url: str, key: str, agent_ref: str, bench_port: int, ca_cert: Any = None) -> None:
        from relay.cli.tunnel import ApiClient

        self.api = ApiClient(gateway_url, key, ca_cert)
        self.agent_ref = agent_ref
        self.bench_port = bench_port
        self.agent_id: Optional[str] = None
        self.opened: list[str] = []

    def open(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """The tcp and the http tunnel's answers; BenchRefused if the agent refuses."""
        from relay.cli.tunnel import ApiError

        agent = self.api.resolve(self.agent_ref)
        if not agent.get("online", True):
            raise BenchError(f"agent {self.agent_ref} is offline")
        self.agent_id = str(agent["agent_id"])
        answers = []
        for protocol in ("tcp", "http"):
            try:
                answer = self.api.call("POST", f"/api/v1/agents/{urllib.parse.quote(self.agent_id)}/tunnel",
                                       {"target_port": self.bench_port, "tunnel_protocol": protocol})
            except ApiError as exc:
                if "target_not_allowed" in str(exc):
                    raise BenchRefused(f"{_refusal(self.agent_ref, self.bench_port)}: {exc}") from None
                raise BenchError(f"cannot open a {protocol} tunnel to the bench target: {exc}") from None
            self.opened.append(answer["session_id"])
            answers.append(answer)
        return answers[0], answers[1]

    def close(self) -> None:
        """Close the tunnels this run opened (best effort: the run is over anyway)."""
        if self.agent_id is None:
            return
        for session_id in self.opened:
            try:
                self.api.call("DELETE", f"/api/v1/agents/{urllib.parse.quote(self.agent_id)}/tunnel"
                                        f"?session_id={urllib.parse.quote(session_id)}")
            except Exception:  # noqa: BLE001 - the gateway may be gone: nothing more to do
                pass
        self.opened.clear()


def _hub_reachable(host: str, port: int, agent: str, bench_port: int) -> bool:
    path = BenchPath("hub", "", (host, port))

    async def attempt() -> bool:
        try:
            async with asyncio.timeout(HUB_TIMEOUT):
                await probe(path, _refusal(agent, bench_port))
            return True
        except (TimeoutError, BenchRefused):
            return False

    return asyncio.run(attempt())


def tunnel_paths(procs: Processes, *, tcp: Optional[dict[str, Any]], http_url: Optional[str], via: str,
                 gateway_host: Optional[str], agent: str, bench_port: int, ca_cert: Any = None) -> BenchPath:
    """The ``relay`` path through these tunnels, probed; BenchRefused if it does not
    end at a bench target."""
    address: Optional[tuple[str, int]] = None
    processes: dict[str, int] = {}
    how = []
    refusal = _refusal(agent, bench_port)
    if tcp is not None:
        hub_port = tcp.get("hub_port")
        if via in ("auto", "hub") and hub_port and gateway_host:
            if _hub_reachable(gateway_host, int(hub_port), agent, bench_port):
                address = (gateway_host, int(hub_port))
                how.append(f"bytes through the tcp tunnel's hub port {gateway_host}:{hub_port}")
            elif via == "hub":
                raise BenchError(f"the hub port {gateway_host}:{hub_port} is not reachable from here, or its agent "
                                 f"serves no bench target (try --via ws; {refusal})")
        if address is None:
            address = start_connect(procs, tcp["tunnel_url"], ca_cert)
            processes["connect"] = procs.procs["connect"].pid
            how.append(f"bytes through relay connect (a WebSocket to {_safe(tcp['tunnel_url'])})")
    path = BenchPath("relay", "; ".join(how), address, http_url, processes,
                     ca_cert=str(ca_cert) if ca_cert is not None else None)
    if address is not None:
        asyncio.run(probe(path, refusal))
    if http_url is not None:
        probe_http(http_url, f"the http tunnel {_safe(http_url)} does not lead to a bench target: {refusal}",
                   ca_cert=ca_cert)
        path.how = "; ".join([*how, f"HTTP through {_safe(http_url)}"])
    return path


def classify_tunnel_url(url: str) -> str:
    """``tcp`` for a ws(s)://…/tunnel/TOKEN/tcp URL, ``http`` for an http(s):// one;
    ValueError otherwise."""
    split = urllib.parse.urlsplit(url)
    if split.scheme in ("ws", "wss") and "/tunnel/" in split.path and split.path.rstrip("/").endswith("/tcp"):
        return "tcp"
    if split.scheme in ("http", "https") and split.hostname:
        return "http"
    raise ValueError(f"expected a ws(s)://HOST/tunnel/TOKEN/tcp or http(s)://HOST/tunnel/TOKEN/ URL, got {_safe(url)!r}")
