"""The request inspector of an HTTP tunnel (issue 16): last requests with headers and
bodies (bounded, credentials redacted), replay, the admin token required; and in headless
Chromium a page that shows a request made through the tunnel and a replay appearing."""
from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import pytest

from relay.gateway.web.inspector import BODY_CAP, KEEP
from tests.gateway.test_gateway_e2e import run
from tests.gateway.test_observability import _get
from tests.http.test_http_tunnel import tunnel_to
from tests.http.test_http_tunnel_browser import DevTools, chromium_binary, start_chromium
from tests.support.webapps import WebApp

pytestmark = pytest.mark.timeout(180)


def test_inspector_lists_redacts_bounds_and_replays(tmp_path):
    async def main():
        async with WebApp() as app, tunnel_to(tmp_path, app.port) as (gw, keys, agent, tunnel):
            url = tunnel["tunnel_url"]
            admin = {"X-Admin-Token": tunnel["admin_token"]}
            status, _, _ = await asyncio.to_thread(_get, url + "echo/first?x=1", {
                "Authorization": "Bearer app-secret-123456789", "Cookie": "sid=cookie-secret", "X-Trace": "t1"})
            assert status == 200
            status, _, _ = await asyncio.to_thread(_get, url + "upload", data=b"small body", method="POST")
            assert status == 200
            status, _, _ = await asyncio.to_thread(_get, url + "upload", data=b"y" * (BODY_CAP + 10), method="POST")
            assert status == 200

            status, _, body = await asyncio.to_thread(_get, url + "_relay/requests")
            assert status == 401
            status, _, body = await asyncio.to_thread(_get, url + "_relay/requests", {"X-Admin-Token": "wrong"})
            assert status == 403
            status, _, body = await asyncio.to_thread(_get, url + "_relay/requests", admin)
            assert status == 200
            listing = json.loads(body)["requests"]
            big, small, first = listing[0], listing[1], listing[2]
            assert first["method"] == "GET" and first["path"] == "/echo/first?x=1" and first["status"] == 200
            shown = dict(first["request_headers"])
            assert shown["Authorization"] == "<redacted>" and shown["Cookie"] == "<redacted>" and shown["X-Trace"] == "t1"
            # The credentials' headers are hidden (the echo app's own body repeats what it
            # got: that is the app's content, shown as it is, relay's tokens redacted).
            without_bodies = json.dumps([{k: v for k, v in e.items() if k != "response_body"} for e in listing])
            assert "app-secret" not in without_bodies and "cookie-secret" not in without_bodies
            assert "/tunnel/<redacted>" in first["response_body"]  # X-Forwarded-Prefix, as echoed
            assert '"target": "/echo/first?x=1"' in first["response_body"] or "/echo/first" in first["response_body"]
            assert small["request_body"] == "small body" and not small["request_body_truncated"]
            assert big["request_body_truncated"] and len(big["request_body"]) == BODY_CAP
            assert tunnel["admin_token"] not in body.decode()

            # Replay: the request goes through the tunnel again and shows up as a new one.
            status, _, answer = await asyncio.to_thread(_get, url + f"_relay/replay/{small['id']}", admin,
                                                        data=b"", method="POST")
            assert status == 200 and json.loads(answer) == {"replayed": small["id"], "status": 200}
            _, _, body = await asyncio.to_thread(_get, url + "_relay/requests", admin)
            newest = json.loads(body)["requests"][0]
            assert newest["id"] > big["id"] and newest["path"] == "/upload" and newest["request_body"] == "small body"
            status, _, _ = await asyncio.to_thread(_get, url + f"_relay/replay/{big['id']}", admin, data=b"",
                                                   method="POST")
            assert status == 409  # its body was cut: not replayable

            # Bounded: the last KEEP requests only.
            for i in range(KEEP + 5):
                await asyncio.to_thread(_get, url + f"echo/n{i}")
            _, _, body = await asyncio.to_thread(_get, url + "_relay/requests", admin)
            assert len(json.loads(body)["requests"]) == KEEP

    run(main, timeout=120)


def test_chromium_inspector_shows_a_request_and_a_replay_appears(tmp_path):
    chromium_binary()

    async def main():
        async with WebApp() as app, tunnel_to(tmp_path, app.port) as (gw, keys, agent, tunnel):
            url = tunnel["tunnel_url"]
            status, _, _ = await asyncio.to_thread(_get, url + "echo/inspect-me")
            assert status == 200
            page = url + "_relay/inspect"
            proc, port = await start_chromium(tmp_path / "profile", page)
            try:
                devtools = await DevTools.attach(port, page)

                async def poll(expression: str, want: Any, timeout: float = 30) -> Any:
                    deadline = time.monotonic() + timeout
                    while True:
                        try:
                            value = await devtools.evaluate(expression)
                        except AssertionError:  # navigating
                            value = None
                        if value == want or time.monotonic() > deadline:
                            return value
                        await asyncio.sleep(0.1)

                assert await poll("!!document.getElementById('admin_token')", True)
                await devtools.evaluate(f"document.getElementById('admin_token').value = "
                                        f"{json.dumps(tunnel['admin_token'])}; document.getElementById('open').click()")
                count = "document.querySelectorAll('tr.entry').length"
                assert await poll(count, 1) == 1
                assert "/echo/inspect-me" in await devtools.evaluate("document.querySelector('td.path').textContent")
                await devtools.evaluate("document.querySelector('button.replay').click()")
                assert await poll(count, 2) == 2  # the replay came back through the tunnel
                paths = await devtools.evaluate(
                    "Array.from(document.querySelectorAll('td.path')).map(td => td.firstChild.textContent)")
                assert paths == ["/echo/inspect-me", "/echo/inspect-me"], paths
                html = await devtools.evaluate("document.documentElement.outerHTML")
                assert tunnel["admin_token"] not in html and keys["sk"] not in html
                await devtools.ws.close()
            finally:
                proc.kill()
                await proc.wait()

    run(main, timeout=150)
