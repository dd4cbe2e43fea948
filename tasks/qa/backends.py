"""Where QA answers come from: an OpenAI-compatible reasoning LLM (cached), or the offline template.

Both backends answer the same two questions, so the stage treats them alike: `generate` (write QA
items about a window of a video, in a category and question type) and `refine` (rewrite an item's reasoning).
Both return raw model text, which the stage parses and validates the same way.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any, Protocol

from models.openai_client import (
    ChatClient,
    ChatRequestError,
    ChatResult,
    MissingAPIKey,
    read_api_key,
)
from tasks.config import QAConfig
from tasks.engine.stage import StageError
from tasks.qa import template
from tasks.qa.cache import AnswerCache, request_key
from tasks.qa.captions import Window
from tasks.qa.parser import ParsedItem
from tasks.qa.prompts import PromptSet, generation_prompt, refine_prompt
from tasks.qa.refine import display_answer

GENERATE = "generate"
REFINE = "refine"


@dataclass(frozen=True)
class Answer:
    result: ChatResult
    prompt_version: str
    key: str | None = None  # the cache key of an LLM request


@dataclass
class BackendStats:
    sent: dict[str, int] = field(default_factory=lambda: {GENERATE: 0, REFINE: 0})
    cached: dict[str, int] = field(default_factory=lambda: {GENERATE: 0, REFINE: 0})
    failed: int = 0


class Backend(Protocol):
    generator_model: str
    refiner_model: str
    stats: BackendStats

    async def generate(self, window: Window, category: str, question_type: str, n_questions: int) -> Answer | None:
        """The raw answer about one window of a video; None when this backend cannot form such a question there."""

    async def refine(self, item: ParsedItem) -> Answer: ...

    async def aclose(self) -> None: ...


class TemplateBackend:
    """Deterministic, offline: answers rendered by `tasks.qa.template` (see there)."""

    generator_model = template.GENERATOR_MODEL
    refiner_model = template.REFINER_MODEL

    def __init__(self) -> None:
        self.stats = BackendStats()

    async def generate(self, window: Window, category: str, question_type: str, n_questions: int) -> Answer | None:
        drafts = template.draft_questions(window.video, category, question_type, n_questions, range(window.first, window.stop))
        if not drafts:
            return None
        return Answer(_local_result(template.render_answer(drafts), self.generator_model), template.PROMPT_VERSION)

    async def refine(self, item: ParsedItem) -> Answer:
        return Answer(_local_result(template.rewrite_reasoning(item.reasoning), self.refiner_model), template.PROMPT_VERSION)

    async def aclose(self) -> None:
        pass


def _local_result(content: str, model: str) -> ChatResult:
    return ChatResult(content, None, "stop", None, None, None, latency_s=0.0, attempts=0, model=model)


@dataclass(frozen=True)
class _Endpoint:
    base_url: str | None
    api_key_env: str | None


class LLMBackend:
    """DeepSeek-R1 (or any OpenAI-compatible model) behind the on-disk answer cache.

    Clients are opened on the first request the cache cannot answer, so a fully cached rerun needs
    neither the network nor the API key. Generation and refinement share one client (one
    concurrency limit) when they use the same endpoint and key. Identical requests made while one
    is in flight wait for it instead of being sent again.
    """

    def __init__(self, cfg: QAConfig, cache: AnswerCache) -> None:
        self.cfg = cfg
        self.cache = cache
        self.generator_model = cfg.model
        self.refiner_model = cfg.refine_model or cfg.model
        self.generate_prompts = PromptSet(GENERATE, cfg.prompt_version)
        self.refine_prompts = PromptSet(REFINE, cfg.refine_prompt_version)
        self.params: dict[str, Any] = {"temperature": cfg.temperature, "max_tokens": cfg.max_tokens}
        self._endpoints = {
            GENERATE: _Endpoint(cfg.base_url, cfg.api_key_env),
            REFINE: _Endpoint(cfg.refine_base_url or cfg.base_url, cfg.refine_api_key_env or cfg.api_key_env),
        }
        self._clients: dict[_Endpoint, ChatClient] = {}
        self._pending: dict[str, asyncio.Future[ChatResult]] = {}
        self.stats = BackendStats()

    async def generate(self, window: Window, category: str, question_type: str, n_questions: int) -> Answer:
        prompt = generation_prompt(self.generate_prompts, window, category, question_type, n_questions)
        return await self._ask(GENERATE, prompt.messages, self.generator_model, prompt.version)

    async def refine(self, item: ParsedItem) -> Answer:
        prompt = refine_prompt(self.refine_prompts, item.question, list(item.options) if item.options else None, display_answer(item), item.reasoning)
        return await self._ask(REFINE, prompt.messages, self.refiner_model, prompt.version)

    async def _ask(self, kind: str, messages: list[dict[str, Any]], model: str, prompt_version: str) -> Answer:
        key = request_key(messages, model, self.params)
        pending = self._pending.get(key)
        if pending is None:
            pending = self._pending[key] = asyncio.ensure_future(self._answer(kind, key, messages, model, prompt_version))
        return Answer(await pending, prompt_version, key)

    async def _answer(self, kind: str, key: str, messages: list[dict[str, Any]], model: str, prompt_version: str) -> ChatResult:
        hit = await asyncio.to_thread(self.cache.get, kind, key)
        if hit is not None:
            self.stats.cached[kind] += 1
            return hit
        client = self._client(self._endpoints[kind])
        self.stats.sent[kind] += 1
        try:
            result = await client.complete(messages, model=model, **self.params)
        except ChatRequestError as exc:
            self.stats.failed += 1
            if exc.fatal:
                endpoint = self._endpoints[kind]
                raise StageError(
                    f"qa: {endpoint.base_url or 'the OpenAI API'} refused the {kind} request ({exc}); every request would fail "
                    f"the same way. Check qa.base_url, the model name {model!r} and the key in ${endpoint.api_key_env or '(none set)'}."
                ) from None
            raise
        meta = {"model": model, "params": self.params, "prompt_version": prompt_version}
        await asyncio.to_thread(self.cache.put, kind, key, result, meta)
        return result

    def _client(self, endpoint: _Endpoint) -> ChatClient:
        client = self._clients.get(endpoint)
        if client is None:
            try:
                api_key = read_api_key(endpoint.api_key_env)
            except MissingAPIKey as exc:
                raise StageError(f"qa: {exc}; export it, or set qa.api_key_env to the variable that holds the key") from None
            client = ChatClient(
                base_url=endpoint.base_url,
                api_key=api_key,
                concurrency=self.cfg.concurrency,
                timeout_s=self.cfg.timeout_s,
                max_retries=self.cfg.max_retries,
                backoff_s=self.cfg.backoff_s,
                backoff_max_s=self.cfg.backoff_max_s,
                stream=self.cfg.stream,
            )
            self._clients[endpoint] = client
        return client

    async def aclose(self) -> None:
        for pending in self._pending.values():  # left running only when the shard is being aborted
            pending.cancel()
        await asyncio.gather(*self._pending.values(), return_exceptions=True)
        for client in self._clients.values():
            await client.aclose()
        self._clients.clear()


def make_backend(cfg: QAConfig, cache: AnswerCache) -> Backend:
    return TemplateBackend() if cfg.backend == "template" else LLMBackend(cfg, cache)
