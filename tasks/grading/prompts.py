"""The training prompt format: how a question about a video is put to the model, in one place
(with the question taxonomy, the check that a question can be posed, and the seed its sampled
answers are drawn with).

The filter stage's rollouts, SFT, GRPO and evaluation all ask the same way, so a model is always
judged and trained on the prompt it will be used with. The user turn is the video followed by

    <question>
    A. <option>            (multiple-choice only, one line per option)
    ...

    <answer rule>          "Answer with the option's letter ..." or "Answer in a few words."
    <format rule>          think inside <think> </think>, then answer inside <answer> </answer>

and the expected reply is `<think>reasoning</think><answer>X</answer>`, X being the option letter
for multiple-choice questions and the answer text for open-ended ones: exactly what
`tasks.grading.answers.format_reward` checks and what the QA stage's `target` column holds.

The instructions live in the user turn (no system prompt) so that every export format, including
those without a system role (LLaVA/VILA JSON, EasyR1), carries the same text.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from typing import Any

from models.vlm import video_messages
from tasks.engine.stage import WorkItem
from tasks.engine.store import Failure, stable_hash

PROMPT_VERSION = "v1"
LETTERS = "ABCDEFGHIJ"
MULTIPLE_CHOICE = "multiple_choice"
OPEN_ENDED = "open_ended"
QUESTION_TYPES = (MULTIPLE_CHOICE, OPEN_ENDED)
# The paper's four reasoning categories, in the order reports list them.
CATEGORIES = ("Temporal", "Goal and Purpose", "Spatial", "Plot and Narrative")

ANSWER_RULES = {
    MULTIPLE_CHOICE: "Answer with the letter of the correct option.",
    OPEN_ENDED: "Answer in a few words.",
}
FORMAT_RULE = (
    "First think step by step about what happens in the video and when, inside <think> </think>; "
    "then give only the final answer inside <answer> </answer>."
)


# A special token written as text: `<|name|>` (Qwen/ChatML `<|im_end|>`, `<|video_pad|>`; Llama 3
# `<|eot_id|>`) or with full-width bars (DeepSeek `<｜Assistant｜>`). Tokenizers match added tokens on
# the raw string, so such text in a caption or a question becomes the control token itself: an extra
# `<|video_pad|>` no longer matches the frames (the whole batch fails), an `<|im_end|>` ends the turn
# in the middle of a training target.
_SPECIAL_TOKEN = re.compile(r"<([|\uff5c])([^\s<>|\uff5c]{1,64})([|\uff5c])>")
# What `neutralise_special_tokens` leaves: spaces inside the bars, which no tokenizer's token has.
_NEUTRALISED = re.compile(r"<([|\uff5c]) ([^\s<>|\uff5c]{1,64}) ([|\uff5c])>")


def neutralise_special_tokens(text: str) -> tuple[str, int]:
    """`text` with every special-token marker broken (`<|im_end|>` -> `<| im_end |>`), and how many were.

    Applied to every generated text (captions, questions, options, answers, reasoning) before it can
    become a prompt or a training target, so it tokenizes as plain text for any model downstream,
    whichever tokenizer that is. Idempotent: a broken marker is not a marker.
    """
    return _SPECIAL_TOKEN.subn(r"<\1 \2 \3>", text)


def count_neutralised(texts: Iterable[str | None]) -> int:
    """How many markers `neutralise_special_tokens` broke in these (stored) texts, for stage reports."""
    return sum(len(_NEUTRALISED.findall(t)) for t in texts if t)


def category_order(categories: Iterable[str]) -> list[str]:
    """The paper's categories first (Table 2's order), any others alphabetically."""
    present = set(categories)
    return [c for c in CATEGORIES if c in present] + sorted(present - set(CATEGORIES))


def question_block(question: str, options: Sequence[str] | None) -> str:
    """The question, then its options as `A. text` lines."""
    lines = [question.strip()]
    lines += [f"{letter}. {option.strip()}" for letter, option in zip(LETTERS, options or ())]
    return "\n".join(lines)


def question_with_rule(question: str, question_type: str, options: Sequence[str] | None) -> str:
    """The question block and its answer rule: everything of the prompt but the format rule."""
    return f"{question_block(question, options)}\n\n{ANSWER_RULES[question_type]}"


def user_prompt(question: str, question_type: str, options: Sequence[str] | None) -> str:
    """The text of the user turn (the video comes before it)."""
    return f"{question_with_rule(question, question_type, options)}\n{FORMAT_RULE}"


def prompt_messages(question: str, question_type: str, options: Sequence[str] | None) -> list[dict[str, Any]]:
    """The chat to generate from: one user turn holding the video and the prompt."""
    return video_messages(user_prompt(question, question_type, options))


def answer_tag(answer: str) -> str:
    return f"<answer>{answer.strip()}</answer>"


def prompt_fingerprint() -> str:
    """`<version>-<hash of the prompt text>`: editing a rule changes it even without a new version,
    so stages that hash it into their fingerprints rerun."""
    return f"{PROMPT_VERSION}-{stable_hash([ANSWER_RULES, FORMAT_RULE, LETTERS], 8)}"


def item_problem(p: dict[str, Any]) -> str | None:
    """Why a QA row (question_type, options, answer) cannot be put to a model, or None."""
    if p["question_type"] == OPEN_ENDED:
        return None if p["answer"].strip() else "empty answer"
    if p["question_type"] != MULTIPLE_CHOICE:
        return f"unknown question type {p['question_type']!r}"
    options = p["options"] or []
    if len(options) < 2 or len(options) > len(LETTERS):
        return f"a multiple-choice question needs 2 to {len(LETTERS)} options, got {len(options)}"
    if p["answer"].strip().upper() not in LETTERS[: len(options)]:
        return f"answer {p['answer']!r} is not one of the option letters {LETTERS[: len(options)]}"
    return None


def sampling_seed(qa_ids: Sequence[str], base: int) -> int:
    """The seed of a generation over these questions: the same batch draws the same answers on any
    machine, in any shard order, and after a crash."""
    return int(stable_hash({"qa_ids": list(qa_ids), "seed": base}), 16) % (2**31)


def posable_items(items: Sequence[WorkItem]) -> tuple[list[WorkItem], list[Failure]]:
    """The items whose QA payload can be put to a model, and a `bad_item` failure row for each other."""
    good: list[WorkItem] = []
    failures: list[Failure] = []
    for item in items:
        problem = item_problem(item.payload)
        if problem:
            failures.append(Failure(item.item_id, "bad_item", problem))
        else:
            good.append(item)
    return good, failures
