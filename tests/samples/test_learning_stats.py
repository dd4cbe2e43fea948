"""The 95 % interval the learning benchmark reports around each accuracy."""

import math

import pytest

from tasks.grading.intervals import wilson_interval


def test_wilson_interval_matches_the_formula_and_published_values():
    # Textbook values: 5 of 10 -> [0.2366, 0.7634]; 0 of 10 -> [0, 0.2775].
    assert wilson_interval(5, 10) == pytest.approx((0.23659, 0.76341), abs=1e-5)
    assert wilson_interval(0, 10) == pytest.approx((0.0, 0.27754), abs=1e-5)
    low, high = wilson_interval(81, 263)
    p, n, z = 81 / 263, 263, 1.96
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    assert (low, high) == pytest.approx((centre - half, centre + half))


def test_wilson_interval_stays_in_range_contains_the_estimate_and_narrows_with_more_questions():
    for correct, n in [(0, 1), (1, 1), (3, 7), (10, 10), (200, 480)]:
        low, high = wilson_interval(correct, n)
        assert 0.0 <= low <= correct / n <= high <= 1.0
        assert high > low
    assert wilson_interval(1, 1)[0] > 0 and wilson_interval(0, 1)[1] < 1  # never empty, never all of [0, 1]
    narrow, wide = wilson_interval(200, 400), wilson_interval(20, 40)
    assert narrow[1] - narrow[0] < wide[1] - wide[0]


@pytest.mark.parametrize("correct, n", [(1, 0), (-1, 5), (6, 5)])
def test_wilson_interval_rejects_impossible_counts(correct, n):
    with pytest.raises(ValueError):
        wilson_interval(correct, n)


def _learning_benchmark():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "benchmarks" / "learning.py"
    spec = importlib.util.spec_from_file_location("learning_benchmark", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_paired_difference_is_the_mean_per_question_difference_with_its_normal_interval():
    paired_difference = _learning_benchmark().paired_difference
    a = [{"qa_id": str(i), "correct": c} for i, c in enumerate([1, 1, 1, 0, 1, 0, 1, 1])]
    b = [{"qa_id": str(i), "correct": c} for i, c in reversed(list(enumerate([0, 1, 0, 0, 1, 1, 0, 1])))]  # order does not matter
    diffs = [1, 0, 1, 0, 0, -1, 1, 0]
    mean = sum(diffs) / 8
    half = 1.96 * math.sqrt(sum((d - mean) ** 2 for d in diffs) / 7) / math.sqrt(8)
    assert paired_difference(a, b) == pytest.approx((mean, mean - half, mean + half))
    # The same answers on every question: no difference and no width, however many questions.
    assert paired_difference(a, a) == (0.0, 0.0, 0.0)
    with pytest.raises(ValueError):
        paired_difference(a, b[:5])
