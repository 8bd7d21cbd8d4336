"""Instructions per message through a TCP tunnel, counted by callgrind: the steady number.

    .venv/bin/python bench/callgrind_tcp.py [--side gateway|agent|both|connect|all]
                                            [--mode rtt|connect|http|service|invoke]
                                            [--via hub|connect] [--count 1000] [--baseline DIR]
                                            [--keep DIR]

Wall-clock latency on a shared 2-core machine moves by 30% between runs; the number of
user-space instructions a process executes per 64-byte round trip does not. This starts
``relay gateway`` and ``relay agent`` (one of them under ``valgrind --tool=callgrind``
with instrumentation off), a TCP tunnel to an echo target, warms up, switches counting on
for ``--count`` round trips (``--mode rtt``: one persistent connection; ``--mode
connect``: a fresh connection per request, connect to first byte; ``--mode http``: an
HTTP tunnel instead, keep-alive GETs answered with 1 KiB, the shape of
``bench/e2e_http.py``'s load one request at a time; ``--mode service``: the same GETs
through the service proxy, ``/api/v1/r/containers/web/1k.bin`` with an ``sk-`` key;
``--mode invoke``: ``POST /api/v1/r/invoke/web`` asking for ``GET /1k.bin``), and prints the
instructions per round trip with the top functions. ``--via connect`` drives the TCP
tunnel through ``relay connect TUNNEL_URL --mode mux`` (one multiplexed session; the
gateway joins each of its streams to a stream to the agent) instead of the hub port;
``--side connect`` counts that process, ``all`` each of the three. ``--baseline DIR`` measures the relay
package in DIR too (e.g. ``git archive COMMIT relay | tar -x -C DIR`` with the compiled
extensions built or copied in), in the same run, and prints the ratio.

Kernel time (the system calls, wake-ups) is not counted: callgrind sees user space only.
"""
from __future__ import annotations

import argparse
import contextlib
import glob
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

import _topology as topo  # noqa: E402

HOST = "127.0.0.1"
PY = str(ROOT / ".venv" / "bin" / "python")
MESSAGE = b"x" * 64


def _online_agent(port: int, sk: str) -> Optional[str]:
    status, body = topo._api(port, "GET", "/api/v1/agents", sk)
    online = [a for a in body["agents"] if a["online"]] if status == 200 else []
    return online[0]["agent_id"] if online else None


def _connect(hub: int) -> socket.socket:
    conn = socket.create_connection((HOST, hub))
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return conn


def _round_trips(hub: int, count: int, fresh: bool) -> None:
    """``count`` 64-byte messages echoed by the target (its first byte "E" picks echo)."""
    conn = None if fresh else _connect(hub)
    first = True
    for _ in range(count):
        if fresh:
            conn, first = _connect(hub), True
        conn.sendall(b"E" + MESSAGE if first else MESSAGE)
        first = False
        got = 0
        while got < len(MESSAGE):
            chunk = conn.recv(256)
            if not chunk:
                raise RuntimeError("the tunnel closed the connection")
            got += len(chunk)
        if fresh:
            conn.close()
    if not fresh:
        conn.close()


def _http_requests(port: int, request: bytes, count: int) -> None:
    """``count`` keep-alive ``request``s on one connection, each answer read to its last byte."""
    conn = _connect(port)
    buffered = b""
    for _ in range(count):
        conn.sendall(request)
        while b"\r\n\r\n" not in buffered:
            buffered += _recv(conn)
        head, _, buffered = buffered.partition(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1.1 200"):
            raise RuntimeError(f"the tunnel answered {head[:80]!r}")
        length = int(re.search(rb"(?im)^content-length:\s*(\d+)", head).group(1))
        while len(buffered) < length:
            buffered += _recv(conn)
        buffered = buffered[length:]
    conn.close()


def _recv(conn: socket.socket) -> bytes:
    chunk = conn.recv(65536)
    if not chunk:
        raise RuntimeError("the tunnel closed the connection")
    return chunk


def _request(mode: str, port: int, path: str, sk: str) -> bytes:
    """The request of an HTTP ``mode``, sent again and again on one connection."""
    host = f"Host: {HOST}:{port}\r\n"
    if mode == "http":
        return f"GET {path}1k.bin HTTP/1.1\r\n{host}\r\n".encode()
    auth = f"Authorization: Bearer {sk}\r\n"
    if mode == "service":
        return f"GET /api/v1/r/containers/web/1k.bin HTTP/1.1\r\n{host}{auth}\r\n".encode()
    body = b'{"method":"GET","path":"/1k.bin"}'
    return (f"POST /api/v1/r/invoke/web HTTP/1.1\r\n{host}{auth}Content-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode() + body


def _service_running(port: int, sk: str) -> bool:
    status, body = topo._api(port, "GET", "/api/v1/r/containers/web", sk)
    return status == 200 and body.get("service_status") == "running"


def measure(source: Optional[Path], side: str, count: int, mode: str, top: int, via: str = "hub",
            inclusive: bool = False, keep: Optional[Path] = None) -> int:
    """Instructions per round trip of ``side`` running the relay package in ``source``
    (None: this checkout)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if source is not None:
        env["PYTHONPATH"] = str(source)
    with tempfile.TemporaryDirectory(prefix="relay-callgrind-") as tmp, contextlib.ExitStack() as stack:
        workdir = Path(tmp)
        procs = topo.Procs(workdir)
        stack.callback(procs.stop_all)
        echo_port = topo.start_target(procs)
        out = workdir / "callgrind.out"
        valgrind = ["valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={out}"]
        port = topo._free_port()
        cwd = source  # `python -m relay` puts the working directory first on sys.path
        gateway = procs.spawn("gateway", [*(valgrind if side == "gateway" else []), PY, "-m", "relay", "gateway",
                                          "--listen", f"{HOST}:{port}", "--data", str(workdir / "data"),
                                          "--log-level", "warning"], env=env, cwd=cwd)
        topo.wait_for(lambda: "listening on" in procs.log("gateway"), 120, "relay gateway", gateway, procs)
        keys = dict(re.findall(r"^  (sk|dk|ak)  (\S+)$", procs.log("gateway"), re.M))
        service = ["--service", f"web={HOST}:{echo_port},health=/1k.bin"] if mode in ("service", "invoke") else []
        agent = procs.spawn("agent", [*(valgrind if side == "agent" else []), PY, "-m", "relay", "agent",
                                      "--gateway", f"http://{HOST}:{port}", "--name", "callgrind",
                                      "--log-level", "warning", *service],
                            env={**env, "RELAY_AGENT_KEY": keys["ak"]}, cwd=cwd)
        agent_id = topo.wait_for(lambda: _online_agent(port, keys["sk"]), 120, "relay agent", agent, procs)
        protocol = "tcp" if mode in ("rtt", "connect") else "http"
        status, body = topo._api(port, "POST", f"/api/v1/agents/{agent_id}/tunnel", keys["sk"],
                                 {"target_port": echo_port, "tunnel_protocol": protocol})
        if status != 200:
            raise RuntimeError(f"tunnel: {status} {body}")
        counted = {"gateway": gateway, "agent": agent}
        if protocol == "http":
            if mode != "http":
                topo.wait_for(lambda: _service_running(port, keys["sk"]), 120, "service web running")
            request = _request(mode, port, urllib.parse.urlsplit(body["tunnel_url"]).path, keys["sk"])
            run = lambda n: _http_requests(port, request, n)  # noqa: E731
        else:
            hub = int(body["hub_port"])
            if via == "connect":
                client = procs.spawn("connect", [*(valgrind if side == "connect" else []), PY, "-m", "relay",
                                                 "connect", body["tunnel_url"], "--listen", f"{HOST}:0",
                                                 "--mode", "mux", "--log-level", "warning"], env=env, cwd=cwd)
                found = topo.wait_for(lambda: re.search(r"listening on [\d.]+:(\d+)", procs.log("connect")), 120,
                                      "relay connect", client, procs)
                hub = int(found.group(1))
                counted["connect"] = client
            run = lambda n: _round_trips(hub, n, mode == "connect")  # noqa: E731
        run(300)  # warm-up: imports, caches, the window's first growth
        pid = str(counted[side].pid)
        subprocess.run(["callgrind_control", "-i", "on", pid], check=True, capture_output=True)
        run(count)
        subprocess.run(["callgrind_control", "-i", "off", pid], check=True, capture_output=True)
        subprocess.run(["callgrind_control", "-d", pid], check=True, capture_output=True)
        time.sleep(1.0)
        dumps = sorted(glob.glob(f"{out}*"), key=os.path.getsize)
        if keep is not None:  # for callgrind_annotate --inclusive=yes, kcachegrind
            keep.mkdir(parents=True, exist_ok=True)
            kept = keep / f"callgrind.{mode}.{side}.{'here' if source is None else 'baseline'}.out"
            kept.write_bytes(Path(dumps[-1]).read_bytes())
            print(f"  kept {kept}")
        report = subprocess.run(["callgrind_annotate", f"--inclusive={'yes' if inclusive else 'no'}", dumps[-1]],
                                capture_output=True, text=True, check=True).stdout
        total = int(re.search(r"([\d,]+) \(100\.0%\)\s+PROGRAM TOTALS", report).group(1).replace(",", ""))
        if top:
            print(f"  {side}, {'this checkout' if source is None else source}: costliest functions")
            rows = re.findall(r"^\s*([\d,]+) \(\s*([\d.]+)%\)\s+(\S+)", report, re.M)[1:top + 1]
            for n, share, where in rows:
                name = where.rsplit(":", 1)[-1]
                print(f"    {int(n.replace(',', '')) / count:9,.0f}  {share:>5}%  {name}")
        return total // count


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--side", choices=("gateway", "agent", "both", "connect", "all"), default="both",
                        help="the process to count (connect, all: with --via connect)")
    parser.add_argument("--mode", choices=("rtt", "connect", "http", "service", "invoke"), default="rtt")
    parser.add_argument("--via", choices=("hub", "connect"), default="hub",
                        help="the tunnel's hub port, or relay connect on its URL (tcp modes)")
    parser.add_argument("--count", type=int, default=1000)
    parser.add_argument("--baseline", metavar="DIR", help="a directory holding another relay package")
    parser.add_argument("--top", type=int, default=0, help="also print the N costliest functions")
    parser.add_argument("--inclusive", action="store_true", help="--top counts what functions call too")
    parser.add_argument("--keep", metavar="DIR", help="copy the callgrind output files into DIR")
    args = parser.parse_args()
    if not (subprocess.run(["which", "valgrind"], capture_output=True).returncode == 0):
        print("valgrind is not installed (apt-get install valgrind)", file=sys.stderr)
        return 2
    topo.raise_nofile()
    if args.via == "connect" and args.mode not in ("rtt", "connect"):
        parser.error("--via connect takes the tcp modes (rtt, connect)")
    if args.side in ("connect", "all") and args.via != "connect":
        parser.error(f"--side {args.side} needs --via connect")
    sides = {"both": ("gateway", "agent"), "all": ("gateway", "agent", "connect")}.get(args.side, (args.side,))
    unit = {"rtt": "round trip", "connect": "connection (connect, 64 B each way, close)",
            "http": "HTTP request (keep-alive GET, 1 KiB answer)",
            "service": "service proxy request (keep-alive GET, 1 KiB answer)",
            "invoke": "invoke call (keep-alive POST, 1 KiB answer in JSON)"}[args.mode]
    keep = Path(args.keep) if args.keep else None
    print(f"user-space instructions per {unit}, {args.count} counted, callgrind, via {args.via}")
    for side in sides:
        here = measure(None, side, args.count, args.mode, args.top, args.via, args.inclusive, keep)
        line = f"  {side:8s} this checkout {here:10,}"
        if args.baseline:
            base = measure(Path(args.baseline).resolve(), side, args.count, args.mode, args.top, args.via,
                           args.inclusive, keep)
            line += f"   baseline {base:10,}   ratio {here / base:.2f}"
        print(line, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
