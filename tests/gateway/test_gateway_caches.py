"""In-memory caches of the service proxy and invoke path (issue 5): credentials, JWT
claims, service rows and the agent scan are not re-read per request, yet a revoked key,
a deleted service or an expired JWT stops working on the very next request.

Real gateway, real sockets on 127.0.0.1; the revocation is done by ``relay admin`` in
another process (a separate database connection, as in production). The first two
tests run on both store backends (SQLite, and PostgreSQL, where what another process
commits is seen through the change notifications).
"""
from __future__ import annotations

import asyncio
import base64
import subprocess
import sys
import time

import pytest

from relay.gateway.store import open_store
from tests.gateway.test_gateway_e2e import first_team_id, gateway_and_team, http, run
from tests.http.test_invoke import invoke
from tests.support.openai_server import OpenAIServer

pytestmark = pytest.mark.timeout(120)


async def keep_alive_get(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, path: str,
                         token: str) -> tuple[int, bytes]:
    """One GET on an open keep-alive connection; returns (status, body)."""
    writer.write((f"GET {path} HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {token}\r\n\r\n").encode())
    async with asyncio.timeout(10):
        head = await reader.readuntil(b"\r\n\r\n")
        length = 0
        for line in head.decode("latin-1").split("\r\n")[1:]:
            name, _, value = line.partition(":")
            if name.strip().lower() == "content-length":
                length = int(value)
        body = await reader.readexactly(length)
    return int(head.split(b" ", 2)[1]), body


async def external(gw, sk: str, slug: str, app: OpenAIServer) -> None:
    """Create the external service ``slug``, then wait until the store's generation
    holds still: with PostgreSQL the notification of that very commit arrives a moment
    after it and empties the caches, and a request served in between would read its
    credential twice (the reads counted below are the caches' own)."""
    status, svc = await http(gw.port, "POST", "/api/v1/r/containers", sk,
                             {"service_slug": slug, "url": app.url + "/echo"})
    assert status == 201 and svc["service_status"] == "running", svc
    last, still = gw.store.generation(), 0
    for _ in range(200):  # still for 0.25 s in a row (bounded: 10 s)
        await asyncio.sleep(0.05)
        now = gw.store.generation()
        still = still + 1 if now == last else 0
        if still == 5:
            return
        last = now


def test_credential_cached_and_revocation_by_another_process_is_seen_at_once(tmp_path, store_url) -> None:
    async def body() -> None:
        async with gateway_and_team(tmp_path, store_url) as (gw, keys):
            app = await OpenAIServer("ext").start()
            try:
                await external(gw, keys["sk"], "ext-a", app)
                # Count the store's credential reads: the cache must make them rare.
                reads = []
                real_lookup = gw.store.lookup_credential
                gw.store.lookup_credential = lambda token: reads.append(1) or real_lookup(token)
                reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
                try:
                    for i in range(5):
                        status, _ = await keep_alive_get(reader, writer, f"/api/v1/r/containers/ext-a/{i}",
                                                         keys["dk"])
                        assert status == 200
                        status, out = await invoke(gw, keys["dk"], "ext-a", method="GET", path=f"/{i}")
                        assert status == 200 and out["status_code"] == 200
                    assert len(reads) == 1, reads  # ten authentications, one database read
                    # `relay admin key revoke` in another process: its own database connection.
                    team_id = await first_team_id(gw)
                    done = await asyncio.to_thread(
                        subprocess.run, [sys.executable, "-m", "relay", "admin", "--store", store_url,
                                         "key", "revoke", "--team", team_id, keys["dk"]],
                        capture_output=True, text=True, timeout=60)
                    assert done.returncode == 0, done.stderr
                    assert keys["dk"] not in done.stdout + done.stderr  # the key is never echoed
                    # The very next request on the same keep-alive connection is refused, or
                    # the connection is already gone: the revocation watcher cuts what the key
                    # opened (relay.gateway.agents.revocation) within its next poll.
                    try:
                        status, payload = await keep_alive_get(reader, writer, "/api/v1/r/containers/ext-a/x",
                                                               keys["dk"])
                    except (ConnectionError, RuntimeError, asyncio.IncompleteReadError):
                        pass  # cut: a reset, or the transport already closed under us
                    else:
                        assert status == 401 and b"invalid_credentials" in payload, payload
                finally:
                    writer.close()
                assert (await invoke(gw, keys["dk"], "ext-a", method="GET", path="/"))[0] == 401
                assert (await invoke(gw, keys["sk"], "ext-a", method="GET", path="/"))[0] == 200
            finally:
                await app.close()

    run(body)


def test_deleted_service_stops_at_once_and_rows_are_cached(tmp_path, store_url) -> None:
    async def body() -> None:
        async with gateway_and_team(tmp_path, store_url) as (gw, keys):
            app = await OpenAIServer("ext").start()
            try:
                await external(gw, keys["sk"], "ext-b", app)
                reads = []
                real_get = gw.store.get_service
                gw.store.get_service = lambda *a: reads.append(a) or real_get(*a)
                reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
                try:
                    for i in range(4):
                        assert (await keep_alive_get(reader, writer, f"/api/v1/r/containers/ext-b/{i}",
                                                     keys["sk"]))[0] == 200
                        status, out = await invoke(gw, keys["sk"], "ext-b", method="POST", path="/p",
                                                   body_base64=base64.b64encode(b"x").decode())
                        assert status == 200 and base64.b64decode(out["body_base64"]) == b"x"
                    assert len(reads) <= 1, reads
                    assert (await http(gw.port, "DELETE", "/api/v1/r/containers/ext-b", keys["sk"]))[0] == 204
                    # The delete cut the service's live proxy connections ...
                    with pytest.raises(asyncio.IncompleteReadError):
                        await keep_alive_get(reader, writer, "/api/v1/r/containers/ext-b/y", keys["sk"])
                finally:
                    writer.close()
                # ... and a new one gets the 404 of an unknown slug.
                status, out = await http(gw.port, "GET", "/api/v1/r/containers/ext-b/y", keys["sk"])
                assert status == 404 and out["error"]["code"] == "service_not_found"
                status, out = await invoke(gw, keys["sk"], "ext-b", method="GET", path="/")
                assert status == 404 and out["error"]["code"] == "service_not_found"
                # A row written by another connection (a second store on the same database)
                # is seen too: the cache holds nothing stale for a slug re-created elsewhere.
                other = await open_store(store_url, listen=False)
                try:
                    team_id = await first_team_id(gw)
                    generation = gw.store.generation()
                    await other.put_service(team_id, "ext-b", "external",
                                            {"url": app.url + "/echo/again", "exposed_port": app.port, "labels": []},
                                            "created")
                finally:
                    await other.close()
                for _ in range(200):  # PostgreSQL: until the commit's notification arrived
                    if gw.store.generation() != generation:
                        break
                    await asyncio.sleep(0.01)
                status, out = await invoke(gw, keys["sk"], "ext-b", method="GET", path="/z")
                assert status == 200 and out["headers"]["x-echo-target"] == "/echo/again/z", out
            finally:
                await app.close()

    run(body)


def test_cached_jwt_is_refused_once_expired(tmp_path) -> None:
    import jwt as pyjwt

    secret = "k" * 32

    async def body() -> None:
        async with gateway_and_team(tmp_path, jwt_key=secret) as (gw, keys):
            app = await OpenAIServer("ext").start()
            try:
                await external(gw, keys["sk"], "ext-c", app)
                team_id = await first_team_id(gw)
                exp = int(time.time()) + 2
                token = pyjwt.encode({"sub": "u1", "exp": exp, "teams": [team_id]}, secret, algorithm="HS256")
                mine = {"X-Team-ID": team_id}
                decodes = []
                real_decode = gw.auth._decode_jwt
                gw.auth._decode_jwt = lambda t: decodes.append(1) or real_decode(t)
                for _ in range(3):
                    status, out = await http(gw.port, "POST", "/api/v1/r/invoke/ext-c", token,
                                             {"method": "GET", "path": "/"}, headers=mine)
                    assert status == 200, out
                assert len(decodes) == 1
                # Cached claims still check membership per request: another team is 403.
                other, _ = await gw.store.create_team_with_keys("team-b")
                status, out = await http(gw.port, "POST", "/api/v1/r/invoke/ext-c", token,
                                         {"method": "GET", "path": "/"}, headers={"X-Team-ID": other.id})
                assert status == 403 and out["error"]["code"] == "not_a_member"
                for _ in range(100):  # bounded: until just past exp
                    if time.time() >= exp + 0.05:
                        break
                    await asyncio.sleep(0.05)
                status, out = await http(gw.port, "POST", "/api/v1/r/invoke/ext-c", token,
                                         {"method": "GET", "path": "/"}, headers=mine)
                assert status == 401 and out["error"]["code"] == "token_expired", out
            finally:
                await app.close()

    run(body)
