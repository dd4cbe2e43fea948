"""Accuracy as reports show it: one row per model and frame count, a column per category, and the
Overall column (the EVAL_SUMMARY row over every category)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

OVERALL = "Overall"


def accuracy_table(summary: Sequence[dict[str, Any]]) -> list[dict[str, str]]:
    """One row per model and frame count, one column per category: `accuracy% (correct/n)`."""
    table: dict[tuple[str, int], dict[str, str]] = {}
    for r in summary:
        row = table.setdefault((r["model"], r["num_frames"]), {"model": r["model"], "frames": str(r["num_frames"])})
        row[r["category"]] = f"{100 * r['accuracy']:.1f}% ({r['correct']}/{r['n']})"
    return list(table.values())
