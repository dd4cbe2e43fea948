"""The 95 % intervals of an accuracy and of the difference of two models' accuracies on the same questions."""

import math

import pytest

from tasks.grading.intervals import paired_difference, wilson_interval


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


def test_paired_difference_is_the_mean_per_question_difference_with_its_normal_interval():
    a = [True, True, True, False, True, False, True, True]
    b = [False, True, False, False, True, True, False, True]
    diffs = [1, 0, 1, 0, 0, -1, 1, 0]
    mean = sum(diffs) / 8
    half = 1.96 * math.sqrt(sum((d - mean) ** 2 for d in diffs) / 7) / math.sqrt(8)
    d = paired_difference(a, b)
    assert (d.difference, d.low, d.high) == pytest.approx((mean, mean - half, mean + half))
    assert (d.a_only, d.b_only, d.n) == (3, 1, 8)
    # The same answers on every question: no difference and no width, however many questions.
    same = paired_difference(a, a)
    assert (same.difference, same.low, same.high, same.a_only, same.b_only) == (0.0, 0.0, 0.0, 0, 0)
    with pytest.raises(ValueError):
        paired_difference(a, b[:5])
    with pytest.raises(ValueError):
        paired_difference(a[:1], b[:1])
    # Clipped to the differences' own range: 2 of 3 questions won, 0.667 +- 0.653 without the clip.
    assert paired_difference([True, True, False], [False, False, False]).high == 1.0


def test_a_paired_interval_is_narrower_than_the_two_wilson_intervals_when_the_models_share_questions():
    # 60 questions: b right on 12, a right on the same 12 and 8 more. Side by side the Wilson
    # intervals overlap; paired, the 8-question lead is clear of 0.
    b = [i < 12 for i in range(60)]
    a = [i < 20 for i in range(60)]
    d = paired_difference(a, b)
    assert wilson_interval(20, 60)[0] < wilson_interval(12, 60)[1]
    assert d.low > 0 and d.difference == pytest.approx(8 / 60)
