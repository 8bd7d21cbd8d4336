"""End-to-end HTTP benchmark: wrk against nginx /1k.bin, direct and through four proxies.

    .venv/bin/python bench/e2e_http.py [--reps 3] [--duration 5] [--quick] [--profile]
    .venv/bin/python bench/e2e_http.py --paths tunnel,nginx-proxy --reps 5

Everything on 127.0.0.1, started and cleaned up by the script (process groups, killed on
exit; children also die with it). Paths (``--paths``, default all):

* ``direct``: wrk -> nginx (tests/servers.start_nginx, 2 workers) serving ``/1k.bin``;
* ``nginx-proxy``: wrk -> a second nginx (``--proxy-workers``, default 2) with
  ``proxy_pass`` to the first over an upstream ``keepalive`` pool (HTTP/1.1,
  ``Connection ""``), configured in the temp dir;
* ``tunnel``: wrk -> ``relay gateway`` -> WebSocket -> ``relay agent`` -> nginx, through
  an HTTP tunnel (``/tunnel/TOKEN/1k.bin``);
* ``service``: the transparent service proxy, ``/api/v1/r/containers/web/1k.bin`` with
  ``Authorization: Bearer sk-...`` (the agent runs ``--service
  web=127.0.0.1:NGINX,health=/1k.bin``);
* ``invoke``: ``POST /api/v1/r/invoke/web`` with ``{"method":"GET","path":"/1k.bin"}``
  (a wrk Lua script), the 1 KiB coming back base64 in JSON.

wrk is ``-t2 -c64 -dNs --latency`` (``--duration``, default 5 s); each repetition runs
every path once, interleaved, so load from elsewhere on the machine spreads over all of
them; the table shows medians of ``--reps`` (default 3) runs, for the relay paths the
CPU time (from /proc) per request of gateway + agent and of the gateway alone (each
sample's log line also says how busy the gateway was, in % of one core), and the
tunnel's ratio to the nginx reverse proxy (goal >= 0.5). Every sample goes to
bench/results/e2e_http-STAMP.json. ``--profile`` records py-spy (250 Hz, nonblocking) on
the gateway and the agent during the first run of each relay path and prints the top
frames by self time (raw stacks in bench/results/pyspy-http-*.txt). Bounded by
``--timeout`` (default 230 s). ``--baseline DIR`` adds ``tunnel-base``: the same HTTP
tunnel through a second gateway + agent running the relay package in DIR (e.g. an older
commit, with its own extensions built: see bench/README.md, ``--baseline``).
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any, Optional

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

import _topology as topo  # noqa: E402
import psutil  # noqa: E402
from e2e_tcp import summarise_profile  # noqa: E402

from tests.support.servers import start_nginx  # noqa: E402

HOST = "127.0.0.1"
PATHS = ("direct", "nginx-proxy", "tunnel", "service", "invoke", "tunnel-base")
RELAY_PATHS = ("tunnel", "service", "invoke", "tunnel-base")
PYSPY = ROOT / ".venv" / "bin" / "py-spy"
START = time.monotonic()

INVOKE_LUA = """\
wrk.method = "POST"
wrk.body = '{"method":"GET","path":"/1k.bin"}'
wrk.headers["Content-Type"] = "application/json"
"""


def log(text: str) -> None:
    print(f"[{time.monotonic() - START:6.1f}s] {text}", flush=True)


def run_wrk(url: str, seconds: float, extra: list[str]) -> dict[str, Any]:
    """wrk -t2 -c64 against ``url``: requests/s, p50/p99 ms, errors."""
    done = subprocess.run(["wrk", "-t2", "-c64", f"-d{seconds:g}s", "--latency", *extra, url],
                          capture_output=True, text=True, timeout=seconds + 30)
    out = done.stdout
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)

    def pct(q: str) -> Optional[float]:
        m = re.search(rf"^\s+{q}%\s+([\d.]+)(us|ms|s)\s*$", out, re.M)
        return None if not m else float(m.group(1)) * {"us": 1e-3, "ms": 1.0, "s": 1e3}[m.group(2)]

    if done.returncode != 0 or not rps:
        raise RuntimeError(f"wrk failed ({done.returncode}): {out} {done.stderr}")
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    sockerr = re.search(r"Socket errors: (.*)", out)
    return {"rps": float(rps.group(1)), "p50": pct("50"), "p99": pct("99"),
            "non2xx": int(non2xx.group(1)) if non2xx else 0,
            "socket_errors": sockerr.group(1) if sockerr else None}


def start_nginx_proxy(procs: topo.Procs, workdir: Path, upstream_port: int, workers: int) -> int:
    """A second nginx: reverse proxy to ``upstream_port`` with an upstream keepalive pool."""
    workdir.mkdir()
    (workdir / "tmp").mkdir()
    port = topo._free_port()
    user_line = "user root root;" if os.geteuid() == 0 else ""
    conf = workdir / "nginx.conf"
    conf.write_text(f"""\
{user_line}
daemon off;
master_process on;
worker_processes {workers};
worker_rlimit_nofile 65536;
pid {workdir / "nginx.pid"};
error_log {workdir / "error.log"} warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    keepalive_timeout 65;
    keepalive_requests 100000;
    client_body_temp_path {workdir}/tmp/client_body;
    proxy_temp_path {workdir}/tmp/proxy;
    fastcgi_temp_path {workdir}/tmp/fastcgi;
    uwsgi_temp_path {workdir}/tmp/uwsgi;
    scgi_temp_path {workdir}/tmp/scgi;
    upstream backend {{
        server {HOST}:{upstream_port};
        keepalive 128;
        keepalive_requests 100000;
    }}
    server {{
        listen {HOST}:{port};
        location / {{
            proxy_pass http://backend;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
            proxy_set_header X-Forwarded-Proto $scheme;
            proxy_set_header X-Forwarded-Host $host;
        }}
    }}
}}
""")
    proc = procs.spawn("nginx-proxy", ["nginx", "-p", str(workdir), "-c", str(conf),
                                       "-e", str(workdir / "error.log")])
    topo.wait_for(lambda: _get_ok(f"http://{HOST}:{port}/1k.bin"), 20, "nginx proxy", proc, procs)
    return port


def _get_ok(url: str, headers: Optional[dict[str, str]] = None, data: Optional[bytes] = None) -> bool:
    try:
        req = urllib.request.Request(url, headers=headers or {}, data=data)
        with urllib.request.urlopen(req, timeout=5) as resp:
            body = resp.read()
            return resp.status == 200 and len(body) >= 1024
    except OSError:
        return False


@contextlib.contextmanager
def pyspy(label: str, pids: dict[str, int], outdir: Path, stamp: str, reports: dict[str, Any]):
    running = []
    for name, pid in pids.items():
        raw = outdir / f"pyspy-http-{stamp}-{label}-{name}.txt"
        proc = subprocess.Popen([str(PYSPY), "record", "--pid", str(pid), "--rate", "250", "--format", "raw",
                                 "-o", str(raw), "--nonblocking"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        running.append((name, proc, raw))
    time.sleep(0.5)
    try:
        yield
    finally:
        for _name, proc, _raw in running:
            proc.send_signal(signal.SIGINT)
        for name, proc, raw in running:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
            reports[f"{label}/{name}"] = summarise_profile(raw)


def cpu_seconds(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            t = psutil.Process(pid).cpu_times()
            total += t.user + t.system
    return total


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--duration", type=float, default=5.0, help="wrk -d seconds per run")
    parser.add_argument("--quick", action="store_true", help="1 repetition of 2 s")
    parser.add_argument("--paths", default=",".join(PATHS))
    parser.add_argument("--proxy-workers", type=int, default=2, help="worker_processes of the nginx proxy")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--timeout", type=float, default=230.0)
    parser.add_argument("--baseline", metavar="DIR",
                        help="also run an HTTP tunnel through a second gateway + agent from the relay "
                             "package in DIR (path tunnel-base, interleaved)")
    args = parser.parse_args()
    if args.quick:
        args.reps, args.duration = 1, 2.0
    paths = [p for p in args.paths.split(",") if p and p != "tunnel-base"]
    if args.baseline:
        paths.insert(paths.index("tunnel") + 1 if "tunnel" in paths else len(paths), "tunnel-base")
    unknown = set(paths) - set(PATHS)
    if unknown:
        parser.error(f"unknown paths: {sorted(unknown)}")

    def on_signal(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGALRM, on_signal)
    signal.alarm(int(args.timeout))
    topo.raise_nofile()

    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    outdir = ROOT / "bench" / "results"
    outdir.mkdir(parents=True, exist_ok=True)
    samples: dict[str, list[dict[str, Any]]] = {p: [] for p in paths}
    reports: dict[str, Any] = {}
    status = 0
    with tempfile.TemporaryDirectory(prefix="relay-e2e-http-") as tmp, contextlib.ExitStack() as stack:
        workdir = Path(tmp)
        procs = topo.Procs(workdir)
        stack.callback(procs.stop_all)
        try:
            (workdir / "nginx").mkdir()
            nginx = stack.enter_context(start_nginx(workdir / "nginx"))
            urls: dict[str, tuple[str, list[str]]] = {"direct": (f"http://{HOST}:{nginx.port}/1k.bin", [])}
            if "nginx-proxy" in paths:
                pport = start_nginx_proxy(procs, workdir / "nginx-proxy", nginx.port, args.proxy_workers)
                urls["nginx-proxy"] = (f"http://{HOST}:{pport}/1k.bin", [])
            relay = None
            if set(paths) & set(RELAY_PATHS):
                relay = topo.Relay(procs, agent_args=("--service", f"web=127.0.0.1:{nginx.port},health=/1k.bin"))
                gw = f"http://{HOST}:{relay.port}"
                sk = relay.keys["sk"]
                auth = {"Authorization": f"Bearer {sk}"}
                st, body = topo._api(relay.port, "POST", f"/api/v1/agents/{relay.agent_id}/tunnel", sk,
                                     {"target_port": nginx.port, "tunnel_protocol": "http"})
                if st != 200:
                    raise RuntimeError(f"http tunnel: {st} {body}")
                tunnel_url = body["tunnel_url"]
                path = tunnel_url[tunnel_url.index("/tunnel/"):]
                urls["tunnel"] = (f"{gw}{path}1k.bin", [])
                urls["service"] = (f"{gw}/api/v1/r/containers/web/1k.bin", ["-H", f"Authorization: Bearer {sk}"])
                lua = workdir / "invoke.lua"
                lua.write_text(INVOKE_LUA)
                urls["invoke"] = (f"{gw}/api/v1/r/invoke/web",
                                  ["-s", str(lua), "-H", f"Authorization: Bearer {sk}"])
                topo.wait_for(lambda: _get_ok(urls["tunnel"][0]), 20, "http tunnel")
                topo.wait_for(lambda: _get_ok(urls["service"][0], auth), 30, "service web running")
                topo.wait_for(lambda: _get_ok(urls["invoke"][0], {**auth, "Content-Type": "application/json"},
                                              b'{"method":"GET","path":"/1k.bin"}'), 20, "invoke")
            base_pids: dict[str, int] = {}
            if args.baseline:
                base = topo.Relay(procs, name="-base", source=Path(args.baseline).resolve())
                st, body = topo._api(base.port, "POST", f"/api/v1/agents/{base.agent_id}/tunnel", base.keys["sk"],
                                     {"target_port": nginx.port, "tunnel_protocol": "http"})
                if st != 200:
                    raise RuntimeError(f"baseline http tunnel: {st} {body}")
                tunnel_url = body["tunnel_url"]
                urls["tunnel-base"] = (f"http://{HOST}:{base.port}{tunnel_url[tunnel_url.index('/tunnel/'):]}1k.bin", [])
                topo.wait_for(lambda: _get_ok(urls["tunnel-base"][0]), 20, "baseline http tunnel")
                base_pids = {"gateway": base.gateway.pid, "agent": base.agent.pid}
            log(f"urls: { {p: u for p, (u, _) in urls.items()} }")
            relay_pids = {"gateway": relay.gateway.pid, "agent": relay.agent.pid} if relay else {}
            for rep in range(args.reps):
                for p in paths:
                    url, extra = urls[p]
                    profiling = args.profile and rep == 0 and p in RELAY_PATHS
                    pids = base_pids if p == "tunnel-base" else relay_pids
                    cpu0 = cpu_seconds(list(pids.values()))
                    gw0 = cpu_seconds([pids["gateway"]]) if pids else 0.0
                    with pyspy(p, pids, outdir, stamp, reports) if profiling else contextlib.nullcontext():
                        r = run_wrk(url, args.duration, extra)
                    if p in RELAY_PATHS:
                        cpu = cpu_seconds(list(pids.values())) - cpu0
                        gw_cpu = cpu_seconds([pids["gateway"]]) - gw0
                        requests = max(1.0, r["rps"] * args.duration)
                        r["relay_cpu_ms_per_req"] = 1000 * cpu / requests
                        r["gateway_cpu_ms_per_req"] = 1000 * gw_cpu / requests
                        r["gateway_cpu_share"] = gw_cpu / args.duration  # 1.0 = one core busy
                    samples[p].append(r)
                    extra_txt = (f"  gw+agent CPU {r['relay_cpu_ms_per_req']:.3f} ms/req (gw {r['gateway_cpu_ms_per_req']:.3f}, "
                                 f"gw busy {r['gateway_cpu_share']:.0%} of a core)" if "relay_cpu_ms_per_req" in r else "")
                    errs = f"  non-2xx {r['non2xx']}" if r["non2xx"] else ""
                    errs += f"  socket errors: {r['socket_errors']}" if r["socket_errors"] else ""
                    log(f"rep {rep + 1}/{args.reps} {p:12s} {r['rps']:9.0f} req/s  p99 {r['p99']:.2f} ms{extra_txt}{errs}")
        except KeyboardInterrupt as exc:
            log(f"stopped early: {exc}")
            status = 1
        finally:
            signal.alarm(0)

    def med(p: str, key: str) -> Optional[float]:
        vals = [s[key] for s in samples.get(p, []) if s.get(key) is not None]
        return statistics.median(vals) if vals else None

    print(f"\nwrk -t2 -c64 -d{args.duration:g}s --latency, nginx /1k.bin; medians of {args.reps} "
          f"(nginx proxy: {args.proxy_workers} workers)")
    print(f"{'path':14s} {'req/s':>9s} {'p99 ms':>8s} {'CPU ms/req':>10s} {'gw ms/req':>9s} {'÷ nginx-proxy':>14s}")
    ref = med("nginx-proxy", "rps")
    for p in paths:
        rps, p99, cpu = med(p, "rps"), med(p, "p99"), med(p, "relay_cpu_ms_per_req")
        gw = med(p, "gateway_cpu_ms_per_req")
        if rps is None:
            continue
        ratio = f"{rps / ref:.2f}" if ref else "-"
        goal = "  (goal >= 0.5)" if p == "tunnel" else ""
        print(f"{p:14s} {rps:9.0f} {p99:8.2f} {cpu if cpu is not None else float('nan'):10.3f} "
              f"{gw if gw is not None else float('nan'):9.3f} {ratio:>14s}{goal}")
    for label, rep in reports.items():
        print(f"\npy-spy {label}: {rep.get('samples', 0)} samples, self time:")
        for frame, share in rep.get("self", [])[:12]:
            print(f"  {share:5.1f}%  {frame}")
    out = outdir / f"e2e_http-{stamp}.json"
    out.write_text(json.dumps({"args": vars(args), "samples": samples, "profiles": reports,
                               "medians": {p: {k: med(p, k) for k in ("rps", "p50", "p99", "relay_cpu_ms_per_req",
                                                                    "gateway_cpu_ms_per_req")}
                                           for p in paths}}, indent=1))
    print(f"\n{out}")
    return status


if __name__ == "__main__":
    sys.exit(main())
