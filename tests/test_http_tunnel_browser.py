"""Headless Chromium through an HTTP tunnel: the ComfyUI pattern.

The page (tests/webapps.py) is loaded at the tunnel URL; its script fetches a relative
sub-resource and opens a WebSocket to a path relative to its own URL, i.e. through the
same tunnel, and writes the echo into the DOM. Chromium is Debian's ``chromium`` package
(``scripts/bootstrap --system-deps`` installs it); without it the test fails, never skips.
"""
from __future__ import annotations

import shutil
import struct
from pathlib import Path

import pytest

from tests.test_gateway_e2e import http, run, run_cmd
from tests.test_http_tunnel import path_of, tunnel_to
from tests.webapps import WS_GREETING, WebApp

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
    # The virtual time budget lets the page's fetch and WebSocket finish before the
    # DOM is dumped or the screenshot taken.
    return [chromium_binary(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
            "--no-first-run", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--disable-dev-shm-usage", f"--user-data-dir={profile}",
            "--virtual-time-budget=5000"]


def png_size(data: bytes) -> tuple[int, int]:
    """Width and height from a PNG's IHDR; AssertionError if it is not a PNG."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n", data[:16]
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_chromium_loads_the_page_and_its_websocket_through_the_tunnel(tmp_path):
    chromium_binary()

    async def main():
        async with WebApp() as app, tunnel_to(tmp_path, app.port) as (gw, keys, agent, tunnel):
            url = tunnel["tunnel_url"]
            code, out, err = await run_cmd(*chromium_args(tmp_path / "profile"), "--dump-dom", url,
                                           timeout=90)
            dom = out.decode()
            assert code == 0, err.decode()[-3000:]
            assert "relay test app" in dom, dom
            assert "info: relay-webapp" in dom, dom  # a relative fetch() through the tunnel
            assert f"echo: echo: {WS_GREETING}" in dom, dom  # the WebSocket echo

            shot = tmp_path / "tunnel-page.png"
            code, _, err = await run_cmd(*chromium_args(tmp_path / "profile2"),
                                         f"--screenshot={shot}", f"--window-size={WIDTH},{HEIGHT}",
                                         url, timeout=90)
            assert code == 0, err.decode()[-3000:]
            assert png_size(shot.read_bytes()) == (WIDTH, HEIGHT)
            assert shot.stat().st_size > 2000  # a rendered page, not an empty canvas

            # The gateway saw both WebSockets go through this tunnel.
            status, stats = await http(gw.port, "GET", path_of(url) + "_relay/stats",
                                       headers={"X-Admin-Token": tunnel["admin_token"]})
            assert status == 200 and stats["websockets"] == 2, stats

    run(main, timeout=150)
