"""The training prompt format: how a question about a video is put to the model, in one place.

The filter stage's rollouts, SFT, GRPO and evaluation all ask the same way, so a model is always
judged and trained on the prompt it will be used with. The user turn is the video followed by

    <question>
    A. <option>            (multiple-choice only, one line per option)
    ...

    <answer rule>          "Answer with the option's letter ..." or "Answer in a few words."
    <format rule>          think inside <think> </think>, then answer inside <answer> </answer>

and the expected reply is `<think>reasoning</think><answer>X</answer>`, X being the option letter
for multiple-choice questions and the answer text for open-ended ones: exactly what
`tasks.rewards.format_reward` checks and what the QA stage's `target` column holds.

The instructions live in the user turn (no system prompt) so that every export format, including
those without a system role (LLaVA/VILA JSON, EasyR1), carries the same text.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from models.vlm import video_messages
from tasks.artifacts import stable_hash

PROMPT_VERSION = "v1"
LETTERS = "ABCDEFGHIJ"
MULTIPLE_CHOICE = "multiple_choice"
OPEN_ENDED = "open_ended"

ANSWER_RULES = {
    MULTIPLE_CHOICE: "Answer with the letter of the correct option.",
    OPEN_ENDED: "Answer in a few words.",
}
FORMAT_RULE = (
    "First think step by step about what happens in the video and when, inside <think> </think>; "
    "then give only the final answer inside <answer> </answer>."
)


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
