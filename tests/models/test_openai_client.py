"""The shared OpenAI-compatible client against the real test server: retries, limits, streaming, secrets."""

from __future__ import annotations

import asyncio
import base64
import logging
import random
import time

import pytest

from models.openai_client import (
    ChatClient,
    ChatRequestError,
    MissingAPIKey,
    backoff_delay,
    parse_retry_after,
    read_api_key,
)
from tests.support.openai_server import Fault, OpenAITestServer, Reply

KEY = "sk-test-client-0123456789"
MSG = [{"role": "user", "content": "hello"}]


def complete(server: OpenAITestServer, messages=MSG, **client_kw):
    async def go():
        async with ChatClient(base_url=server.base_url, api_key=KEY, **{"backoff_s": 0.01, "timeout_s": 5.0, **client_kw}) as client:
            return await client.complete(messages, model="r1", temperature=0.6, max_tokens=64)

    return asyncio.run(go())


@pytest.fixture(scope="module")
def server():
    replies = lambda info: Reply("The answer.", reasoning_content="Thinking it over.", reasoning_tokens=7)  # noqa: E731
    with OpenAITestServer(replies, api_key=KEY) as srv:
        yield srv


@pytest.fixture
def fresh(server):
    server.faults = None
    server.latency_s = 0.0
    server.reset_counters()
    return server


@pytest.mark.parametrize("stream", [False, True])
def test_answer_reasoning_and_usage(fresh, stream):
    result = complete(fresh, stream=stream)
    assert result.content == "The answer." and result.reasoning_content == "Thinking it over."
    assert result.finish_reason == "stop" and result.attempts == 1
    assert result.prompt_tokens > 0 and result.completion_tokens > 7 and result.reasoning_tokens == 7
    body = fresh.requests[0].body
    assert body["temperature"] == 0.6 and body["max_tokens"] == 64 and body["model"] == "r1"
    assert bool(body.get("stream")) is stream
    if stream:
        assert body["stream_options"] == {"include_usage": True}
    assert fresh.requests[0].headers["authorization"] == f"Bearer {KEY}"


def test_image_parts_pass_through(fresh):
    jpeg = "data:image/jpeg;base64," + base64.b64encode(b"\xff\xd8\xff fake jpeg").decode()
    messages = [{"role": "user", "content": [{"type": "text", "text": "Describe."}, {"type": "image_url", "image_url": {"url": jpeg}}]}]
    complete(fresh, messages)
    assert fresh.requests[0].body["messages"] == messages


@pytest.mark.parametrize("stream", [False, True])
def test_transient_faults_are_retried(fresh, stream):
    plan = {0: Fault.server_error(500), 1: Fault.server_error(502), 2: Fault.server_error(503), 3: Fault.server_error(504)}
    fresh.faults = lambda info: plan.get(info.attempt)
    result = complete(fresh, stream=stream)
    assert result.attempts == 5 and result.content == "The answer."
    assert [s for _, s in fresh.responses] == [500, 502, 503, 504, 200]


def test_retry_after_is_honoured(fresh):
    fresh.faults = lambda info: Fault.rate_limited(0.4) if info.attempt == 0 else None
    complete(fresh)
    first, second = fresh.requests
    assert second.received_at - first.received_at >= 0.4  # not the 0.01 s backoff


def test_timeout_is_retried_and_the_server_sees_the_client_give_up(fresh):
    fresh.faults = lambda info: Fault.hang(10) if info.attempt == 0 else None
    started = time.perf_counter()
    result = complete(fresh, timeout_s=1.0)
    assert result.attempts == 2 and time.perf_counter() - started < 5
    # The server notices the disconnect on its own loop, which may come after the retry's answer.
    deadline = time.monotonic() + 5
    while fresh.statuses()[499] < 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert fresh.statuses()[499] == 1


def test_a_stream_cut_mid_body_is_retried(fresh):
    # The first attempt's connection drops after the role and two reasoning chunks: a partial answer.
    fresh.faults = lambda info: Fault.cut_stream(after_chunks=3) if info.attempt == 0 else None
    result = complete(fresh, stream=True)
    assert result.attempts == 2
    assert result.content == "The answer." and result.reasoning_content == "Thinking it over." and result.finish_reason == "stop"
    assert [s for _, s in fresh.responses] == [0, 200]


def test_a_stream_ended_by_an_error_event_is_retried(fresh):
    # What vLLM sends when generation fails mid-answer: an error event, then [DONE].
    fresh.faults = lambda info: Fault.cut_stream(after_chunks=2, error="engine died") if info.attempt == 0 else None
    result = complete(fresh, stream=True)
    assert result.attempts == 2 and result.content == "The answer." and result.reasoning_content == "Thinking it over."
    assert [s for _, s in fresh.responses] == [0, 200]


def test_streams_cut_every_time_end_in_a_typed_error_that_says_why(fresh):
    fresh.faults = lambda info: Fault.cut_stream(after_chunks=1)
    with pytest.raises(ChatRequestError) as exc:
        complete(fresh, stream=True, max_retries=1)
    assert exc.value.kind == "connection" and exc.value.attempts == 2 and not exc.value.fatal
    assert "incomplete" in str(exc.value) and fresh.total_requests == 2  # the transport's reason, not just "Connection error."
    fresh.faults = lambda info: Fault.cut_stream(after_chunks=1, error="engine died")
    with pytest.raises(ChatRequestError) as exc:
        complete(fresh, stream=True, max_retries=1)
    assert exc.value.kind == "stream_error" and exc.value.attempts == 2 and "engine died" in str(exc.value)


@pytest.mark.parametrize("status, fatal", [(400, False), (401, True), (403, True), (404, True), (422, False)])
def test_client_errors_are_not_retried(fresh, status, fatal):
    fresh.faults = lambda info: Fault.server_error(status)
    with pytest.raises(ChatRequestError) as exc:
        complete(fresh)
    assert exc.value.status == status and exc.value.kind == f"http_{status}" and exc.value.attempts == 1
    assert exc.value.fatal is fatal and fresh.total_requests == 1


def test_retries_run_out(fresh):
    fresh.faults = lambda info: Fault.server_error(500)
    with pytest.raises(ChatRequestError) as exc:
        complete(fresh, max_retries=2)
    assert exc.value.attempts == 3 and fresh.total_requests == 3 and not exc.value.fatal


def test_connection_refused_is_a_typed_error():
    async def go():
        async with ChatClient(base_url="http://127.0.0.1:9/v1", api_key=KEY, max_retries=1, backoff_s=0.01) as client:
            await client.complete(MSG, model="r1")

    with pytest.raises(ChatRequestError) as exc:
        asyncio.run(go())
    assert exc.value.kind == "connection" and exc.value.attempts == 2


def test_key_never_in_errors_or_logs(fresh, caplog):
    caplog.set_level(logging.DEBUG)
    fresh.faults = lambda info: Fault(status=401, message=f"Incorrect API key provided: {KEY}")
    with pytest.raises(ChatRequestError) as exc:
        complete(fresh)
    fresh.faults = lambda info: Fault(status=500, message=f"upstream said {KEY}") if info.attempt == 0 else None
    complete(fresh, [{"role": "user", "content": "retried"}])
    assert KEY not in str(exc.value) and "***" in str(exc.value)
    assert KEY not in caplog.text, [l for l in caplog.text.splitlines() if KEY in l]
    assert "retry 1/" in caplog.text
    assert KEY not in repr(ChatClient(base_url=fresh.base_url, api_key=KEY))


def test_concurrency_limit_holds_and_is_used(fresh):
    fresh.latency_s = 0.05

    async def go():
        async with ChatClient(base_url=fresh.base_url, api_key=KEY, concurrency=3) as client:
            await asyncio.gather(*(client.complete([{"role": "user", "content": str(i)}], model="r1") for i in range(12)))

    asyncio.run(go())
    assert fresh.total_requests == 12 and fresh.max_in_flight == 3


def test_retry_after_parsing():
    assert parse_retry_after({"retry-after": "2"}) == 2.0
    assert parse_retry_after({"retry-after": "0.5"}) == 0.5
    assert parse_retry_after({"retry-after-ms": "1500", "retry-after": "9"}) == 1.5
    assert parse_retry_after({"retry-after": "Wed, 21 Oct 2015 07:28:10 GMT"}, now=1445412480.0) == pytest.approx(10.0)
    assert parse_retry_after({"retry-after": "soon"}) is None and parse_retry_after({}) is None


def test_backoff_grows_with_jitter_and_a_ceiling():
    rng = random.Random(0)
    delays = [backoff_delay(n, 1.0, 8.0, rng) for n in range(6)]
    for n, d in enumerate(delays):
        ceiling = min(8.0, 2.0**n)
        assert ceiling / 2 <= d <= ceiling


def test_api_key_only_from_the_environment(monkeypatch):
    monkeypatch.setenv("LVR_TEST_SOME_KEY", " sk-abc ")
    assert read_api_key("LVR_TEST_SOME_KEY") == "sk-abc"
    monkeypatch.delenv("LVR_TEST_SOME_KEY")
    with pytest.raises(MissingAPIKey, match="LVR_TEST_SOME_KEY"):
        read_api_key("LVR_TEST_SOME_KEY")
    monkeypatch.setenv("OPENAI_API_KEY", "sk-must-not-be-used")
    assert read_api_key(None) == "EMPTY"
