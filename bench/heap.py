"""Page faults and CPU per GB of the relay processes, with relay.heap's malloc
thresholds and with glibc's dynamic defaults, in one run.

    .venv/bin/python bench/heap.py [--reps 3] [--gigabytes 1]

Two gateway + agent pairs on 127.0.0.1 (bench/_topology.py), each with a tcp tunnel to
one iperf3 server and a ``relay connect`` on it: ``kept`` runs as the command line
starts it (relay.heap.keep_freed_heap), ``glibc`` with ``GLIBC_TUNABLES=
glibc.malloc.perturb=0`` (a no-op tunable: its presence makes relay leave malloc to
glibc). iperf3 moves ``--gigabytes`` each way through the hub port and through
``relay connect``, pairs interleaved; printed per path and direction: MB/s, CPU seconds
of the relay processes per GB, and their minor page faults per GB (from /proc: the
count, unlike the other two, does not move with the machine's load). Medians.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

import _topology as topo  # noqa: E402

GLIBC = {"GLIBC_TUNABLES": "glibc.malloc.perturb=0"}


def faults_and_cpu(pids: list[int]) -> tuple[int, float]:
    faults, cpu = 0, 0.0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        faults += int(fields[7])
        cpu += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return faults, cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--gigabytes", type=float, default=1.0)
    args = parser.parse_args()
    procs = topo.Procs(Path(tempfile.mkdtemp(prefix="relay-heap-")))
    try:
        iperf = topo._free_port()
        procs.spawn("iperf", ["iperf3", "-s", "-p", str(iperf), "-B", topo.HOST])
        topo.wait_for(lambda: topo.tcp_accepts(iperf), 10, "iperf3 -s")
        paths: dict[str, tuple[int, list[int]]] = {}
        for name, env in (("kept", {}), ("glibc", GLIBC)):
            relay = topo.Relay(procs, name=f"-{name}", extra_env=env)
            status, body = topo._api(relay.port, "POST", f"/api/v1/agents/{relay.agent_id}/tunnel",
                                     relay.keys["sk"], {"target_port": iperf, "tunnel_protocol": "tcp"})
            if status != 200:
                raise RuntimeError(f"tunnel: {status} {body}")
            local = topo._free_port()
            connect = procs.spawn(f"connect-{name}", [*relay.cmd, "connect", body["tunnel_url"], "--listen",
                                                      f"{topo.HOST}:{local}", "--log-level", "warning"],
                                  env={**os.environ, **env})
            topo.wait_for(lambda port=local: topo.tcp_accepts(port), 20, "relay connect", connect, procs)
            pids = [relay.gateway.pid, relay.agent.pid]
            paths[f"hub {name}"] = (int(body["hub_port"]), pids)
            paths[f"connect {name}"] = (local, [*pids, connect.pid])
        samples: dict[str, list[float]] = {}
        for rep in range(args.reps):
            for path, (port, pids) in paths.items():
                for direction in ("fwd", "rev"):
                    faults0, cpu0 = faults_and_cpu(pids)
                    done = subprocess.run(["iperf3", "-c", topo.HOST, "-p", str(port), "-n", f"{args.gigabytes}G",
                                           "-J", *(["-R"] if direction == "rev" else [])],
                                          capture_output=True, text=True, timeout=300)
                    faults1, cpu1 = faults_and_cpu(pids)
                    result = json.loads(done.stdout or "{}")
                    if "sum_received" not in result.get("end", {}):
                        raise RuntimeError(f"iperf3 through {path}: {result.get('error') or done.stderr}")
                    received = result["end"]["sum_received"]
                    gb = received["bytes"] / 1e9
                    row = f"{path:<14}{direction}"
                    for metric, value in (("MB/s", received["bits_per_second"] / 8e6),
                                          ("cpu s/GB", (cpu1 - cpu0) / gb), ("faults/GB", (faults1 - faults0) / gb)):
                        samples.setdefault(f"{row} {metric}", []).append(value)
                    print(f"rep {rep + 1} {row}  {received['bits_per_second'] / 8e6:7.0f} MB/s  "
                          f"{(cpu1 - cpu0) / gb:5.2f} cpu s/GB  {(faults1 - faults0) / gb:8.0f} faults/GB", flush=True)
                    time.sleep(0.3)
        print(f"\n{'path':<18}{'MB/s':>8}{'cpu s/GB':>10}{'faults/GB':>11}   (medians of {args.reps})")
        for path in paths:
            for direction in ("fwd", "rev"):
                row = f"{path:<14}{direction}"
                print(f"{row:<18}" + "".join(f"{statistics.median(samples[f'{row} {m}']):{w}.{p}f}"
                                              for m, w, p in (("MB/s", 8, 0), ("cpu s/GB", 10, 2), ("faults/GB", 11, 0))))
    finally:
        procs.stop_all()


if __name__ == "__main__":
    main()
