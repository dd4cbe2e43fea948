"""Confidence intervals of an accuracy measured on a finite set of questions."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass


def wilson_interval(correct: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval of a proportion `correct / n` (z = 1.96: 95 %).

    Unlike the normal approximation p +- z sqrt(p (1 - p) / n), it stays inside [0, 1] and is not
    empty at 0 or n correct answers, which small eval sets of a barely trained model often give.
    """
    if n <= 0 or not 0 <= correct <= n:
        raise ValueError(f"need 0 <= correct <= n and n > 0, got correct={correct}, n={n}")
    p = correct / n
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    return max(0.0, centre - half), min(1.0, centre + half)


@dataclass(frozen=True)
class PairedDifference:
    """Accuracy of model a minus that of model b on the same n questions, with its 95 % interval
    (as fractions), and the discordant questions: right only for a, right only for b."""

    difference: float
    low: float
    high: float
    a_only: int
    b_only: int
    n: int


def paired_difference(a: Sequence[bool], b: Sequence[bool], z: float = 1.96) -> PairedDifference:
    """The mean of the per-question differences (each -1, 0 or 1) of two models' verdicts on the
    same questions, in the same order, with the normal interval of that mean.

    Pairing removes the questions' own difficulty, which both models share: the interval is much
    narrower than the two Wilson intervals side by side, and it is what says whether one model's
    lead over the other on these questions is more than noise (the interval excludes 0). Clipped
    to [-1, 1], the differences' own range."""
    if len(a) != len(b) or len(a) < 2:
        raise ValueError(f"need the same two or more questions for both models, got {len(a)} and {len(b)}")
    diffs = [int(x) - int(y) for x, y in zip(a, b)]
    n = len(diffs)
    mean = sum(diffs) / n
    half = z * math.sqrt(sum((d - mean) ** 2 for d in diffs) / (n - 1) / n)
    return PairedDifference(mean, max(-1.0, mean - half), min(1.0, mean + half), diffs.count(1), diffs.count(-1), n)
