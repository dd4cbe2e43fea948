"""A question's difficulty for a model, from how often its sampled answers were right (the paper's
rule: easy when always right, hard when never, medium in between; thresholds configurable)."""

from __future__ import annotations

from data_schemas import DIFFICULTIES

EASY, MEDIUM, HARD = DIFFICULTIES


def difficulty(pass_rate: float, easy_min_pass_rate: float, hard_max_pass_rate: float) -> str:
    if pass_rate >= easy_min_pass_rate:
        return EASY
    if pass_rate <= hard_max_pass_rate:
        return HARD
    return MEDIUM
