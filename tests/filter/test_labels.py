"""Difficulty labels, SFT quality and splits: thresholds, determinism, stratification, disjointness."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from tasks.config import ConfigError, load_config
from tasks.engine.store import stable_hash
from tasks.filter.labels import (
    SplitItem,
    SplitRules,
    assign_splits,
    label_rows,
    reasoning_quality,
    reasoning_words,
)
from tasks.grading.difficulty import difficulty

CATEGORIES = ["Temporal", "Goal and Purpose", "Spatial", "Plot and Narrative"]
RULES = SplitRules(eval_fraction=0.2, rl_difficulties=("medium",), sft_fraction=0.33, sft_difficulties=("easy", "hard"), salt="v1")


@pytest.mark.parametrize(
    "pass_rate, easy_min, hard_max, expected",
    [(1.0, 1.0, 0.0, "easy"), (0.9, 1.0, 0.0, "medium"), (0.1, 1.0, 0.0, "medium"), (0.0, 1.0, 0.0, "hard"),
     (0.9, 0.8, 0.2, "easy"), (0.2, 0.8, 0.2, "hard"), (0.5, 0.8, 0.2, "medium")],
)
def test_difficulty_thresholds(pass_rate, easy_min, hard_max, expected):
    assert difficulty(pass_rate, easy_min, hard_max) == expected


def test_thresholds_must_be_ordered():
    with pytest.raises(ConfigError, match="hard_max_pass_rate"):
        load_config("tiny", {"filter.hard_max_pass_rate": 0.5, "filter.easy_min_pass_rate": 0.5})


def test_reasoning_quality():
    grounded = "<think>At 00:10 she cuts onions. At 00:40 they go in the pan, and at 01:05 the dish is served.</think><answer>B</answer>"
    plain = "<think>She cuts onions, then they go in the pan, and then the dish is served to guests.</think><answer>B</answer>"
    assert reasoning_words(grounded) == 19
    assert reasoning_quality(grounded, 5, 100) == pytest.approx(0.5 + 3 * 0.125)
    assert reasoning_quality(plain, 5, 100) == 0.5
    assert reasoning_quality(plain, 50, 100) == 0.0  # too short to learn from
    assert reasoning_quality(plain, 1, 5) == 0.0  # rambling
    assert reasoning_quality("no tags", 0, 100) == 0.0
    assert reasoning_quality("<think>x</think><answer>B</answer> and more", 0, 100) == 0.0


def _items(n: int, seed: int = 0) -> list[SplitItem]:
    rng = random.Random(seed)
    return [
        SplitItem(stable_hash(i), CATEGORIES[i % 4], rng.choice(["easy", "medium", "hard", "hard"]), rng.choice([0.0, 0.5, 0.625, 1.0]))
        for i in range(n)
    ]


def test_splits_are_deterministic_and_independent_of_order():
    items = _items(200)
    first = assign_splits(items, RULES)
    shuffled = items[:]
    random.Random(1).shuffle(shuffled)
    assert assign_splits(shuffled, RULES) == first
    assert assign_splits(items, SplitRules(**{**RULES.__dict__, "salt": "v2"})) != first  # the salt redraws


def test_eval_is_stratified_by_category_and_splits_follow_the_rules():
    items = _items(203)
    splits = assign_splits(items, RULES)
    by_id = {it.qa_id: it for it in items}
    per_category = Counter(it.category for it in items)
    eval_per_category = Counter(by_id[q].category for q, s in splits.items() if s == "eval")
    for category, n in per_category.items():
        assert eval_per_category[category] == int(0.2 * n + 0.5)
    counts = Counter(splits.values())
    assert counts["sft"] == int(0.33 * len(items) + 0.5)
    for qa_id, split in splits.items():
        item = by_id[qa_id]
        if split == "rl":
            assert item.difficulty == "medium"
        if split == "sft":
            assert item.difficulty in ("easy", "hard") and item.quality > 0
        if split == "unused":
            assert item.difficulty != "medium"  # every medium item outside eval goes to RL
    # SFT takes the best reasoning first: no unused candidate beats an SFT item.
    worst_sft = min(by_id[q].quality for q, s in splits.items() if s == "sft")
    assert all(by_id[q].quality <= worst_sft for q, s in splits.items() if s == "unused" and by_id[q].difficulty != "medium")


def test_adding_items_keeps_most_assignments():
    """Splits depend on the qa id and the category's size, not on unrelated items' ids."""
    base = _items(400)
    more = base + _items(440)[400:]
    a, b = assign_splits(base, RULES), assign_splits(more, RULES)
    moved = sum(a[q] != b[q] for q in a)
    assert moved < 0.1 * len(a)


def test_label_rows_sets_every_label_from_the_config():
    cfg = load_config("tiny", {"filter.rl_difficulties": ["medium", "hard"], "filter.eval_fraction": 0.25}).filter
    target = "<think>At 00:10 the door opens; at 00:20 a dog enters the room and sits on the red carpet.</think><answer>B</answer>"
    rows = [
        {"qa_id": f"q{i}", "category": CATEGORIES[i % 4], "pass_rate": [0.0, 0.3, 1.0][i % 3], "target": target,
         "difficulty": "pending", "quality": 0.0, "split": "pending"}
        for i in range(12)
    ]
    labelled = label_rows(rows, cfg)
    assert [r["qa_id"] for r in labelled] == sorted(r["qa_id"] for r in rows)
    assert {r["difficulty"] for r in labelled} == {"easy", "medium", "hard"}
    assert all(r["difficulty"] == {0.0: "hard", 0.3: "medium", 1.0: "easy"}[r["pass_rate"]] for r in labelled)
    assert all(r["quality"] == 0.75 for r in labelled)
    assert Counter(r["split"] for r in labelled)["eval"] == 4  # 25% of each category of 3
    assert Counter(r["split"] for r in labelled)["sft"] == 4 and all(r["difficulty"] != "medium" for r in labelled if r["split"] == "sft")
    assert all(r["split"] != "pending" for r in labelled)
    assert all(r["split"] in ("eval", "sft", "rl") for r in labelled if r["difficulty"] != "easy")

    # The overrides above have the tiny profile's own effect (its RL also takes hard items, and 20% of
    # a category of 3 rounds to 1 as well), so the labels alone cannot show they were read: change one
    # setting at a time and see exactly what it governs move.
    def split_counts(overrides: dict) -> Counter:
        return Counter((r["difficulty"], r["split"]) for r in label_rows(rows, load_config("tiny", overrides).filter))

    few_sft = {"filter.sft_fraction": 0.1}  # SFT takes one item, so hard items are left for RL to take or leave
    with_hard = split_counts({**few_sft, "filter.rl_difficulties": ["medium", "hard"]})
    medium_only = split_counts({**few_sft, "filter.rl_difficulties": ["medium"]})
    assert with_hard[("hard", "rl")] == medium_only[("hard", "unused")] == 3 and medium_only[("hard", "rl")] == 0
    assert with_hard[("medium", "rl")] == medium_only[("medium", "rl")] == 4
    assert sum(n for (_, split), n in split_counts({"filter.eval_fraction": 0.5}).items() if split == "eval") == 8  # 2 of each 3
