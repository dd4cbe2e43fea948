"""Grading answers and the GRPO rewards: one module for the filter stage, GRPO and evaluation.

Everything here is a pure function of the response text and the item's answer key.

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

The LLM judge for open-ended answers lives in `tasks.grading.judge`.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from tasks.grading.prompts import LETTERS, MULTIPLE_CHOICE, OPEN_ENDED

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


def after_thinking(text: str) -> str:
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
    return _choice_in(answer if answer is not None else after_thinking(text), options)


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
    return answer if answer is not None else after_thinking(text)


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
