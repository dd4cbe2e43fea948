"""The LLM judge for open-ended answers: an LLM on an OpenAI-compatible endpoint decides the answers
that normalised matching (`tasks.grading.answers`) called wrong. Each distinct prediction of an
item is asked once."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

from models.openai_client import ChatClient, MissingAPIKey, read_api_key
from tasks.config import FilterConfig
from tasks.engine.stage import StageError
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


def judge_all(cfg: FilterConfig, pending: Sequence[tuple[AnswerKey, list[Grade]]]) -> list[list[Grade] | BaseException]:
    """The judge's verdicts on the open-ended misses of every item; an item's exception in its place."""
    assert cfg.judge_model is not None
    try:
        api_key = read_api_key(cfg.judge_api_key_env)
    except MissingAPIKey as exc:
        raise StageError(f"filter: judge: {exc}") from None

    async def run() -> list[list[Grade] | BaseException]:
        async with ChatClient(
            base_url=cfg.judge_base_url, api_key=api_key, concurrency=cfg.judge_concurrency, timeout_s=cfg.judge_timeout_s,
            max_retries=cfg.judge_max_retries,
        ) as client:
            judge = LLMJudge(client, cfg.judge_model)
            return await asyncio.gather(*(judge_grades(judge, key, grades) for key, grades in pending), return_exceptions=True)

    return asyncio.run(run())
