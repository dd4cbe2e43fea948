"""The LLM judge for open-ended answers: an LLM on an OpenAI-compatible endpoint (the `judge:`
section) decides the answers that normalised matching (`tasks.grading.answers`) called wrong. Each
distinct prediction of an item is asked once.

Filter, GRPO and eval use it alike: `judge_all` grades, `judge_identity` enters their fingerprints,
and a failure is never replaced by the exact-match verdict. In filter and eval `judge_failure` turns
an item's failure into a failure row (a refused request: `request`; an unreadable verdict: `output`)
or stops the shard (the endpoint unreachable after retries: a rerun judges) or the stage (the endpoint
refuses us: every item would fail alike), and `check_judge_reached` stops a stage in which no request
to the judge succeeded. GRPO leaves a group with an unknown verdict out of the step instead.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

from data_schemas import OUTPUT_FAULT, REQUEST_FAULT
from models.openai_client import (
    ChatClient,
    ChatRequestError,
    MissingAPIKey,
    read_api_key,
)
from tasks.config import JudgeConfig
from tasks.engine.stage import StageError
from tasks.engine.store import Failure, stable_hash
from tasks.grading.answers import AnswerKey, Grade, after_thinking, normalize_answer
from tasks.grading.prompts import OPEN_ENDED

JUDGE_SYSTEM = (
    "You grade short answers to questions about a video. You are given the question, the reference answer and a "
    "candidate answer. The candidate is correct when it means the same as the reference (wording, word order and "
    "extra harmless detail do not matter; a different or partial fact does)."
)
JUDGE_USER = "Question: {question}\nReference answer: {reference}\nCandidate answer: {candidate}\n\nIs the candidate answer correct? Reply with one word: yes or no."
_VERDICT = re.compile(r"\b(yes|no)\b", re.IGNORECASE)


class JudgeError(RuntimeError):
    """The judge's reply says neither yes nor no."""


def parse_verdict(reply: str) -> bool:
    """yes/no from a judge's reply: its first word, else the last yes/no it wrote after any thinking."""
    text = after_thinking(reply)
    words = normalize_answer(text).split()
    if words and words[0] in ("yes", "no"):
        return words[0] == "yes"
    verdicts = _VERDICT.findall(text)
    if not verdicts:
        raise JudgeError(f"the judge answered neither yes nor no: {reply[:200]!r}")
    return verdicts[-1].lower() == "yes"


@dataclass
class LLMJudge:
    """An LLM on an OpenAI-compatible endpoint deciding whether an open-ended answer is right.

    `client` is a `models.openai_client.ChatClient` (retries, concurrency limit, timeouts)."""

    client: Any
    model: str
    max_tokens: int | None = None

    async def __call__(self, question: str, reference: str, candidate: str) -> bool:
        messages = [
            {"role": "system", "content": JUDGE_SYSTEM},
            {"role": "user", "content": JUDGE_USER.format(question=question, reference=reference, candidate=candidate)},
        ]
        result = await self.client.complete(messages, model=self.model, temperature=0.0, max_tokens=self.max_tokens)
        return parse_verdict(result.content)


async def judge_grades(judge: LLMJudge, key: AnswerKey, grades: Sequence[Grade]) -> list[Grade]:
    """Grades with the open-ended misses decided by the judge; each distinct prediction asked once.
    Raises what the judge raises (`ChatRequestError`, `JudgeError`)."""
    if key.question_type != OPEN_ENDED:
        return list(grades)
    candidates: dict[str, str] = {}  # normalised prediction -> one way it was written
    for g in grades:
        normal = normalize_answer(g.predicted or "")
        if not g.correct and normal:
            candidates.setdefault(normal, g.predicted or "")
    verdicts = await asyncio.gather(*(judge(key.question, key.answer, text) for text in candidates.values()))
    decided = dict(zip(candidates, verdicts))
    out = []
    for g in grades:
        normal = normalize_answer(g.predicted or "")
        out.append(replace(g, correct=decided[normal], method="judge") if not g.correct and normal in decided else g)
    return out


def judge_identity(cfg: JudgeConfig) -> dict[str, Any] | None:
    """What the judge's verdicts depend on (its model and prompt; not how it is reached), for the
    settings of every stage it grades for; None without a judge."""
    if cfg.model is None:
        return None
    return {**cfg.output_settings(), "prompt": stable_hash([JUDGE_SYSTEM, JUDGE_USER], 8)}


def judge_api_key(cfg: JudgeConfig) -> str:
    """The judge's API key; a StageError when its variable is named but unset (every item would fail)."""
    try:
        return read_api_key(cfg.api_key_env)
    except MissingAPIKey as exc:
        raise StageError(f"judge: {exc}") from None


def judge_all(cfg: JudgeConfig, pending: Sequence[tuple[AnswerKey, list[Grade]]]) -> list[list[Grade] | BaseException]:
    """The judge's verdicts on the open-ended misses of every item; an item's exception in its place
    (each request retried `cfg.max_retries` times first)."""
    assert cfg.model is not None
    model, api_key = cfg.model, judge_api_key(cfg)

    async def run() -> list[list[Grade] | BaseException]:
        async with ChatClient(
            base_url=cfg.base_url, api_key=api_key, concurrency=cfg.concurrency, timeout_s=cfg.timeout_s, max_retries=cfg.max_retries,
        ) as client:
            judge = LLMJudge(client, model)
            return await asyncio.gather(*(judge_grades(judge, key, grades) for key, grades in pending), return_exceptions=True)

    return asyncio.run(run())


def judge_failure(stage: str, item_id: str, exc: BaseException) -> Failure:
    """The failure row of an item the judge gave no verdict on, or the exception that stops the shard
    (endpoint unreachable after retries, so a rerun judges it) or the stage (endpoint refuses us)."""
    if isinstance(exc, ChatRequestError):
        if exc.fatal:
            raise StageError(
                f"{stage}: the judge endpoint refused the request ({exc}); check judge.base_url, judge.model and the key"
            ) from exc
        if exc.transient:  # the judge was unreachable, not wrong about this item: redo the shard
            raise exc
        return Failure(item_id, f"judge_{exc.kind}", f"the judge gave no answer after {exc.attempts} attempt(s): {exc}", None, REQUEST_FAULT)
    if isinstance(exc, JudgeError):
        return Failure(item_id, "judge_unparseable", str(exc), None, OUTPUT_FAULT)
    raise exc


def check_judge_reached(stage: str, failures: Sequence[Failure], judged: bool) -> None:
    """Stop a stage in which the judge refused requests and decided nothing (`judged` False): it is
    misconfigured, and publishing would turn every open-ended item into a failure row."""
    refused = [f for f in failures if f.error_kind.startswith("judge_") and f.failure_class == REQUEST_FAULT]
    if refused and not judged:
        raise StageError(
            f"{stage}: every request to the judge failed ({len(refused)} items; first: {refused[0].message}); the judge is "
            "misconfigured, so nothing is published: check judge.model and judge.base_url"
        )
