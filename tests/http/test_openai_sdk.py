"""The real OpenAI Python SDK through the transparent proxy (seed 003's "OpenAI-SDK pivot").

``base_url`` is ``{gateway}/api/v1/r/containers/{slug}/v1`` and ``api_key`` is the team's
sk- key (the SDK sends it as ``Authorization: Bearer``, which is exactly the gateway
credential). Behind an in-process agent: :class:`tests.support.openai_server.OpenAIServer`.
"""
from __future__ import annotations

import time

import pytest

from tests.gateway.test_gateway_e2e import gateway_and_team, run
from tests.http.test_invoke import fast_probes, serving_agent, wait_status
from tests.support.openai_server import OpenAIServer

openai = pytest.importorskip("openai")

pytestmark = pytest.mark.timeout(120)

CHUNKS = 5
DELAY = 0.3


def test_openai_sdk_chat_and_streamed_chat(tmp_path) -> None:
    async def body() -> None:
        async with gateway_and_team(tmp_path) as (gw, keys):
            fast_probes(gw)
            app = await OpenAIServer("llm", chunks=CHUNKS, delay=DELAY).start()
            try:
                async with serving_agent(gw, keys["ak"], "gpu-box", f"my-llm=127.0.0.1:{app.port}"):
                    await wait_status(gw, keys["sk"], "my-llm", "running")
                    client = openai.AsyncOpenAI(base_url=f"{gw.url}/api/v1/r/containers/my-llm/v1",
                                                api_key=keys["sk"], max_retries=0, timeout=30)
                    models = await client.models.list()
                    assert [m.id for m in models.data] == ["relay-test"]

                    reply = await client.chat.completions.create(
                        model="relay-test", messages=[{"role": "user", "content": "hi"}])
                    assert reply.choices[0].message.content == "echo: hi"

                    stream = await client.chat.completions.create(
                        model="relay-test", messages=[{"role": "user", "content": "count"}], stream=True)
                    arrivals: list[float] = []
                    sent: list[float] = []
                    words = []
                    async for chunk in stream:
                        arrivals.append(time.time())
                        sent.append(chunk.model_extra["server_time"])
                        words.append(chunk.choices[0].delta.content)
                    await client.close()
            finally:
                await app.close()
            assert words == [f"w{i} " for i in range(CHUNKS)]
            assert sent == app.sent_at
            # Not held back: the first chunk was in the client's hands long before the
            # server sent the last one (it sent them DELAY apart).
            assert arrivals[0] < sent[-1] - DELAY, (arrivals, sent)
            # Client-side gaps track the server's send gaps. Loose on purpose (a loaded
            # machine may delay one chunk): most gaps, and the span as a whole.
            gaps = [(sent[i] - sent[i - 1], arrivals[i] - arrivals[i - 1]) for i in range(1, CHUNKS)]
            assert all(send_gap >= DELAY * 0.9 for send_gap, _ in gaps)
            assert sum(arrival_gap > DELAY * 0.4 for _, arrival_gap in gaps) >= len(gaps) - 1, (arrivals, sent)
            assert arrivals[-1] - arrivals[0] > (sent[-1] - sent[0]) * 0.5, (arrivals, sent)
            # Mostly, a chunk was in the client's hands before the server sent the next one.
            assert sum(arrivals[i] < sent[i + 1] for i in range(CHUNKS - 1)) >= CHUNKS - 2, (arrivals, sent)

    run(body)
