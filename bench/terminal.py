"""The web terminal against a pty read directly, on this machine.

One process, one uvloop loop: a gateway and an agent with ``--terminal /bin/bash`` (real
sockets on 127.0.0.1), and a WebSocket client playing the page. The peer is the same
shell on a pty this process reads itself (what a local terminal emulator does), so the
ratio is what the relay path costs: WebSocket, gateway, mux stream, agent, and back.

* keystroke echo: one byte typed into ``cat`` (the tty echoes it), time until the echo
  is back; median and p99 of ``--keys`` round trips;
* output: ``head -c N /dev/zero | tr '\\0' y`` (``--mib`` MiB), MiB/s until the last byte
  is read; median of ``--runs``.

Prints the numbers; asserts nothing. The gateway, the agent and the client share one
core here, so the relay path pays for all three.

    .venv/bin/python bench/terminal.py [--keys 300] [--mib 16] [--runs 3]
"""
from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import uvloop
import wsproto
import wsproto.events as ws_events

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from relay.agent import Agent  # noqa: E402  (after the path set-up above)
from relay.agent.terminal import TerminalSpec  # noqa: E402
from relay.gateway.app import Gateway  # noqa: E402
from relay.gateway.store import open_store  # noqa: E402

SHELL = "/bin/bash"


class Side:
    """A terminal to drive: ``send(bytes)`` and ``await until(predicate on output)``."""

    def __init__(self) -> None:
        self.output = bytearray()
        self.changed = asyncio.Event()

    def received(self, data: bytes) -> None:
        self.output += data
        self.changed.set()

    async def until(self, done: Callable[[bytearray], bool], timeout: float = 30.0) -> None:
        try:
            async with asyncio.timeout(timeout):
                while not done(self.output):
                    self.changed.clear()
                    await self.changed.wait()
        except TimeoutError:
            raise TimeoutError(f"{type(self).__name__}: no end in sight; last output {bytes(self.output[-300:])!r}") from None

    def send(self, data: bytes) -> None:
        raise NotImplementedError


class LocalPty(Side):
    """The peer: the shell on a pty this process reads and writes itself."""

    def __init__(self, shell: str) -> None:
        super().__init__()
        import fcntl
        import termios

        master, slave = os.openpty()

        def controlling_tty() -> None:
            fcntl.ioctl(0, termios.TIOCSCTTY, 0)

        self.proc = subprocess.Popen([shell], stdin=slave, stdout=slave, stderr=slave, start_new_session=True,
                                     preexec_fn=controlling_tty, env={**os.environ, "TERM": "xterm-256color"})
        os.close(slave)
        os.set_blocking(master, False)
        self.master = master
        asyncio.get_running_loop().add_reader(master, self._readable)

    def _readable(self) -> None:
        try:
            self.received(os.read(self.master, 65536))
        except OSError:
            asyncio.get_running_loop().remove_reader(self.master)

    def send(self, data: bytes) -> None:
        os.write(self.master, data)

    def close(self) -> None:
        asyncio.get_running_loop().remove_reader(self.master)
        self.proc.kill()
        self.proc.wait()
        os.close(self.master)


class WebTerminal(Side):
    """The relay path: a WebSocket client of the gateway's terminal endpoint."""

    @classmethod
    async def open(cls, port: int, path: str, admin: str) -> "WebTerminal":
        self = cls()
        self.reader, self.writer = await asyncio.open_connection("127.0.0.1", port)
        self.ws = wsproto.WSConnection(wsproto.ConnectionType.CLIENT)
        self.writer.write(self.ws.send(ws_events.Request(host=f"127.0.0.1:{port}", target=path,
                                                         extra_headers=[(b"x-admin-token", admin.encode())])))
        self.accepted = asyncio.get_running_loop().create_future()
        self.task = asyncio.get_running_loop().create_task(self._read())
        await self.accepted
        return self

    async def _read(self) -> None:
        while True:
            data = await self.reader.read(262144)
            self.ws.receive_data(data or None)
            for event in self.ws.events():
                if isinstance(event, ws_events.AcceptConnection):
                    self.accepted.set_result(None)
                elif isinstance(event, ws_events.BytesMessage):
                    self.received(event.data)
            if not data:
                return

    def send(self, data: bytes) -> None:
        self.writer.write(self.ws.send(ws_events.Message(data=data)))

    def close(self) -> None:
        self.task.cancel()
        self.writer.close()


async def measure(side: Side, keys: int, mib: int, runs: int) -> dict[str, Any]:
    side.send(b"stty -echoctl; echo READY\r")
    await side.until(lambda out: b"READY\r\n" in out)
    side.send(b"cat\r")
    await asyncio.sleep(0.3)  # cat is reading
    side.output.clear()
    latencies = []
    for i in range(keys):
        key = b"abcdefghijklmnopqrstuvwxyz"[i % 26:i % 26 + 1]
        start = time.perf_counter()
        side.send(key)
        await side.until(lambda out, want=i + 1: len(out) >= want)
        latencies.append(time.perf_counter() - start)
    side.send(b"\x03")  # ^C: cat ends
    await asyncio.sleep(0.3)
    rates = []
    size = mib * 1024 * 1024
    for run in range(runs):
        side.output.clear()
        side.send(f"head -c {size} /dev/zero | tr '\\0' y; echo; echo D''ONE{run}\r".encode())
        marker = f"DONE{run}\r\n".encode()
        await side.until(lambda out: b"| tr" in out)  # the command's own echo is back
        start = time.perf_counter()
        await side.until(lambda out, marker=marker: marker in out[-512:])  # then the prompt
        rates.append(mib / (time.perf_counter() - start))
        assert side.output.count(b"y") >= size, "output lost"
    latencies.sort()
    return {"echo_p50_us": statistics.median(latencies) * 1e6,
            "echo_p99_us": latencies[int(len(latencies) * 0.99) - 1] * 1e6,
            "output_mib_s": statistics.median(rates)}


def open_session(url: str, sk: str, agent_id: str) -> dict[str, Any]:
    import json
    import urllib.request

    request = urllib.request.Request(f"{url}/api/v1/agents/{agent_id}/tunnel", method="POST",
                                     data=json.dumps({"target_port": 22, "tunnel_protocol": "tcp"}).encode(),
                                     headers={"Authorization": f"Bearer {sk}", "Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as resp:
        return json.loads(resp.read())


def quiet_bash(directory: str) -> str:
    """bash without the machine's rc files (both sides run the same shell)."""
    wrapper = Path(directory) / "quiet-bash"
    wrapper.write_text(f"#!/bin/sh\nexec {SHELL} --norc --noprofile\n")
    wrapper.chmod(0o755)
    return str(wrapper)


async def main(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        await run_both(args, quiet_bash(tmp), tmp)


async def run_both(args: argparse.Namespace, shell: str, tmp: str) -> None:
    local = LocalPty(shell)
    try:
        direct = await measure(local, args.keys, args.mib, args.runs)
    finally:
        local.close()
    store = await open_store(None, Path(tmp) / "data")
    _, keys = await store.create_team_with_keys("bench")
    gw = Gateway(store)
    await gw.start("127.0.0.1", 0)
    agent = Agent(gw.url, keys["ak"], name="bench", terminal=TerminalSpec.create(shell))
    agent_task = asyncio.get_running_loop().create_task(agent.run())
    try:
        async with asyncio.timeout(20):
            while agent.agent_id is None:
                await asyncio.sleep(0.02)
        answer = await asyncio.to_thread(open_session, gw.url, keys["sk"], agent.agent_id)
        path = "/" + answer["terminal_url"].split("/", 3)[3] + "/ws"
        web = await WebTerminal.open(gw.port, path, answer["admin_token"])
        try:
            relayed = await measure(web, args.keys, args.mib, args.runs)
        finally:
            web.close()
    finally:
        agent_task.cancel()
        agent.close()
        await gw.close()
        await store.close()
    print(f"{'':24}{'direct pty':>14}{'web terminal':>14}{'ratio':>8}")
    for name, unit in (("echo_p50_us", "us"), ("echo_p99_us", "us"), ("output_mib_s", "MiB/s")):
        print(f"{name + ' (' + unit + ')':24}{direct[name]:14.1f}{relayed[name]:14.1f}"
              f"{relayed[name] / direct[name]:8.2f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--keys", type=int, default=300, help="keystroke round trips")
    parser.add_argument("--mib", type=int, default=16, help="MiB of output per run")
    parser.add_argument("--runs", type=int, default=3)
    uvloop.run(main(parser.parse_args()))
