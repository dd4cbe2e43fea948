"""Accuracy as reports show it: one row per model and frame count, a column per category, and the
Overall column (the EVAL_SUMMARY row over every category), each cell with its 95 % interval over
the questions: the eval split of a CPU run holds tens of questions, where a few points are noise."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from tasks.grading.intervals import wilson_interval

OVERALL = "Overall"
CELL_FORMAT = "`accuracy% (correct/n) [95 % interval]`"


def accuracy_table(summary: Sequence[dict[str, Any]]) -> list[dict[str, str]]:
    """One row per model and frame count, one column per category: `accuracy% (correct/n) [low, high]`
    (the Wilson interval, in %)."""
    table: dict[tuple[str, int], dict[str, str]] = {}
    for r in summary:
        row = table.setdefault((r["model"], r["num_frames"]), {"model": r["model"], "frames": str(r["num_frames"])})
        row[r["category"]] = accuracy_cell(r["correct"], r["n"])
    return list(table.values())


def accuracy_cell(correct: int, n: int) -> str:
    if n == 0:
        return "-"
    low, high = wilson_interval(correct, n)
    return f"{100 * correct / n:.1f}% ({correct}/{n}) [{100 * low:.1f}, {100 * high:.1f}]"
