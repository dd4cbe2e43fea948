"""Accuracy as reports show it: one row per model and frame count, a column per category, and the
Overall column (the EVAL_SUMMARY row over every category), each cell with its 95 % interval over
the questions: the eval split of a CPU run holds tens of questions, where a few points are noise.
Two models are compared on the same questions by the paired difference of their accuracies.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from tasks.grading.intervals import paired_difference, wilson_interval

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


def paired_comparisons(items: Iterable[dict[str, Any]], model_order: Sequence[str]) -> list[dict[str, str]]:
    """Each model against the one before it in `model_order` (sft - base, grpo - sft), on the
    questions both answered at the same frame count: the accuracy difference in points with its
    paired 95 % interval, and the questions only one of the two got right."""
    verdicts: dict[tuple[str, int], dict[str, bool]] = {}
    for r in items:
        verdicts.setdefault((r["model"], r["num_frames"]), {})[r["qa_id"]] = bool(r["correct"])
    rows = []
    for earlier, later in zip(model_order, model_order[1:]):
        for num_frames in sorted({f for m, f in verdicts if m == later}):
            a, b = verdicts.get((later, num_frames), {}), verdicts.get((earlier, num_frames), {})
            shared = sorted(set(a) & set(b))
            if len(shared) < 2:
                continue
            d = paired_difference([a[q] for q in shared], [b[q] for q in shared])
            rows.append({
                "comparison": f"{later} - {earlier}", "frames": str(num_frames), "questions": str(d.n),
                "difference": f"{100 * d.difference:+.1f} [{100 * d.low:+.1f}, {100 * d.high:+.1f}]",
                "right only": f"{later} {d.a_only}, {earlier} {d.b_only}",
                "verdict": "more than noise" if d.low > 0 or d.high < 0 else "within noise",
            })
    return rows


def chance_accuracy(option_counts: Sequence[int | None]) -> float:
    """The expected accuracy of answering each question with one of its options drawn uniformly:
    1/k for a multiple-choice question with k options, 0 for an open-ended one (None)."""
    if not option_counts:
        raise ValueError("no questions")
    return sum(1 / k for k in option_counts if k) / len(option_counts)
