"""Grading answers and the GRPO rewards: one module for the filter stage, GRPO and evaluation.

Everything here is a pure function of the response text and the item's answer key, except the
optional LLM judge for open-ended answers (an OpenAI-compatible endpoint, `LLMJudge`).

- `format_reward(text)`: 1.0 when the whole response is `<think>...</think><answer>...</answer>`
  (whitespace allowed around and between the blocks), else 0.0.
- `extract_answer(text)`: the content of the last `<answer>` block (an unclosed one at the end of
  a truncated response counts), or None.
- `extract_choice(text, options)`: the option letter a response commits to. It reads the last
  `<answer>` block when there is one, else the text after the thinking. In that segment, in
  order: a bare letter (`B`, `(b)`, `**B**.`), a leading letter (`B. text`, `(B) text`), the text
  of an option (normalised; the one mentioned last wins), an explicit phrase (`the answer is B`,
  `option C`), and finally the last standalone capital letter (an "A" starting a sentence, as in
  "A man walks", is an article, not a choice). Lowercase letters count only where they cannot be
  a word (`<answer>b</answer>`, `answer: c.`), so "the answer is a car" picks nothing.
- `normalize_answer(text)`: SQuAD-style normalisation for open-ended answers: NFKC, case-folded,
  number words (zero to twenty) and numerals made canonical (`1,000` -> `1000`, `2.50` -> `2.5`),
  punctuation and articles removed, whitespace collapsed; a leading "the answer is" is dropped.
- `grade(text, key)`: prediction, correctness, format; `accuracy_reward` and `total_reward`
  (GRPO: `accuracy_weight * accuracy + format_weight * format`).
- `LLMJudge` / `judge_grades`: an LLM decides the open-ended answers normalised matching called
  wrong (each distinct prediction of an item asked once).
"""

from __future__ import annotations

import asyncio
import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

from tasks.prompting import LETTERS, MULTIPLE_CHOICE, OPEN_ENDED

FORMAT_PATTERN = re.compile(r"^\s*<think>.*?</think>\s*<answer>.*?</answer>\s*$", re.DOTALL)
_ANSWER_BLOCKS = re.compile(r"<answer>(.*?)</answer>", re.DOTALL | re.IGNORECASE)
_OPEN_ANSWER = re.compile(r"<answer>(?!.*</answer>)(.*)$", re.DOTALL | re.IGNORECASE)
_THINK_END = re.compile(r"</think>", re.IGNORECASE)

_BARE = re.compile(r"[\s(\[{*_'\"]*([A-Za-z])[\s)\]}*_'\".:,;!?]*")
_LEADING = re.compile(r"[\s*_]*(?:\(\s*([A-Za-z])\s*\)|\[\s*([A-Za-z])\s*\]|([A-Za-z])\s*[).:\]])(?=\s|$)")
_PHRASE = re.compile(
    r"\b(?:answer|option|choice)s?\b\s*(?:is|would be|should be|must be|=)?\s*[:\-]?\s*[*_]*[(\[]?\s*([A-Za-z])(?![\w'])",
    re.IGNORECASE,
)
_STANDALONE = re.compile(r"(?<![\w'])[(\[]?([A-Z])[)\]]?(?![\w'])")
_ARTICLE_A = re.compile(r"A\s+[a-z]")
_LOWER_LETTER_END = re.compile(r"[\s)\]*_]*(?:[.,;:!?]|$)")

ARTICLES = frozenset({"a", "an", "the"})
NUMBER_WORDS = {
    w: str(i)
    for i, w in enumerate(
        "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
        "sixteen seventeen eighteen nineteen twenty".split()
    )
}
_THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")
_DECIMAL = re.compile(r"\d+\.\d+")
_STRAY_DOT = re.compile(r"(?<!\d)\.|\.(?!\d)")
_ANSWER_PREFIX = re.compile(r"^\s*(?:the\s+)?(?:final\s+)?answer\s*(?:is|:)\s*", re.IGNORECASE)


@dataclass(frozen=True)
class AnswerKey:
    """What grading needs to know about a question."""

    question: str
    question_type: str  # multiple_choice | open_ended
    answer: str  # the option letter, or the answer text
    options: tuple[str, ...] | None = None

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> "AnswerKey":
        options = row.get("options")
        return cls(row["question"], row["question_type"], row["answer"], tuple(options) if options is not None else None)


@dataclass(frozen=True)
class Grade:
    predicted: str | None  # the letter, or the extracted answer text
    correct: bool
    format_ok: bool
    method: str  # "choice" (letter match), "match" (normalised text), "judge" (the LLM judge decided)


def format_reward(text: str) -> float:
    return 1.0 if FORMAT_PATTERN.match(text) else 0.0


def extract_answer(text: str) -> str | None:
    blocks = _ANSWER_BLOCKS.findall(text)
    if blocks:
        return blocks[-1].strip()
    unclosed = _OPEN_ANSWER.search(text)
    return unclosed.group(1).strip() if unclosed else None


def _after_thinking(text: str) -> str:
    """Where a response without an <answer> block states its answer: after the thinking, if any."""
    parts = _THINK_END.split(text)
    tail = parts[-1].strip()
    return tail if tail else text.strip()


def _option_mentioned_last(segment: str, options: Sequence[str], letters: str) -> str | None:
    normal = f" {normalize_answer(segment)} "
    best: tuple[int, int, str] | None = None  # (end of last mention, length, letter)
    for letter, option in zip(letters, options):
        target = normalize_answer(option)
        if not target:
            continue
        position = normal.rfind(f" {target} ")
        if position >= 0:
            candidate = (position + len(target), len(target), letter)
            best = candidate if best is None or candidate[:2] > best[:2] else best
    return best[2] if best else None


def _letter_ok(letter: str, letters: str) -> bool:
    return letter.upper() in letters


def _choice_in(segment: str, options: Sequence[str]) -> str | None:
    letters = LETTERS[: len(options)]
    bare = _BARE.fullmatch(segment)
    if bare and _letter_ok(bare.group(1), letters):
        return bare.group(1).upper()
    leading = _LEADING.match(segment)
    if leading:
        letter = next(g for g in leading.groups() if g)
        if _letter_ok(letter, letters):
            return letter.upper()
    by_text = _option_mentioned_last(segment, options, letters)
    if by_text:
        return by_text
    phrased = None
    for match in _PHRASE.finditer(segment):
        letter = match.group(1)
        # "the answer is a car": a lowercase letter followed by more words is a word, not a choice.
        if _letter_ok(letter, letters) and (letter.isupper() or _LOWER_LETTER_END.match(segment, match.end())):
            phrased = letter.upper()
    if phrased:
        return phrased
    standalone = None
    for match in _STANDALONE.finditer(segment):
        letter = match.group(1)
        if letter in letters and not (letter == "A" and _ARTICLE_A.match(segment, match.start(1))):
            standalone = letter
    return standalone


def extract_choice(text: str, options: Sequence[str]) -> str | None:
    """The option letter a response commits to, or None (see the module docstring for the rules)."""
    answer = extract_answer(text)
    return _choice_in(answer if answer is not None else _after_thinking(text), options)


def _canonical_number(match: re.Match[str]) -> str:
    value = match.group(0).rstrip("0").rstrip(".")
    return value or "0"


def normalize_answer(text: str) -> str:
    s = unicodedata.normalize("NFKC", text).casefold()
    s = _ANSWER_PREFIX.sub("", s)
    s = _THOUSANDS.sub("", s)
    s = _DECIMAL.sub(_canonical_number, s)
    s = "".join(ch if ch.isalnum() or ch.isspace() or ch == "." else " " for ch in s)
    s = _STRAY_DOT.sub(" ", s)
    return " ".join(NUMBER_WORDS.get(t, t) for t in s.split() if t not in ARTICLES)


def open_prediction(text: str) -> str:
    """The answer text of an open-ended response: the <answer> block, else what follows the thinking."""
    answer = extract_answer(text)
    return answer if answer is not None else _after_thinking(text)


def grade(text: str, key: AnswerKey) -> Grade:
    """Correctness without a judge: letter match for multiple-choice, normalised match otherwise."""
    format_ok = format_reward(text) == 1.0
    if key.question_type == MULTIPLE_CHOICE:
        letter = extract_choice(text, key.options or ())
        return Grade(letter, letter is not None and letter == key.answer.strip().upper(), format_ok, "choice")
    if key.question_type != OPEN_ENDED:
        raise ValueError(f"unknown question type {key.question_type!r}")
    predicted = open_prediction(text)
    correct = bool(normalize_answer(predicted)) and normalize_answer(predicted) == normalize_answer(key.answer)
    return Grade(predicted, correct, format_ok, "match")


def accuracy_reward(text: str, key: AnswerKey) -> float:
    return 1.0 if grade(text, key).correct else 0.0


def total_reward(
    text: str, key: AnswerKey, *, accuracy_weight: float = 0.9, format_weight: float = 0.1, accuracy: float | None = None
) -> float:
    """GRPO's reward. `accuracy` overrides the judge-free accuracy (e.g. with a judge's verdict)."""
    acc = accuracy_reward(text, key) if accuracy is None else accuracy
    return accuracy_weight * acc + format_weight * format_reward(text)


# --------------------------------------------------------------------------------------------
# LLM judge for open-ended answers
# --------------------------------------------------------------------------------------------
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
    text = _after_thinking(reply)
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
