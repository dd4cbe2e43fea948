"""An async client for OpenAI-compatible chat-completions endpoints (DeepSeek-R1, vLLM, OpenAI...).

Shared by the stages that call LLMs or VLMs over HTTP (qa; caption with image parts). It wraps
`openai.AsyncOpenAI` with the openai library's own retries switched off, because the policy here
must be ours: exponential backoff with jitter that honours `Retry-After`, a total deadline per
attempt (also for streams that trickle), and a concurrency limit that is released while a request
waits to be retried, so one rate-limited request never holds a slot others could use.

Messages are passed through unchanged, so they may hold image parts:
`{"role": "user", "content": [{"type": "text", "text": "..."},
{"type": "image_url", "image_url": {"url": "data:image/jpeg;base64,..."}}]}`.

The API key is given to the client by value (read it with `read_api_key`, from the environment
only); it is scrubbed from every error message the client raises or logs.
"""

from __future__ import annotations

import asyncio
import email.utils
import logging
import os
import random
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any


log = logging.getLogger("lvr.openai_client")

# Statuses worth another attempt: rate limits, overload and transient server errors.
RETRY_STATUSES = frozenset({408, 409, 429, 500, 502, 503, 504})
# Statuses that mean the configuration is wrong (key, permissions, model or URL): every other
# request would fail the same way, so callers should stop rather than record a failure per item.
FATAL_STATUSES = frozenset({401, 403, 404})
# Failures without a status that say nothing about the request itself.
TRANSIENT_KINDS = frozenset({"timeout", "connection", "bad_response", "stream_error"})
# Placeholder for key-less local servers (vLLM's convention); never read OPENAI_API_KEY implicitly.
NO_KEY = "EMPTY"
# A server asking for a longer pause than this is treated as asking for this long.
RETRY_AFTER_CAP_S = 600.0


class MissingAPIKey(ValueError):
    """The environment variable that should hold the API key is not set."""


def read_api_key(env_var: str | None) -> str:
    """The API key from the environment variable named `env_var` (secrets never live in configs)."""
    if not env_var:
        return NO_KEY
    value = os.environ.get(env_var, "").strip()
    if not value:
        raise MissingAPIKey(f"the environment variable {env_var} (which should hold the API key) is not set")
    return value


@dataclass(frozen=True)
class ChatResult:
    """One answered chat completion, reduced to what callers keep."""

    content: str
    reasoning_content: str | None
    finish_reason: str | None
    prompt_tokens: int | None
    completion_tokens: int | None
    reasoning_tokens: int | None
    latency_s: float
    attempts: int
    model: str | None = None

    def raw_text(self) -> str:
        """Everything the model wrote, reasoning included: what a failure row keeps for debugging."""
        if self.reasoning_content:
            return f"<think>\n{self.reasoning_content}\n</think>\n{self.content}"
        return self.content


class ChatRequestError(RuntimeError):
    """A request that got no usable answer, after retries where retrying made sense."""

    def __init__(self, kind: str, message: str, *, status: int | None = None, attempts: int = 1) -> None:
        super().__init__(message)
        self.kind = kind  # timeout, connection, http_<status>, bad_response, stream_error
        self.status = status
        self.attempts = attempts

    @property
    def fatal(self) -> bool:
        return self.status in FATAL_STATUSES

    @property
    def transient(self) -> bool:
        """The endpoint, not the request, failed (down, overloaded, cut off, too slow), even after
        retries: the same request may succeed later, so no verdict on the item must be recorded."""
        return self.status in RETRY_STATUSES or self.kind in TRANSIENT_KINDS


@dataclass(frozen=True)
class _AttemptFailure:
    kind: str
    message: str
    status: int | None
    retryable: bool
    retry_after_s: float | None = None


def parse_retry_after(headers: Mapping[str, str] | None, now: float | None = None) -> float | None:
    """Seconds to wait from `retry-after-ms`, or `Retry-After` given as seconds or an HTTP date."""
    if not headers:
        return None
    millis = headers.get("retry-after-ms")
    if millis:
        try:
            return max(0.0, float(millis) / 1000.0)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    now_dt = datetime.fromtimestamp(now if now is not None else time.time(), timezone.utc)
    return max(0.0, (when - now_dt).total_seconds())


def backoff_delay(retry: int, base_s: float, max_s: float, rng: random.Random) -> float:
    """Exponential backoff with equal jitter: half fixed, half random, so retries spread out."""
    ceiling = min(max_s, base_s * (2**retry))
    return ceiling / 2 + rng.uniform(0, ceiling / 2)


class ChatClient:
    """Chat completions with retries, a concurrency limit and optional streaming.

    Create it inside the event loop that will use it (the HTTP connection pool binds to that loop)
    and close it with `aclose()` or `async with`.
    """

    def __init__(
        self,
        *,
        base_url: str | None,
        api_key: str,
        concurrency: int = 8,
        timeout_s: float = 600.0,
        max_retries: int = 5,
        backoff_s: float = 1.0,
        backoff_max_s: float = 60.0,
        stream: bool = False,
    ) -> None:
        self.base_url = base_url
        self._api_key = api_key
        # Imported here: ~0.6 s, paid only by runs that talk to an endpoint (not by every stage that can).
        import openai

        self._openai = openai.AsyncOpenAI(base_url=base_url, api_key=api_key, max_retries=0, timeout=timeout_s)
        self._slots = asyncio.Semaphore(concurrency)
        self.concurrency = concurrency
        self.timeout_s = timeout_s
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self.backoff_max_s = backoff_max_s
        self.stream = stream
        self._rng = random.Random()

    def __repr__(self) -> str:  # never the key
        return f"ChatClient(base_url={self.base_url!r}, concurrency={self.concurrency}, stream={self.stream})"

    async def __aenter__(self) -> "ChatClient":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._openai.close()

    def _scrub(self, text: str) -> str:
        if self._api_key and self._api_key != NO_KEY and len(self._api_key) >= 4:
            return text.replace(self._api_key, "***")
        return text

    async def complete(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        model: str,
        temperature: float | None = None,
        max_tokens: int | None = None,
        stream: bool | None = None,
        extra_body: Mapping[str, Any] | None = None,
    ) -> ChatResult:
        """One chat completion; raises `ChatRequestError` when no attempt got an answer."""
        params: dict[str, Any] = {"model": model, "messages": list(messages)}
        if temperature is not None:
            params["temperature"] = temperature
        if max_tokens is not None:
            params["max_tokens"] = max_tokens
        if extra_body:
            params["extra_body"] = dict(extra_body)
        use_stream = self.stream if stream is None else stream
        started = time.perf_counter()
        retry = 0
        while True:
            async with self._slots:
                try:
                    async with asyncio.timeout(self.timeout_s):
                        if use_stream:
                            result = await self._streamed(params)
                        else:
                            result = await self._plain(params)
                except Exception as exc:  # classified below: every transport error is retried or raised typed
                    failure = self._classify(exc)
                else:
                    return ChatResult(**{**result, "latency_s": time.perf_counter() - started, "attempts": retry + 1})
            if not failure.retryable or retry >= self.max_retries:
                raise ChatRequestError(failure.kind, failure.message, status=failure.status, attempts=retry + 1)
            delay = backoff_delay(retry, self.backoff_s, self.backoff_max_s, self._rng)
            if failure.retry_after_s is not None:
                delay = min(failure.retry_after_s, RETRY_AFTER_CAP_S)
            log.warning("chat request to %s: %s; retry %d/%d in %.2fs", self.base_url, failure.message, retry + 1, self.max_retries, delay)
            retry += 1
            await asyncio.sleep(delay)

    async def _plain(self, params: dict[str, Any]) -> dict[str, Any]:
        response = await self._openai.chat.completions.create(**params)
        if not response.choices:
            raise _BadResponse("the response has no choices")
        choice = response.choices[0]
        message = choice.message
        return {
            "content": message.content or "",
            "reasoning_content": _reasoning_of(message),
            "finish_reason": choice.finish_reason,
            "model": response.model,
            **_usage(response.usage),
        }

    async def _streamed(self, params: dict[str, Any]) -> dict[str, Any]:
        stream = await self._openai.chat.completions.create(**params, stream=True, stream_options={"include_usage": True})
        content: list[str] = []
        reasoning: list[str] = []
        finish_reason = None
        usage = None
        model = None
        async with stream:
            async for chunk in stream:
                model = chunk.model or model
                if chunk.usage is not None:
                    usage = chunk.usage
                for choice in chunk.choices:
                    if choice.index != 0:
                        continue
                    if choice.delta.content:
                        content.append(choice.delta.content)
                    piece = _reasoning_of(choice.delta)
                    if piece:
                        reasoning.append(piece)
                    if choice.finish_reason:
                        finish_reason = choice.finish_reason
        if finish_reason is None:
            raise _BadResponse("the stream ended without a finish reason")
        return {
            "content": "".join(content),
            "reasoning_content": "".join(reasoning) or None,
            "finish_reason": finish_reason,
            "model": model,
            **_usage(usage),
        }

    def _classify(self, exc: Exception) -> _AttemptFailure:
        import openai  # loaded by __init__ already

        if isinstance(exc, (TimeoutError, openai.APITimeoutError)):
            return _AttemptFailure("timeout", f"no answer within {self.timeout_s:g}s", None, True)
        if isinstance(exc, openai.APIStatusError):
            status = exc.status_code
            retry_after = parse_retry_after(exc.response.headers) if status in (429, 503) else None
            message = self._scrub(f"HTTP {status}: {exc.message}")
            return _AttemptFailure(f"http_{status}", message, status, status in RETRY_STATUSES, retry_after)
        if isinstance(exc, openai.APIConnectionError):
            # openai says only "Connection error."; the transport's reason tells a refused connection
            # from a stream cut mid-answer ("incomplete chunked read").
            cause = f" ({type(exc.__cause__).__name__}: {exc.__cause__})" if exc.__cause__ else ""
            return _AttemptFailure("connection", self._scrub(f"connection error: {exc}{cause}"), None, True)
        if isinstance(exc, (_BadResponse, openai.APIResponseValidationError)):
            return _AttemptFailure("bad_response", self._scrub(f"unusable response: {exc}"), None, True)
        if isinstance(exc, openai.APIError):
            # An error event inside a 200 stream: the server gave up mid-answer (vLLM does this when
            # generation fails); its status codes there are not reliable, so it is always retried.
            return _AttemptFailure("stream_error", self._scrub(f"the stream ended with an error: {exc.message}"), None, True)
        raise exc  # a programming error, not a transport problem: let it surface


class _BadResponse(Exception):
    """A 200 answer that carries no completion (no choices, a stream cut before its end)."""


def _reasoning_of(obj: Any) -> str | None:
    # DeepSeek's API says `reasoning_content`; some vLLM versions say `reasoning`.
    for name in ("reasoning_content", "reasoning"):
        value = getattr(obj, name, None)
        if isinstance(value, str) and value:
            return value
    return None


def _usage(usage: Any) -> dict[str, int | None]:
    if usage is None:
        return {"prompt_tokens": None, "completion_tokens": None, "reasoning_tokens": None}
    details = getattr(usage, "completion_tokens_details", None)
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "reasoning_tokens": getattr(details, "reasoning_tokens", None) if details is not None else None,
    }
