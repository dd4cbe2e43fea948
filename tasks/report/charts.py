"""Every chart of the reports: drawn on `matplotlib.figure.Figure` objects, which render PNGs through
the Agg canvas without touching pyplot's global state (shards or flows in other threads are never
disturbed and no display is needed), and returned as PNG bytes. Rows are plain dicts (FILTER,
EVAL_SUMMARY, TRAIN_METRICS) so callers can draw from a stage's tables in `finalize` or from the
published tables later. A chart with nothing to show returns None.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from data_schemas import DIFFICULTIES, SPLITS

ACCURACY_PNG = "eval_accuracy.png"
FRAMES_PNG = "eval_frames.png"
GRPO_REWARD_PNG = "grpo_reward.png"
LOSS_PNG = "sft_loss.png"
DIFFICULTY_PNG = "filter_difficulty.png"
SPLITS_PNG = "filter_splits.png"
DIFFICULTY_COLORS = dict(zip(DIFFICULTIES, ("#4caf50", "#ff9800", "#e53935")))


def figure_png(fig: Any, dpi: int = 80) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    return buf.getvalue()


def _in_order(values: Sequence[Any]) -> list[Any]:
    """Distinct values in order of first appearance (the summary's own order: models as
    configured, categories in the paper's order, Overall last)."""
    return list(dict.fromkeys(values))


def accuracy_chart(summary: Sequence[dict[str, Any]], num_frames: int) -> bytes | None:
    """Grouped bars: accuracy per category (and Overall), one bar per model, at `num_frames`."""
    from matplotlib.figure import Figure

    rows = [r for r in summary if r["num_frames"] == num_frames]
    if not rows:
        return None
    models = _in_order([r["model"] for r in rows])
    categories = _in_order([r["category"] for r in rows])
    cell = {(r["model"], r["category"]): r for r in rows}
    width = 0.8 / len(models)
    fig = Figure(figsize=(max(6.5, 1.6 * len(categories)), 3.6))
    ax = fig.add_subplot(1, 1, 1)
    for i, model in enumerate(models):
        xs = [c + (i - (len(models) - 1) / 2) * width for c in range(len(categories))]
        found = [cell.get((model, c)) for c in categories]
        heights = [100 * r["accuracy"] if r else 0.0 for r in found]
        ax.bar(xs, heights, width=width, label=model, edgecolor="black", linewidth=0.4)
        for x, r in zip(xs, found):
            if r:
                ax.text(x, 100 * r["accuracy"] + 1, f"{r['correct']}/{r['n']}", ha="center", va="bottom", fontsize=6)
    ax.set_xticks(range(len(categories)), categories, fontsize=8)
    ax.set_ylim(0, 110)
    ax.set_ylabel("accuracy (%)")
    ax.set_title(f"Accuracy per category ({num_frames} frames)", fontsize=11)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    return figure_png(fig)


def frames_chart(summary: Sequence[dict[str, Any]], overall: str) -> bytes | None:
    """Overall accuracy versus frames, one line per model; None unless several frame counts were scored."""
    from matplotlib.figure import Figure

    rows = [r for r in summary if r["category"] == overall]
    frames = sorted({r["num_frames"] for r in rows})
    if len(frames) < 2:
        return None
    fig = Figure(figsize=(6.5, 3.4))
    ax = fig.add_subplot(1, 1, 1)
    for model in _in_order([r["model"] for r in rows]):
        points = sorted((r["num_frames"], 100 * r["accuracy"]) for r in rows if r["model"] == model)
        ax.plot([f for f, _ in points], [a for _, a in points], marker="o", markersize=4, label=model)
    ax.set_xscale("log", base=2)
    ax.set_xticks(frames, [str(f) for f in frames])
    ax.set_ylim(0, 105)
    ax.set_xlabel("frames per video")
    ax.set_ylabel(f"{overall} accuracy (%)")
    ax.set_title("Accuracy versus frames", fontsize=11)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return figure_png(fig)


def reward_chart(metrics: Sequence[dict[str, Any]]) -> bytes | None:
    """Every TRAIN_METRICS series whose name mentions a reward (reward, accuracy_reward, ...) by step."""
    from matplotlib.figure import Figure

    names = sorted({r["name"] for r in metrics if "reward" in r["name"]})
    if not names:
        return None
    fig = Figure(figsize=(6.5, 3.2))
    ax = fig.add_subplot(1, 1, 1)
    for name in names:
        points = sorted((int(r["step"]), float(r["value"])) for r in metrics if r["name"] == name)
        ax.plot([s for s, _ in points], [v for _, v in points], marker="o", markersize=3, label=name)
    ax.set_xlabel("step")
    ax.set_ylabel("mean reward")
    ax.set_title("GRPO rewards", fontsize=11)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return figure_png(fig)


def series(rows: Sequence[dict[str, Any]], name: str) -> list[tuple[int, float]]:
    """(step, value) of one metric from TRAIN_METRICS rows, by step."""
    return sorted((int(r["step"]), float(r["value"])) for r in rows if r["name"] == name)


def loss_chart(loss: Sequence[tuple[int, float]], lr: Sequence[tuple[int, float]]) -> bytes:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.5, 3.2))
    ax = fig.add_subplot(1, 1, 1)
    ax.plot([s for s, _ in loss], [v for _, v in loss], marker="o", markersize=3, color="#1f77b4")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (assistant tokens)", color="#1f77b4")
    twin = ax.twinx()
    twin.plot([s for s, _ in lr], [v for _, v in lr], color="#ff7f0e", linewidth=1, linestyle="--")
    twin.set_ylabel("learning rate", color="#ff7f0e")
    ax.set_title("SFT loss", fontsize=11)
    fig.tight_layout()
    return figure_png(fig)


def difficulty_histogram_chart(
    n_correct_by_category: Mapping[str, Sequence[int]], runs: int, difficulty_of: Callable[[int], str]
) -> bytes:
    """One panel per category: how many items got 0..runs answers right, bars coloured by the
    difficulty that count earns (`difficulty_of(n_correct) -> "easy" | "medium" | "hard"`)."""
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch
    from matplotlib.ticker import MaxNLocator

    categories = sorted(n_correct_by_category) or ["(no items)"]
    cols = min(2, len(categories))
    rows = -(-len(categories) // cols)
    fig = Figure(figsize=(5.0 * cols, 2.8 * rows))
    xs = list(range(runs + 1))
    colors = [DIFFICULTY_COLORS[difficulty_of(x)] for x in xs]
    for i, category in enumerate(categories):
        ax = fig.add_subplot(rows, cols, i + 1)
        values = n_correct_by_category.get(category, [])
        heights = [sum(1 for v in values if v == x) for x in xs]
        ax.bar(xs, heights, color=colors, edgecolor="black", linewidth=0.4)
        ax.set_title(f"{category} ({len(values)} items)", fontsize=10)
        ax.set_xlabel(f"correct answers of {runs}", fontsize=8)
        ax.set_ylabel("items", fontsize=8)
        ax.set_xticks(xs)
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        ax.tick_params(labelsize=7)
    fig.suptitle("Difficulty per category", fontsize=11)
    fig.tight_layout()
    fig.legend(
        handles=[Patch(color=c, label=d) for d, c in DIFFICULTY_COLORS.items()], loc="upper center", ncol=3, fontsize=8,
        bbox_to_anchor=(0.5, 0.0),
    )
    return figure_png(fig)


def split_category_chart(counts: Mapping[str, Mapping[str, int]]) -> bytes:
    """Items per split (bars), stacked by category: `counts[split][category]`."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    splits = [s for s in SPLITS if s in counts] + sorted(set(counts) - set(SPLITS))
    categories = sorted({c for per in counts.values() for c in per})
    fig = Figure(figsize=(6.5, 3.5))
    ax = fig.add_subplot(1, 1, 1)
    bottoms = [0] * len(splits)
    if not categories:  # nothing to stack: zero-height bars still lay out the split axis
        ax.bar(splits, bottoms)
    for category in categories:
        heights = [counts[s].get(category, 0) for s in splits]
        ax.bar(splits, heights, bottom=bottoms, label=category, edgecolor="black", linewidth=0.4)
        bottoms = [b + h for b, h in zip(bottoms, heights)]
    for x, total in enumerate(bottoms):
        ax.text(x, total, str(total), ha="center", va="bottom", fontsize=8)
    ax.set_ylabel("items")
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title("Items per split and category", fontsize=11)
    if categories:
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    return figure_png(fig)
