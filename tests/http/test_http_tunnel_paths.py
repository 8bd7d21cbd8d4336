"""HTTP tunnels and apps that use absolute paths (issue 16): a Flask app with a login
redirect, a session cookie and root-relative links, behind a real agent.

* Path-prefixed tunnels (``/tunnel/TOKEN/``, seed 000): ``Location`` and ``Set-Cookie``
  paths are moved under the prefix, as nginx's ``proxy_redirect`` and
  ``proxy_cookie_path`` do; bodies are not rewritten.
* Host-based tunnels (``--tunnel-domain``): ``LABEL.DOMAIN`` reaches the app with every
  path untouched, so pages that link ``/static/...`` and post to ``/login`` work.

Both are driven by plain HTTP clients and by headless Chromium (a host-resolver rule
sends the tunnel domain to 127.0.0.1).
"""
from __future__ import annotations

import asyncio
import contextlib
import time
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from relay.gateway.http.proxy import rewrite_paths
from relay.gateway.http.tunnel_hosts import host_label, token_from_host, tunnel_host_url
from tests.gateway.test_gateway_e2e import gateway_and_team, run, running_agent
from tests.http.test_http_tunnel import Client, open_http_tunnel
from tests.http.test_http_tunnel_browser import DevTools, chromium_binary, start_chromium
from tests.support.flask_app import FlaskServer

pytestmark = pytest.mark.timeout(180)

DOMAIN = "tunnels.test"


# ----------------------------------------------------------------------------- units


def test_rewrite_paths_moves_locations_and_cookie_paths_under_the_prefix():
    prefix = b"/tunnel/abc"
    head = (b"HTTP/1.1 302 FOUND\r\nLocation: /login?next=%2F\r\n"
            b"Set-Cookie: session=x; HttpOnly; Path=/\r\nSet-Cookie: b=1; path=/app; Secure\r\n"
            b"Set-Cookie: c=1\r\nContent-Location: /doc")
    out = rewrite_paths(head, prefix, (b"gw:8080",))
    assert out == (b"HTTP/1.1 302 FOUND\r\nLocation: /tunnel/abc/login?next=%2F\r\n"
                   b"Set-Cookie: session=x; HttpOnly; Path=/tunnel/abc/\r\nSet-Cookie: b=1; path=/tunnel/abc/app; Secure\r\n"
                   b"Set-Cookie: c=1\r\nContent-Location: /tunnel/abc/doc")
    cases = {
        b"/tunnel/abc/x": b"/tunnel/abc/x",  # the app knew its prefix (X-Forwarded-Prefix)
        b"relative/x": b"relative/x",
        b"//cdn.example.com/x": b"//cdn.example.com/x",  # another site, scheme-relative
        b"https://example.com/x": b"https://example.com/x",  # another site
        b"http://GW:8080/login": b"http://GW:8080/tunnel/abc/login",  # the client's Host
        b"http://gw:8080": b"http://gw:8080/tunnel/abc/",
        b"http://gw:8080?q=1": b"http://gw:8080/tunnel/abc/?q=1",
        b"http://127.0.0.1:3000/x": b"/tunnel/abc/x",  # the target's own address: root-relative
    }
    for location, expected in cases.items():
        got = rewrite_paths(b"HTTP/1.1 301 X\r\nlocation: " + location, prefix, (b"gw:8080",), (b"127.0.0.1:3000",))
        assert got == b"HTTP/1.1 301 X\r\nlocation: " + expected, location


def test_host_labels_round_trip_the_token_case_insensitively():
    import secrets

    for _ in range(50):
        token = secrets.token_urlsafe(32)
        label = host_label(token)
        assert label is not None and label == label.lower() and len(label) <= 63
        assert token_from_host(f"{label.upper()}.Tunnels.Test:8080", DOMAIN) == token
        assert token_from_host(f"{label}.{DOMAIN}", DOMAIN) == token
    assert token_from_host(f"a.b.{DOMAIN}", DOMAIN) is None  # one label only
    assert token_from_host(DOMAIN, DOMAIN) is None
    assert token_from_host("127.0.0.1:8080", DOMAIN) is None
    assert token_from_host(None, DOMAIN) is None
    assert host_label("not base64 !") is None
    assert tunnel_host_url(token, DOMAIN, "https://relay.example.com") == f"https://{host_label(token)}.{DOMAIN}/"


# ----------------------------------------------------------------------------- helpers


@contextlib.asynccontextmanager
async def flask_tunnel(tmp_path: Path, form_action: str = "/login"):
    """Flask app + gateway (with a tunnel domain) + agent + http tunnel:
    yields (gateway, tunnel answer)."""
    with FlaskServer(form_action) as app:
        async with gateway_and_team(tmp_path, tunnel_domain=DOMAIN) as (gw, keys):
            async with running_agent(gw, keys["ak"], name="flask-box") as agent:
                yield gw, await open_http_tunnel(gw, keys["sk"], agent.agent_id, app.port)


async def exchange(client: Client, method: str, target: str, headers: dict, body: bytes = b""):
    """One request on a keep-alive connection: (status, headers dict of lists, body)."""
    import h11

    conn = client.conn
    if conn.our_state is h11.DONE and conn.their_state is h11.DONE:
        conn.start_next_cycle()
    hdrs = [("Host", headers.pop("Host")), *headers.items(), ("Content-Length", str(len(body)))]
    client.writer.write(conn.send(h11.Request(method=method, target=target, headers=hdrs)))
    client.writer.write(conn.send(h11.Data(data=body)) + conn.send(h11.EndOfMessage()))
    response, data = None, b""
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            conn.receive_data(await asyncio.wait_for(client.reader.read(65536), 10))
            continue
        if isinstance(event, h11.Response):
            response = event
        elif isinstance(event, h11.Data):
            data += event.data
        elif isinstance(event, h11.EndOfMessage):
            break
    got: dict[str, list[str]] = {}
    for name, value in response.headers:
        got.setdefault(name.decode().lower(), []).append(value.decode())
    return response.status_code, got, data


# ----------------------------------------------------------------------------- HTTP


def test_path_tunnel_login_redirects_and_cookie_stay_inside_the_prefix(tmp_path):
    async def main():
        async with flask_tunnel(tmp_path, form_action="login") as (gw, tunnel):
            prefix = urlsplit(tunnel["tunnel_url"]).path.rstrip("/")
            host = f"127.0.0.1:{gw.port}"
            client = await Client.connect(gw.port)
            try:
                status, headers, _ = await exchange(client, "GET", prefix + "/", {"Host": host})
                assert status == 302 and headers["location"] == [prefix + "/login"], headers
                status, _, body = await exchange(client, "GET", prefix + "/login", {"Host": host})
                assert status == 200 and b'action="login"' in body
                status, headers, _ = await exchange(
                    client, "POST", prefix + "/login",
                    {"Host": host, "Content-Type": "application/x-www-form-urlencoded"}, b"user=alice")
                assert status == 302 and headers["location"] == [prefix + "/"], headers
                [cookie] = headers["set-cookie"]
                assert f"Path={prefix}/" in cookie, cookie
                session = cookie.split(";", 1)[0]
                status, _, body = await exchange(client, "GET", prefix + "/", {"Host": host, "Cookie": session})
                assert status == 200 and b"hello alice" in body, body
                # Bodies pass through as the app wrote them (no HTML rewriting).
                assert b'src="/static/app.js"' in body
            finally:
                await client.close()

    run(main)


def test_host_tunnel_serves_the_app_at_its_root_with_nothing_rewritten(tmp_path):
    async def main():
        async with flask_tunnel(tmp_path) as (gw, tunnel):
            host_url = tunnel["tunnel_host_url"]
            split = urlsplit(host_url)
            assert split.hostname.endswith("." + DOMAIN) and split.port == gw.port and split.path == "/"
            host = split.netloc
            client = await Client.connect(gw.port)
            try:
                status, headers, _ = await exchange(client, "GET", "/", {"Host": host})
                assert status == 302 and headers["location"] == ["/login"], headers
                status, headers, _ = await exchange(
                    client, "POST", "/login",
                    {"Host": host, "Content-Type": "application/x-www-form-urlencoded"}, b"user=bob")
                assert status == 302 and headers["location"] == ["/"]
                assert "Path=/;" in headers["set-cookie"][0] or headers["set-cookie"][0].endswith("Path=/")
                session = headers["set-cookie"][0].split(";", 1)[0]
                status, _, body = await exchange(client, "GET", "/static/app.js", {"Host": host})
                assert status == 200 and b"script: ran" in body
                # The gateway's own paths under the tunnel's host are the app's too ...
                status, _, _ = await exchange(client, "GET", "/healthz", {"Host": host})
                assert status == 404  # Flask's 404, not the gateway's healthz
                # ... and on the same connection another host is the gateway again.
                status, _, body = await exchange(client, "GET", "/healthz", {"Host": f"127.0.0.1:{gw.port}"})
                assert status == 200 and b'"ok"' in body
                status, _, body = await exchange(client, "GET", "/", {"Host": host, "Cookie": session})
                assert status == 200 and b"hello bob" in body
                # A label that names no open tunnel: 404 from the gateway.
                status, _, body = await exchange(client, "GET", "/", {"Host": f"{'a' * 52}.{DOMAIN}:{gw.port}"})
                assert status == 404 and b"tunnel_not_found" in body
            finally:
                await client.close()

    run(main)


def test_host_header_option_the_target_sees_it_and_its_absolute_redirects_stay_in_the_tunnel(tmp_path):
    from tests.gateway.test_gateway_e2e import http

    async def main():
        with FlaskServer() as app:
            async with gateway_and_team(tmp_path, tunnel_domain=DOMAIN) as (gw, keys):
                async with running_agent(gw, keys["ak"], name="host-box") as agent:
                    path = f"/api/v1/agents/{agent.agent_id}/tunnel"
                    for bad in ("two words", "", "a/b", 5, "x" * 300):
                        status, body = await http(gw.port, "POST", path, keys["sk"],
                                                  {"target_port": app.port, "host_header": bad})
                        assert status == 400 and body["error"]["code"] == "invalid_host_header", (bad, body)
                    status, body = await http(gw.port, "POST", path, keys["sk"], {
                        "target_port": app.port, "tunnel_protocol": "tcp", "host_header": "localhost"})
                    assert status == 400, body
                    status, tunnel = await http(gw.port, "POST", path, keys["sk"],
                                                {"target_port": app.port, "host_header": "localhost:3000"})
                    assert status == 200, tunnel
                    prefix = urlsplit(tunnel["tunnel_url"]).path.rstrip("/")
                    client = await Client.connect(gw.port)
                    try:
                        host = f"127.0.0.1:{gw.port}"
                        status, _, body = await exchange(client, "GET", prefix + "/host", {"Host": host})
                        assert status == 200 and body == b"localhost:3000"
                        status, headers, _ = await exchange(client, "GET", prefix + "/absolute", {"Host": host})
                        # http://localhost:3000/login names the target itself: made root-relative.
                        assert status == 302 and headers["location"] == [prefix + "/login"], headers
                        own = urlsplit(tunnel["tunnel_host_url"]).netloc
                        status, _, body = await exchange(client, "GET", "/host", {"Host": own})
                        assert status == 200 and body == b"localhost:3000"
                        status, headers, _ = await exchange(client, "GET", "/absolute", {"Host": own})
                        assert status == 302 and headers["location"] == ["/login"], headers
                    finally:
                        await client.close()

    run(main)


# ----------------------------------------------------------------------------- Chromium


async def _poll(devtools: DevTools, expression: str, expected: object, timeout: float = 30) -> object:
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = await devtools.evaluate(expression)
        except AssertionError:  # the page is navigating: its context is gone for a moment
            value = None
        if value == expected or time.monotonic() > deadline:
            return value
        await asyncio.sleep(0.1)


def test_chromium_signs_in_through_path_and_host_tunnels(tmp_path):
    chromium_binary()

    async def main():
        async with flask_tunnel(tmp_path) as (gw, tunnel):
            # Path-prefixed: the redirect to /login lands inside the tunnel, the cookie
            # set by a POST relative to the page comes back on the tunnel's paths.
            url = tunnel["tunnel_url"]
            prefix = urlsplit(url).path.rstrip("/")
            proc, port = await start_chromium(tmp_path / "profile-path", url)
            try:
                devtools = await DevTools.attach(port, url)
                assert await _poll(devtools, "location.pathname", prefix + "/login") == prefix + "/login"
                assert await _poll(devtools, "document.title", "flask login") == "flask login"
                await devtools.evaluate(
                    "fetch('login', {method: 'POST', body: new URLSearchParams({user: 'carol'})})"
                    ".then(() => { location.href = './'; })")
                assert await _poll(devtools, "document.getElementById('who') && "
                                   "document.getElementById('who').textContent", "hello carol") == "hello carol"
                assert await devtools.evaluate("location.pathname") == prefix + "/"
                await devtools.ws.close()
            finally:
                proc.kill()
                await proc.wait()

            # Host-based: the app's absolute form action, redirects and script all work.
            host_url = tunnel["tunnel_host_url"]
            proc, port = await start_chromium(tmp_path / "profile-host", host_url,
                                              extra=[f"--host-resolver-rules=MAP *.{DOMAIN} 127.0.0.1"])
            try:
                devtools = await DevTools.attach(port, host_url)
                assert await _poll(devtools, "location.pathname", "/login") == "/login"
                await devtools.evaluate("document.getElementById('user').value = 'dave';"
                                        "document.getElementById('form').submit()")
                assert await _poll(devtools, "document.getElementById('who') && "
                                   "document.getElementById('who').textContent", "hello dave") == "hello dave"
                assert await _poll(devtools, "document.getElementById('script').textContent",
                                   "script: ran") == "script: ran"  # /static/app.js, root-relative
                assert await devtools.evaluate("location.href") == host_url
                await devtools.ws.close()
            finally:
                proc.kill()
                await proc.wait()

    run(main, timeout=150)
