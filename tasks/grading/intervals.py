"""Confidence intervals of an accuracy measured on a finite set of questions."""

from __future__ import annotations

import math


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
