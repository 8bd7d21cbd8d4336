"""Headless Chromium through an HTTP tunnel: the ComfyUI pattern.

The page (tests/support/webapps.py) is loaded at the tunnel URL; its script fetches a relative
sub-resource and opens a WebSocket to a path relative to its own URL, i.e. through the
same tunnel, and writes the echo into the DOM. ``--dump-dom`` checks the page as the CLI
sees it; the WebSocket's echo is awaited by polling the live page over the DevTools
protocol (a virtual time budget does not wait for WebSocket messages), which also takes
the screenshot. Chromium is Debian's ``chromium`` package
(``scripts/bootstrap --system-deps`` installs it); without it the test fails, never skips.
"""
from __future__ import annotations

import asyncio
import base64
import json
import re
import shutil
import struct
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from tests.gateway.test_gateway_e2e import http, run, run_cmd
from tests.http.test_http_tunnel import WsClient, path_of, tunnel_to
from tests.support.webapps import WS_GREETING, WebApp

pytestmark = pytest.mark.timeout(180)

WIDTH, HEIGHT = 1000, 700


def chromium_binary() -> str:
    path = shutil.which("chromium")
    if path is None:
        pytest.fail("chromium is not installed: run scripts/bootstrap --system-deps "
                    "(Debian package 'chromium')")
    return path


def chromium_args(profile: Path) -> list[str]:
    # Headless, no sandbox (root in CI), nothing that talks to the network on its own.
    return [chromium_binary(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
            "--no-first-run", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--disable-dev-shm-usage", f"--user-data-dir={profile}"]


def png_size(data: bytes) -> tuple[int, int]:
    """Width and height from a PNG's IHDR; AssertionError if it is not a PNG."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n", data[:16]
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def _get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=10) as resp:  # DevTools' HTTP keeps connections open
        return json.loads(resp.read())


class DevTools:
    """Just enough of the Chrome DevTools protocol (over this suite's WebSocket client) to
    poll a page's DOM and take a screenshot."""

    def __init__(self, ws: WsClient) -> None:
        self.ws = ws
        self.next_id = 0

    @classmethod
    async def attach(cls, port: int, url: str) -> "DevTools":
        """Connect to the page target showing ``url`` on the DevTools ``port``."""
        page = None
        for _ in range(100):
            targets = await asyncio.to_thread(_get_json, f"http://127.0.0.1:{port}/json/list")
            page = next((t for t in targets if t.get("type") == "page"
                         and t.get("url", "").startswith(url)), None)
            if page is not None:
                break
            await asyncio.sleep(0.1)
        assert page is not None, f"no page target for {url}"
        return cls(await WsClient.connect(port, urlsplit(page["webSocketDebuggerUrl"]).path))

    async def call(self, method: str, **params: object) -> dict:
        self.next_id += 1
        await self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:  # skip events and older answers
            message = json.loads(await self.ws.receive())
            if message.get("id") == self.next_id:
                assert "error" not in message, message
                return message["result"]

    async def evaluate(self, expression: str) -> object:
        result = await self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        return result["result"].get("value")


async def start_chromium(profile: Path, url: str,
                         extra: Sequence[str] = ()) -> tuple[asyncio.subprocess.Process, int]:
    """Headless Chromium showing ``url`` with DevTools on a free port: (process, port).
    ``extra``: more command-line switches (e.g. ``--host-resolver-rules``)."""
    proc = await asyncio.create_subprocess_exec(
        *chromium_args(profile), *extra, "--remote-debugging-port=0", f"--window-size={WIDTH},{HEIGHT}", url,
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE)
    seen = []
    async with asyncio.timeout(60):
        while True:
            line = (await proc.stderr.readline()).decode(errors="replace")
            if not line:
                raise AssertionError("chromium exited before DevTools listened:\n" + "".join(seen[-40:]))
            seen.append(line)
            match = re.search(r"DevTools listening on ws://[^:]+:(\d+)/", line)
            if match:
                break

    async def drain() -> None:  # keep reading its chatter so the pipe never fills
        while await proc.stderr.read(65536):
            pass

    asyncio.get_running_loop().create_task(drain())
    return proc, int(match.group(1))


def test_chromium_loads_the_page_and_its_websocket_through_the_tunnel(tmp_path):
    chromium_binary()

    async def main():
        async with WebApp() as app, tunnel_to(tmp_path, app.port) as (gw, keys, agent, tunnel):
            url = tunnel["tunnel_url"]
            # 1. The CLI way: --dump-dom after the page loaded (its fetch() is a network
            #    fetch, so the virtual time budget waits for it; the WebSocket may not be).
            code, out, err = await run_cmd(*chromium_args(tmp_path / "profile1"),
                                           "--virtual-time-budget=5000", "--dump-dom", url, timeout=90)
            dom = out.decode()
            assert code == 0, err.decode()[-3000:]
            assert "relay test app" in dom and "info: relay-webapp" in dom, dom

            # 2. A live browser, polled until the page's script wrote the WebSocket echo
            #    into the DOM, then a screenshot of it.
            proc, port = await start_chromium(tmp_path / "profile2", url)
            try:
                devtools = await DevTools.attach(port, url)
                expected = f"echo: echo: {WS_GREETING}"
                deadline = time.monotonic() + 30
                while True:
                    text = await devtools.evaluate("document.getElementById('echo').textContent")
                    if text == expected or time.monotonic() > deadline:
                        break
                    await asyncio.sleep(0.1)
                dom = await devtools.evaluate("document.documentElement.outerHTML")
                assert text == expected, dom
                assert "info: relay-webapp" in dom, dom  # a relative fetch() through the tunnel
                shot = tmp_path / "tunnel-page.png"
                await devtools.call("Emulation.setDeviceMetricsOverride", width=WIDTH, height=HEIGHT,
                                    deviceScaleFactor=1, mobile=False)
                result = await devtools.call("Page.captureScreenshot", format="png")
                shot.write_bytes(base64.b64decode(result["data"]))
                assert png_size(shot.read_bytes()) == (WIDTH, HEIGHT)
                assert shot.stat().st_size > 2000  # a rendered page, not an empty canvas
                await devtools.ws.close()
            finally:
                proc.kill()
                await proc.wait()

            # The gateway saw the WebSocket go through this tunnel.
            status, stats = await http(gw.port, "GET", path_of(url) + "_relay/stats",
                                       headers={"X-Admin-Token": tunnel["admin_token"]})
            assert status == 200 and stats["websockets"] >= 1, stats

    run(main, timeout=150)
