"""The refinement step's contract: what the refiner is told the answer is, and the training target.

The target is `<think>{refined reasoning}</think><answer>{answer}</answer>`, the answer being the
option letter for multiple-choice questions and the answer text for open-ended ones: exactly what
the GRPO format reward checks (`tasks.grading.answers.FORMAT_PATTERN`).
"""

from __future__ import annotations

from tasks.grading.answers import FORMAT_PATTERN
from tasks.qa.parser import ParsedItem
from tasks.qa.prompts import LETTERS


def display_answer(item: ParsedItem) -> str:
    """The answer as the refiner sees it: `B. <option text>` for multiple-choice."""
    if item.options is None:
        return item.answer
    return f"{item.answer}. {item.options[LETTERS.index(item.answer)]}"


def build_target(refined_reasoning: str, answer: str) -> str:
    target = f"<think>{refined_reasoning.strip()}</think><answer>{answer.strip()}</answer>"
    # The parser rejects tags in answers and refinements; this guards the format the reward relies on.
    assert FORMAT_PATTERN.match(target), target
    return target
