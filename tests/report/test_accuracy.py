"""The accuracy table's cells: accuracy, counts and the 95 % Wilson interval over the questions."""

from __future__ import annotations

import math

import pytest

from tasks.grading.intervals import paired_difference
from tasks.report.accuracy import OVERALL, accuracy_table, chance_accuracy, paired_comparisons


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


def test_each_model_is_compared_with_the_one_before_it_on_the_questions_both_answered():
    def rows(model: str, right: set[int], n: int = 40, frames: int = 8) -> list[dict]:
        return [{"model": model, "num_frames": frames, "qa_id": f"q{i}", "correct": i in right} for i in range(n)]

    items = [*rows("base", set()), *rows("sft", set(range(4))), *rows("grpo", set(range(2, 16))),
             *rows("grpo", set(range(5)), n=10, frames=16)]  # no sft answers at 16 frames: nothing to compare
    sft_vs_base, grpo_vs_sft = paired_comparisons(items, ["base", "sft", "grpo"])
    assert (sft_vs_base["comparison"], sft_vs_base["questions"], sft_vs_base["right only"]) == ("sft - base", "40", "sft 4, base 0")
    assert sft_vs_base["difference"].startswith("+10.0 [+0.")
    assert sft_vs_base["verdict"] == "more than noise"
    # grpo right on 14, sft on 4, both on 2 of them: +25 points, 12 questions against 2.
    d = paired_difference([2 <= i < 16 for i in range(40)], [i < 4 for i in range(40)])
    assert grpo_vs_sft["right only"] == "grpo 12, sft 2"
    assert grpo_vs_sft["difference"] == f"+25.0 [{100 * d.low:+.1f}, {100 * d.high:+.1f}]"
    assert grpo_vs_sft["verdict"] == ("more than noise" if d.low > 0 else "within noise")
    # One question right for a, another for b: within noise.
    tie = paired_comparisons([*rows("sft", {0}), *rows("grpo", {1})], ["sft", "grpo"])
    assert [r["verdict"] for r in tie] == ["within noise"] and tie[0]["difference"].startswith("+0.0 [-")


def test_chance_is_one_over_the_options_on_multiple_choice_and_nothing_on_open_ended():
    assert chance_accuracy([4, 4, None, 2]) == (0.25 + 0.25 + 0 + 0.5) / 4
    assert chance_accuracy([None]) == 0.0
    with pytest.raises(ValueError):
        chance_accuracy([])
