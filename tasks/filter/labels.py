"""Difficulty labels, SFT quality and the split of every item: pure, deterministic functions.

Difficulty (the paper's rule, thresholds configurable): `pass_rate = n_correct / n_runs`;
easy when `pass_rate >= easy_min_pass_rate` (default 1.0: always right), hard when
`pass_rate <= hard_max_pass_rate` (default 0.0: always wrong), medium otherwise.

Splits (one per item, so SFT, RL and eval never share an item), assigned in this order:

1. eval: held out first, stratified by category. In each category the items are ranked by
   `hash(salt, qa_id, "eval")` and the first `round(eval_fraction * n_category)` are taken, so
   every category is represented in proportion, whatever its difficulty mix.
2. sft: from the rest, items whose difficulty is in `sft_difficulties` (default easy and hard)
   and whose reference reasoning qualifies (`quality > 0`), best first (quality, then
   `hash(salt, qa_id, "sft")`), up to `round(sft_fraction * n_items)` (the paper: ~18K SFT items
   of ~52K).
3. rl: every remaining item whose difficulty is in `rl_difficulties` (default medium: items the
   model sometimes gets right are the only ones whose GRPO group rewards differ, i.e. whose
   advantages are not all zero). With the defaults SFT never takes a medium item, so RL gets
   every medium item outside eval.
4. unused: the rest.

SFT quality of the reference chain of thought (the QA stage's `target`), in [0, 1]:
0 when the target is not `<think>...</think><answer>...</answer>` or its reasoning has fewer than
`sft_min_reasoning_words` or more than `sft_max_reasoning_words` words (no reasoning to learn
from, or rambling); otherwise `0.5 + 0.125 * min(timestamps, 4)`, where `timestamps` counts the
distinct video times (`mm:ss`) the reasoning cites: reasoning grounded in when things happen is
what long-video SFT should teach, and it is the property the refinement step asks for.

Everything is a function of the qa id, the item's own labels and its category's size, so a rerun
gives the same splits and adding items elsewhere never moves an item between splits except at a
category's eval boundary or the SFT cut-off.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from data_schemas import SPLITS
from tasks.config import FilterConfig
from tasks.engine.store import stable_hash
from tasks.grading.answers import FORMAT_PATTERN
from tasks.grading.difficulty import difficulty

SFT, RL, EVAL, UNUSED = SPLITS

_THINK = re.compile(r"<think>(.*?)</think>", re.DOTALL)
_TIMESTAMP = re.compile(r"\b(?:\d+:)?\d{1,2}:\d{2}\b")


def reasoning_text(target: str) -> str:
    """The reasoning of a target: its `<think>` text, "" when it has none."""
    think = _THINK.search(target)
    return think.group(1).strip() if think else ""


def reasoning_words(target: str) -> int:
    think = _THINK.search(target)
    return len(think.group(1).split()) if think else 0


def reasoning_quality(target: str, min_words: int, max_words: int) -> float:
    if not FORMAT_PATTERN.match(target):
        return 0.0
    think = _THINK.search(target)
    reasoning = think.group(1) if think else ""
    if not min_words <= len(reasoning.split()) <= max_words:
        return 0.0
    timestamps = len(set(_TIMESTAMP.findall(reasoning)))
    return 0.5 + 0.125 * min(timestamps, 4)


@dataclass(frozen=True)
class SplitRules:
    eval_fraction: float
    rl_difficulties: tuple[str, ...]
    sft_fraction: float
    sft_difficulties: tuple[str, ...]
    salt: str


@dataclass(frozen=True)
class SplitItem:
    qa_id: str
    category: str
    difficulty: str
    quality: float


def _rank(salt: str, qa_id: str, purpose: str) -> str:
    return stable_hash({"salt": salt, "qa_id": qa_id, "purpose": purpose})


def _round_half_up(x: float) -> int:
    return int(x + 0.5)


def assign_splits(items: Sequence[SplitItem], rules: SplitRules) -> dict[str, str]:
    """qa_id -> split, following the rules in the module docstring."""
    split: dict[str, str] = {}
    by_category: dict[str, list[SplitItem]] = defaultdict(list)
    for item in items:
        by_category[item.category].append(item)
    for members in by_category.values():
        ranked = sorted(members, key=lambda it: _rank(rules.salt, it.qa_id, EVAL))
        for item in ranked[: _round_half_up(rules.eval_fraction * len(members))]:
            split[item.qa_id] = EVAL
    candidates = [it for it in items if it.qa_id not in split and it.difficulty in rules.sft_difficulties and it.quality > 0]
    candidates.sort(key=lambda it: (-it.quality, _rank(rules.salt, it.qa_id, SFT)))
    for item in candidates[: _round_half_up(rules.sft_fraction * len(items))]:
        split[item.qa_id] = SFT
    for item in items:
        if item.qa_id not in split and item.difficulty in rules.rl_difficulties:
            split[item.qa_id] = RL
    return {item.qa_id: split.get(item.qa_id, UNUSED) for item in items}


def label_rows(rows: Sequence[dict[str, Any]], cfg: FilterConfig) -> list[dict[str, Any]]:
    """The rows with `difficulty`, `quality` and `split` set by the config's rules, sorted by qa id."""
    labelled = []
    for row in rows:
        labelled.append(
            {
                **row,
                "difficulty": difficulty(row["pass_rate"], cfg.easy_min_pass_rate, cfg.hard_max_pass_rate),
                "quality": reasoning_quality(row["target"], cfg.sft_min_reasoning_words, cfg.sft_max_reasoning_words),
            }
        )
    rules = SplitRules(cfg.eval_fraction, tuple(cfg.rl_difficulties), cfg.sft_fraction, tuple(cfg.sft_difficulties), cfg.split_salt)
    splits = assign_splits([SplitItem(r["qa_id"], r["category"], r["difficulty"], r["quality"]) for r in labelled], rules)
    return sorted(({**r, "split": splits[r["qa_id"]]} for r in labelled), key=lambda r: r["qa_id"])
