"""Logs, metrics and the dashboard (issue 16): what an operator looks at.

* ``/metrics`` scraped and parsed with prometheus_client's own parser: per-tunnel
  requests by status class, bytes, a latency histogram; share refusals by reason, invoke
  outcomes, tasks.
* ``relay gateway --log-format json`` as a real process: every line is JSON, one access
  line per proxied request with its fields, and no secret in any line.
* The dashboard: sign-in, cookie, revocation, and in headless Chromium a page that shows
  the agent and a request made through a tunnel, with no key or token in it.
"""
from __future__ import annotations

import asyncio
import bisect
import json
import os
import re
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any, Optional

import pytest
from prometheus_client.parser import text_string_to_metric_families

from relay.gateway.http.traffic import BUCKETS, Traffic
from relay.logs import redact
from tests.gateway.test_gateway_e2e import gateway_and_team, http, run, running_agent, wait_until
from tests.http.test_http_tunnel import open_http_tunnel
from tests.http.test_http_tunnel_browser import DevTools, chromium_binary, start_chromium
from tests.support.servers import free_port
from tests.support.webapps import WebApp

pytestmark = pytest.mark.timeout(180)


def _get(url: str, headers: Optional[dict[str, str]] = None, data: Optional[bytes] = None,
         method: Optional[str] = None) -> tuple[int, dict[str, str], bytes]:
    """One request with urllib, redirects not followed: (status, headers, body)."""

    class NoRedirect(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, *args: Any, **kwargs: Any) -> None:
            return None

    opener = urllib.request.build_opener(NoRedirect)
    request = urllib.request.Request(url, data=data, headers=headers or {}, method=method)
    try:
        with opener.open(request, timeout=10) as resp:
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


def samples(text: str) -> dict[str, dict[tuple, float]]:
    """Every sample of an exposition, by sample name, keyed by its sorted labels."""
    out: dict[str, dict[tuple, float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return out



def test_traffic_counts_each_exchange_by_status_class_and_latency_bucket() -> None:
    """Traffic.record (compiled in the accelerated run: its bucket is found by a typed
    walk) puts each duration where bisect_left over BUCKETS would, bounds included."""
    traffic = Traffic(clock=lambda: 1000.0)
    observe = traffic.observer("tunnel", "team", "sid")
    durations = [0.0, 0.001, *BUCKETS, *(b * 1.01 for b in BUCKETS), 3600.0]
    for seconds in durations:
        observe(b"GET", b"/x?token=secret", 200, 3, 5, seconds)
    for status in (0, 99, 101, 404, 503, 600):
        observe(b"POST", b"/y", status, 0, 0, 0.0)
    dest = traffic.destinations[("tunnel", "team", "sid")]
    expected = [0] * (len(BUCKETS) + 1)
    for seconds in [*durations, *[0.0] * 6]:
        expected[bisect.bisect_left(BUCKETS, seconds)] += 1
    assert dest.buckets == expected
    assert dict(dest.requests) == {"2xx": len(durations), "none": 3, "1xx": 1, "4xx": 1, "5xx": 1}
    assert (dest.bytes_in, dest.bytes_out) == (3 * len(durations), 5 * len(durations))
    assert dest.duration_sum == pytest.approx(sum(durations))
    newest = traffic.recent("team")[0]
    assert newest["path"] == "/y" and newest["status"] == 600 and newest["time"] == 1000.0
    assert all("secret" not in entry["path"] for entry in traffic.recent("team"))
    traffic.forget("tunnel", "sid")
    observe(b"GET", b"/z", 200, 1, 1, 0.0)  # a forgotten destination's series stay gone
    assert dest.count == len(durations) + 6 and ("tunnel", "team", "sid") not in traffic.destinations

def test_redact_hides_keys_tokens_and_bearer_credentials():
    token = "A" * 43
    line = (f"GET /tunnel/{token}/x key sk-{'b' * 43} Authorization: Bearer eyJhbGciOi.JIUzI1NiJ9.sig12345 "
            f"/s/{token}/ whsec_{'c' * 30}")
    out = redact(line)
    assert token not in out and "b" * 43 not in out and "eyJhbGciOi" not in out and "c" * 30 not in out
    assert "/tunnel/<redacted>/x" in out and "sk-<redacted>" in out


def test_metrics_per_tunnel_and_feature_counters_parse_with_prometheus_client(tmp_path):
    async def main():
        async with WebApp() as app, gateway_and_team(tmp_path) as (gw, keys):
            sk = keys["sk"]
            async with running_agent(gw, keys["ak"], name="obs") as agent:
                agent.tasks.register_builtins()
                # A task first: an agent with a tunnel open takes none.
                status, answer = await http(gw.port, "POST", "/api/v1/tasks", sk, {"kind": "echo", "input": 1})
                assert status == 202, answer
                await wait_until(lambda: gw.tasks.by_status().get("succeeded") == 1)
                tunnel = await open_http_tunnel(gw, sk, agent.agent_id, app.port)
                dead = await open_http_tunnel(gw, sk, agent.agent_id, free_port())  # nothing listens: 502
                base = urllib.parse.urlsplit(tunnel["tunnel_url"]).path
                for _ in range(3):
                    status, _, _ = await asyncio.to_thread(_get, tunnel["tunnel_url"] + "echo?q=1")
                    assert status == 200
                status, _, _ = await asyncio.to_thread(_get, tunnel["tunnel_url"] + "upload", data=b"x" * 1000,
                                                       method="POST")
                assert status == 200
                status, _, _ = await asyncio.to_thread(_get, dead["tunnel_url"])
                assert status == 502

                # A share that allows GET only: a POST is refused (405), counted by reason.
                status, created = await http(gw.port, "POST", "/api/v1/tunnels", sk, {
                    "target": f"127.0.0.1:{app.port}", "agent_id": agent.agent_id, "name": "web",
                    "protocol": "http"})
                assert status == 201, created
                status, share = await http(gw.port, "POST", f"/api/v1/tunnels/{created['id']}/shares", sk,
                                           {"name": "ro", "allowed_methods": ["GET"]})
                assert status == 201, share
                status, _, _ = await asyncio.to_thread(_get, share["share_url"] + "echo", data=b"", method="POST")
                assert status == 405

                status, _ = await http(gw.port, "POST", "/api/v1/r/invoke/no-such-service", sk,
                                       {"method": "GET", "path": "/"})
                assert status == 404

                status, headers, body = await asyncio.to_thread(_get, gw.url + "/metrics")
                assert status == 200 and headers["Content-Type"].startswith("text/plain")
                text = body.decode()
                got = samples(text)
                sid, dead_sid = tunnel["session_id"], dead["session_id"]
                requests = got["relay_tunnel_http_requests_total"]
                assert requests[(("code", "2xx"), ("session_id", sid))] == 4
                assert requests[(("code", "5xx"), ("session_id", dead_sid))] == 1
                assert got["relay_tunnel_http_request_bytes_total"][(("session_id", sid),)] == 1000
                assert got["relay_tunnel_http_response_bytes_total"][(("session_id", sid),)] > 0
                assert got["relay_tunnel_http_request_duration_seconds_count"][(("session_id", sid),)] == 4
                inf = got["relay_tunnel_http_request_duration_seconds_bucket"][(("le", "+Inf"), ("session_id", sid))]
                assert inf == 4
                assert got["relay_tunnel_http_requests_active"][(("session_id", sid),)] == 0
                assert got["relay_share_refusals_total"][(("reason", "method_not_allowed"),)] == 1
                assert got["relay_tasks_total"][(("event", "submitted"),)] == 1
                assert got["relay_tasks_total"][(("event", "succeeded"),)] == 1
                assert got["relay_invoke_requests_total"][(("outcome", "service_not_found"),)] == 1
                assert got["relay_agents_online"][()] == 1
                # Names follow the conventions: counters end in _total, units are base units.
                for family in text_string_to_metric_families(text):
                    assert family.name.startswith("relay_"), family.name
                    if family.type == "histogram":
                        assert family.name.endswith("_seconds")
                assert base.split("/")[2] not in text  # no access token in a label

                # A closed tunnel's series go away with it.
                status, _ = await http(gw.port, "DELETE", f"/api/v1/agents/{agent.agent_id}/tunnel", sk)
                assert status == 200
                _, _, body = await asyncio.to_thread(_get, gw.url + "/metrics")
                assert sid not in body.decode()

    run(main, timeout=120)


def _wait_text(path: Path, predicate, proc: subprocess.Popen, timeout: float = 30) -> str:
    deadline = time.monotonic() + timeout
    while True:
        text = path.read_text(errors="replace")
        if predicate(text):
            return text
        assert proc.poll() is None, text
        assert time.monotonic() < deadline, text
        time.sleep(0.05)


def test_json_logs_with_an_access_line_per_request_and_no_secrets(tmp_path):
    port, web_port = free_port(), free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    gw_out, gw_err, agent_err = tmp_path / "gw.out", tmp_path / "gw.err", tmp_path / "agent.err"
    procs: list[subprocess.Popen] = []
    try:
        procs.append(subprocess.Popen([sys.executable, "-m", "http.server", str(web_port), "--bind", "127.0.0.1"],
                                      cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        (tmp_path / "page.html").write_text("hello")
        with gw_out.open("wb") as out, gw_err.open("wb") as err:
            gw = subprocess.Popen([sys.executable, "-m", "relay", "gateway", "--listen", f"127.0.0.1:{port}",
                                   "--data", str(tmp_path / "data"), "--log-format", "json"],
                                  stdout=out, stderr=err, env=env)
        procs.append(gw)
        text = _wait_text(gw_out, lambda t: "listening on" in t, gw)
        keys = dict(re.findall(r"^  (sk|dk|ak)  (\S+)$", text, re.M))
        with agent_err.open("wb") as err:
            agent = subprocess.Popen([sys.executable, "-m", "relay", "agent", "--name", "logs", "--log-format", "json"],
                                     stdout=subprocess.DEVNULL, stderr=err,
                                     env={**env, "RELAY_GATEWAY": f"http://127.0.0.1:{port}", "RELAY_KEY": keys["ak"]})
        procs.append(agent)
        _wait_text(agent_err, lambda t: "registered as agent" in t, agent)
        status, _, body = _get(f"http://127.0.0.1:{port}/api/v1/agents", {"Authorization": f"Bearer {keys['sk']}"})
        agent_id = json.loads(body)["agents"][0]["agent_id"]
        status, _, body = _get(f"http://127.0.0.1:{port}/api/v1/agents/{agent_id}/tunnel",
                               {"Authorization": f"Bearer {keys['sk']}", "Content-Type": "application/json"},
                               json.dumps({"target_port": web_port}).encode())
        opened = json.loads(body)
        token = urllib.parse.urlsplit(opened["tunnel_url"]).path.split("/")[2]
        status, _, body = _get(opened["tunnel_url"] + "page.html?password=hunter2")
        assert status == 200 and body == b"hello"
        status, _, _ = _get(opened["tunnel_url"] + "missing.html")
        assert status == 404

        text = _wait_text(gw_err, lambda t: t.count('"logger": "relay.access"') >= 2, gw)
        lines = [json.loads(line) for line in text.splitlines() if line.strip()]  # every line is JSON
        access = [line for line in lines if line["logger"] == "relay.access"]
        first, second = access[0], access[1]
        assert first["tunnel"] == opened["session_id"] and first["method"] == "GET"
        assert first["path"] == "/page.html" and first["status"] == 200 and first["bytes_out"] == 5
        assert first["duration_ms"] >= 0 and first["level"] == "info" and first["time"].endswith("Z")
        assert second["path"] == "/missing.html" and second["status"] == 404
        everything = text + agent_err.read_text()
        for agent_line in agent_err.read_text().splitlines():
            json.loads(agent_line)  # the agent's lines are JSON too
        for secret in (token, keys["sk"], keys["ak"], opened["admin_token"], "hunter2"):
            assert secret not in everything
    finally:
        for proc in reversed(procs):
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()


def test_dashboard_sign_in_cookie_and_revocation(tmp_path):
    async def main():
        async with gateway_and_team(tmp_path) as (gw, keys):
            status, headers, _ = await asyncio.to_thread(_get, gw.url + "/")
            assert status == 303 and headers["Location"] == "/dashboard/"
            status, _, body = await asyncio.to_thread(_get, gw.url + "/dashboard/")
            assert status == 200 and b'name="key"' in body  # the sign-in form
            status, _, body = await asyncio.to_thread(_get, gw.url + "/dashboard/login",
                                                      data=b"key=sk-wrong", method="POST")
            assert status == 401 and b"Not signed in" in body
            status, _, body = await asyncio.to_thread(_get, gw.url + "/dashboard/login",
                                                      data=f"key={keys['ak']}".encode(), method="POST")
            assert status in (401, 403), body  # an agent key does not open the dashboard
            status, headers, _ = await asyncio.to_thread(_get, gw.url + "/dashboard/login",
                                                         data=f"key={keys['dk']}".encode(), method="POST")
            assert status == 303
            cookie = headers["Set-Cookie"]
            assert "Path=/dashboard" in cookie and "HttpOnly" in cookie and "SameSite=Strict" in cookie
            assert keys["dk"] not in cookie
            session = cookie.split(";", 1)[0]
            status, _, body = await asyncio.to_thread(_get, gw.url + "/dashboard/", {"Cookie": session})
            assert status == 200 and b"team-a" in body and b"Recent requests" in body
            # A forged cookie is nobody.
            forged = session[:-4] + ("AAAA" if not session.endswith("AAAA") else "BBBB")
            _, _, body = await asyncio.to_thread(_get, gw.url + "/dashboard/", {"Cookie": forged})
            assert b'name="key"' in body
            # The Authorization header works as on the API.
            status, _, body = await asyncio.to_thread(_get, gw.url + "/dashboard/",
                                                      {"Authorization": f"Bearer {keys['sk']}"})
            assert status == 200 and b"Agents" in body
            # Revoking the key ends the browser session at its next page load.
            team = (await gw.store.list_teams())[0]
            [cred] = [c for c in await gw.store.list_credentials(team.id) if c.kind == "dk"]
            await gw.store.revoke_credential(team.id, cred.id)
            _, _, body = await asyncio.to_thread(_get, gw.url + "/dashboard/", {"Cookie": session})
            assert b'name="key"' in body

    run(main)


def test_chromium_dashboard_shows_the_agent_and_a_request_through_a_tunnel(tmp_path):
    chromium_binary()

    async def main():
        async with WebApp() as app, gateway_and_team(tmp_path) as (gw, keys):
            async with running_agent(gw, keys["ak"], name="dash-box", labels=["gpu"]) as agent:
                tunnel = await open_http_tunnel(gw, keys["sk"], agent.agent_id, app.port)
                status, _, _ = await asyncio.to_thread(_get, tunnel["tunnel_url"] + "echo/dashboard-probe?x=1")
                assert status == 200
                proc, port = await start_chromium(tmp_path / "profile", gw.url + "/")
                try:
                    devtools = await DevTools.attach(port, gw.url)

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

                    assert await poll("!!document.getElementById('key')", True)
                    await devtools.evaluate(f"document.getElementById('key').value = {json.dumps(keys['sk'])};"
                                            "document.getElementById('signin').click()")
                    assert await poll("document.title", "relay dashboard") == "relay dashboard"
                    text = await devtools.evaluate("document.body.innerText")
                    assert "dash-box" in text and "gpu" in text, text
                    assert "/echo/dashboard-probe" in text and tunnel["session_id"] in text, text
                    page = await devtools.evaluate("document.documentElement.outerHTML")
                    token = urllib.parse.urlsplit(tunnel["tunnel_url"]).path.split("/")[2]
                    for secret in (keys["sk"], keys["ak"], token, tunnel["admin_token"], "x=1"):
                        assert secret not in page
                    assert await devtools.evaluate("document.cookie") == ""  # HttpOnly
                    await devtools.ws.close()
                finally:
                    proc.kill()
                    await proc.wait()

    run(main, timeout=150)
