"""``relay tunnels ...`` (the Tunnels API from the command line) against a real gateway,
real agents, a real TCP echo target and a real HTTP server.

The gateway stack of tests/cli/test_cli_tunnel.py (agent ``alpha``, two agents named
``twin``, the echo target) runs in a background thread; the CLI runs in-process through
click's CliRunner, its urllib client talking to the gateway like any other process.
"""
from __future__ import annotations

import json
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from click.testing import CliRunner

from relay.cli import main
from tests.cli.test_cli_tunnel import Stack, echo_through

pytestmark = pytest.mark.timeout(120)

JWT_SECRET = "a-test-secret-of-at-least-32-bytes-long!"


@pytest.fixture(scope="module")
def stack(tmp_path_factory) -> Iterator[Stack]:
    with Stack(tmp_path_factory.mktemp("cli-tunnels") / "data", twins=True, jwt_key=JWT_SECRET) as running:
        yield running


class _Hello(BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
        body = json.dumps({"path": self.path}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def web() -> Iterator[int]:
    """A real HTTP server on 127.0.0.1 (stdlib, in a thread); yields its port."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Hello)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


def relay(stack: Stack, *args: str, key: str | None = None, team: str | None = None) -> Any:
    """``relay tunnels ARGS`` with the gateway and key in the environment."""
    env = {"RELAY_GATEWAY": stack.url, "RELAY_KEY": key or stack.keys["sk"], "RELAY_CA_CERT": None,
           "RELAY_TEAM_ID": team}
    return CliRunner().invoke(main, ["tunnels", *args], env=env, catch_exceptions=False)


def ok_json(result: Any) -> Any:
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_create_list_get_update_delete_as_tables_and_json(stack):
    created = ok_json(relay(stack, "create", f"127.0.0.1:{stack.echo_port}", "--agent", "alpha",
                            "--name", "staging-db", "--protocol", "tcp", "--json"))
    assert created["name"] == "staging-db" and created["protocol"] == "tcp" and created["status"] == "active"
    assert echo_through(created["hub_port"]) == b"through the hub port"
    # Human: a table with a header row and the tunnel's row, columns aligned.
    table = relay(stack, "list")
    assert table.exit_code == 0, table.output
    header, *rows = table.output.splitlines()
    assert header.split() == ["ID", "NAME", "PROTO", "TARGET", "HUB", "STATUS", "PUBLIC", "CONNS"]
    row = next(r for r in rows if created["id"] in r)
    assert row.split()[1:4] == ["staging-db", "tcp", f"127.0.0.1:{stack.echo_port}"]
    assert header.index("NAME") == row.index("staging-db")
    assert created["id"] in [t["id"] for t in ok_json(relay(stack, "list", "--json"))["tunnels"]]
    # get by name or id.
    shown = relay(stack, "get", "staging-db")
    assert shown.exit_code == 0 and f"id           {created['id']}" in shown.output
    assert "status       active" in shown.output
    assert ok_json(relay(stack, "get", created["id"], "--json"))["name"] == "staging-db"
    # update: status, name, metadata.
    paused = ok_json(relay(stack, "update", "staging-db", "--status", "paused", "--json"))
    assert paused["status"] == "paused"
    renamed = relay(stack, "update", created["id"], "--name", "prod-db", "--status", "active",
                    "--metadata", '{"owner": "ops"}')
    assert renamed.exit_code == 0 and "Updated tunnel prod-db" in renamed.output
    assert 'metadata     {"owner": "ops"}' in renamed.output
    bad = relay(stack, "update", "prod-db", "--metadata", "{nope")
    assert bad.exit_code != 0 and "not JSON" in bad.output
    # delete; then it is gone, and a clear error names it.
    deleted = relay(stack, "delete", "prod-db")
    assert deleted.exit_code == 0 and f"Deleted tunnel prod-db ({created['id']})" in deleted.output
    missing = relay(stack, "get", "prod-db")
    assert missing.exit_code == 1 and "no tunnel 'prod-db' in this team" in missing.output
    # API errors are one line with the gateway's code.
    wrong = relay(stack, "create", "127.0.0.1:99999", "--agent", "alpha")
    assert wrong.exit_code == 1 and "invalid_target" in wrong.output and len(wrong.output.splitlines()) == 1


def test_connect_binds_lists_unbinds_and_a_failed_bind_fails(stack):
    created = ok_json(relay(stack, "create", f"127.0.0.1:{stack.echo_port}", "--agent", "alpha",
                            "--name", "reach-me", "--protocol", "tcp", "--json"))
    receiver = stack.twin_ids[0]
    port = _free_port()
    connected = relay(stack, "connect", "reach-me", "--agent", receiver, "--local-port", str(port))
    assert connected.exit_code == 0, connected.output
    assert f"connection  tcp://127.0.0.1:{port}" in connected.output
    assert echo_through(port) == b"through the hub port"
    # Bindings: a table and JSON.
    listing = relay(stack, "bindings", "reach-me")
    assert listing.exit_code == 0 and listing.output.split()[:5] == ["AGENT", "LOCAL", "ONLINE", "CONNECTION",
                                                                       "CREATED"]
    assert f"{receiver}  127.0.0.1:{port}  yes" in listing.output
    [binding] = ok_json(relay(stack, "bindings", created["id"], "--json"))["bindings"]
    assert binding["agent_id"] == receiver and binding["local_port"] == port
    # A port that is taken: the agent cannot listen; the CLI says so and exits 1.
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        failed = relay(stack, "connect", "reach-me", "--agent", stack.twin_ids[1], "--local-port", str(busy))
        assert failed.exit_code == 1
        assert f"cannot listen on 127.0.0.1:{busy}" in failed.output and "502 bind_failed" in failed.output
    assert len(ok_json(relay(stack, "bindings", "reach-me", "--json"))["bindings"]) == 1
    # Unbind: the listener closes, the binding is gone.
    unbound = relay(stack, "unbind", "reach-me", "--agent", receiver)
    assert unbound.exit_code == 0 and "Unbound tunnel reach-me" in unbound.output
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=2).close()
        except OSError:
            break
        time.sleep(0.05)
    else:
        pytest.fail("the agent still listens after unbind")
    assert relay(stack, "bindings", "reach-me").output.strip() == "No bindings."
    again = relay(stack, "unbind", "reach-me", "--agent", receiver)
    assert again.exit_code == 1 and "binding_not_found" in again.output
    relay(stack, "delete", "reach-me")


def test_share_links_of_an_http_tunnel(stack, web):
    ok_json(relay(stack, "create", f"127.0.0.1:{web}", "--agent", "alpha", "--name", "site",
                  "--protocol", "http", "--json"))
    made = relay(stack, "share", "site", "--name", "demo", "--expires-in", "7d", "--method", "get",
                 "--rate-limit", "50")
    assert made.exit_code == 0, made.output
    url = next(line.split()[1] for line in made.output.splitlines() if line.strip().startswith("shareUrl"))
    with urllib.request.urlopen(url + "hello?x=1", timeout=10) as response:
        assert json.loads(response.read()) == {"path": "/hello?x=1"}
    listing = relay(stack, "shares", "site")
    assert listing.exit_code == 0
    assert listing.output.split()[:6] == ["ID", "NAME", "EXPIRES", "METHODS", "RATE", "TOKEN"]
    assert "GET,HEAD" not in listing.output and "GET" in listing.output and "50/min" in listing.output
    [share] = ok_json(relay(stack, "shares", "site", "--json"))["shares"]
    assert share["name"] == "demo" and "shareUrl" not in share
    as_json = ok_json(relay(stack, "share", "site", "--name", "second", "--json"))
    assert as_json["shareUrl"] == as_json["share_url"]
    removed = relay(stack, "unshare", "site", share["id"])
    assert removed.exit_code == 0
    with pytest.raises(urllib.error.HTTPError) as gone:
        urllib.request.urlopen(url + "hello", timeout=10)
    assert gone.value.code == 404
    # Shares need HTTP: a tcp tunnel's share is refused with the API's reason.
    ok_json(relay(stack, "create", f"127.0.0.1:{stack.echo_port}", "--agent", "alpha", "--name", "raw",
                  "--protocol", "tcp", "--json"))
    refused = relay(stack, "share", "raw", "--name", "n")
    assert refused.exit_code == 1 and "invalid_tunnel_protocol" in refused.output
    for name in ("site", "raw"):
        relay(stack, "delete", name)


def test_team_header_with_a_user_jwt(stack):
    import jwt as pyjwt

    token = pyjwt.encode({"sub": "user-1", "exp": int(time.time()) + 300, "teams": [stack.team_id]},
                         JWT_SECRET, algorithm="HS256")
    # Without --team a JWT cannot say which team: the gateway's 400, as one line.
    missing = relay(stack, "list", key=token)
    assert missing.exit_code == 1 and "X-Team-ID" in missing.output
    with_flag = relay(stack, "create", f"127.0.0.1:{stack.echo_port}", "--agent", "alpha", "--name", "jwt-made",
                      "--protocol", "tcp", "--team", stack.team_id, "--json", key=token)
    made = ok_json(with_flag)
    from_env = ok_json(relay(stack, "list", "--json", key=token, team=stack.team_id))
    assert made["id"] in [t["id"] for t in from_env["tunnels"]]
    # The session commands take it too.
    sessions = relay(stack, "list", key=token, team=stack.team_id)
    assert sessions.exit_code == 0
    old = CliRunner().invoke(main, ["tunnel", "list", "--json"], env={
        "RELAY_GATEWAY": stack.url, "RELAY_KEY": token, "RELAY_TEAM_ID": stack.team_id, "RELAY_CA_CERT": None})
    assert old.exit_code == 0 and "tunnels" in json.loads(old.output)
    assert relay(stack, "delete", "jwt-made", key=token, team=stack.team_id).exit_code == 0


def test_the_other_human_and_json_forms(stack):
    made = relay(stack, "create", f"127.0.0.1:{stack.echo_port}", "--agent", "alpha", "--name", "forms",
                 "--protocol", "tcp")
    assert made.exit_code == 0 and made.output.startswith("Created tunnel forms (")
    assert "  protocol     tcp" in made.output and "  hub          127.0.0.1:" in made.output
    assert "paused" in relay(stack, "update", "forms", "--status", "paused").output
    assert relay(stack, "update", "forms", "--status", "active").exit_code == 0
    port = _free_port()
    connected = ok_json(relay(stack, "connect", "forms", "--agent", stack.twin_ids[0], "--local-port", str(port),
                              "--json"))
    assert connected["connection_string"] == f"tcp://127.0.0.1:{port}" and connected["local_port"] == port
    unbound = ok_json(relay(stack, "unbind", "forms", "--agent", stack.twin_ids[0], "--json"))
    assert unbound["unbound"] == stack.twin_ids[0]
    assert ok_json(relay(stack, "bindings", "forms", "--json")) == {"bindings": []}
    assert relay(stack, "shares", "forms").output.strip() == "No shares."
    nothing = relay(stack, "update", "forms")
    assert nothing.exit_code != 0 and "nothing to update" in nothing.output
    tunnel_id = ok_json(relay(stack, "get", "forms", "--json"))["id"]
    assert ok_json(relay(stack, "delete", "forms", "--json")) == {"deleted": tunnel_id}
    # A share made and removed with --json (an https tunnel: seed 002's shares are for both).
    ok_json(relay(stack, "create", "127.0.0.1:8443", "--agent", "alpha", "--name", "secure",
                  "--protocol", "https", "--json"))
    share = ok_json(relay(stack, "share", "secure", "--name", "s", "--json"))
    assert share["shareUrl"].startswith(stack.url + "/s/")
    assert ok_json(relay(stack, "unshare", "secure", share["id"], "--json"))["deleted"] == share["id"]
    assert ok_json(relay(stack, "shares", "secure", "--json")) == {"shares": []}
    assert relay(stack, "delete", "secure").exit_code == 0


def test_session_commands_take_ttl_and_idle_timeout(stack):
    env = {"RELAY_GATEWAY": stack.url, "RELAY_KEY": stack.keys["sk"], "RELAY_CA_CERT": None, "RELAY_TEAM_ID": None}
    opened = CliRunner().invoke(main, ["tunnel", "open", "alpha", "--port", str(stack.echo_port), "--protocol", "tcp",
                                       "--ttl", "600", "--idle-timeout", "30"], env=env, catch_exceptions=False)
    assert opened.exit_code == 0, opened.output
    assert "expires_at   " in opened.output and "idle_timeout 30s" in opened.output
    as_json = CliRunner().invoke(main, ["tunnel", "open", "alpha", "--port", str(stack.echo_port), "--protocol",
                                        "tcp", "--idle-timeout", "0", "--json"], env=env, catch_exceptions=False)
    body = json.loads(as_json.output)
    assert body["idle_timeout"] == 0 and body["expires_at"] is None
    closed = CliRunner().invoke(main, ["tunnel", "close", "alpha", "--json"], env=env, catch_exceptions=False)
    assert len(json.loads(closed.output)["closed"]) == 2
