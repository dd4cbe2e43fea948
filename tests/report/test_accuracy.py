"""The accuracy table's cells: accuracy, counts and the 95 % Wilson interval over the questions."""

from __future__ import annotations

import math

from tasks.report.accuracy import OVERALL, accuracy_table


def wilson(correct: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson (1927), written from the textbook form: (p + z^2/2n -+ z sqrt(p(1-p)/n + z^2/4n^2)) / (1 + z^2/n)."""
    p = correct / n
    centre, spread = p + z**2 / (2 * n), z * math.sqrt(p * (1 - p) / n + z**2 / (4 * n**2))
    return (centre - spread) / (1 + z**2 / n), (centre + spread) / (1 + z**2 / n)


def test_cells_carry_counts_and_the_interval():
    summary = [
        {"model": "base", "num_frames": 8, "category": "Temporal", "accuracy": 0.0, "correct": 0, "n": 19},
        {"model": "base", "num_frames": 8, "category": OVERALL, "accuracy": 12 / 40, "correct": 12, "n": 40},
        {"model": "sft", "num_frames": 8, "category": OVERALL, "accuracy": 1.0, "correct": 40, "n": 40},
    ]
    base, sft = accuracy_table(summary)
    low, high = wilson(12, 40)
    assert base[OVERALL] == f"30.0% (12/40) [{100 * low:.1f}, {100 * high:.1f}]"
    assert base["Temporal"].startswith("0.0% (0/19) [0.0, ") and not base["Temporal"].endswith(" 0.0]")  # not empty at 0
    assert sft[OVERALL].startswith("100.0% (40/40) [") and sft[OVERALL].endswith(", 100.0]")
    assert (base["model"], base["frames"], sft["model"]) == ("base", "8", "sft")
