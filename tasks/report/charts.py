"""Charts of the run report that no other stage draws: evaluation accuracy and GRPO rewards.

Drawn like `tasks.report_charts` (a `matplotlib.figure.Figure`, no pyplot state) and returned as
PNG bytes; rows are plain dicts (EVAL_SUMMARY, TRAIN_METRICS) so callers can draw from a stage's
tables in `finalize` or from the published tables later. A chart with nothing to show returns None.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from tasks.report_charts import figure_png

ACCURACY_PNG = "eval_accuracy.png"
FRAMES_PNG = "eval_frames.png"
GRPO_REWARD_PNG = "grpo_reward.png"


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
