"""Charts and markdown for the run report under `<workdir>/report/` (shared by the stages that report).

Charts are drawn on `matplotlib.figure.Figure` objects, which render PNGs through the Agg canvas
without touching pyplot's global state, so shards or flows in other threads are never disturbed
and no display is needed. Files go through the workdir's filesystem, so a report lands next to
the data also in object storage. `inline_images` turns a report's image links into data URIs for
places that cannot reach the files (a Prefect markdown artifact).
"""

from __future__ import annotations

import base64
import io
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from tasks.artifacts import Workdir, write_bytes_atomic

REPORT_DIR = "report"
DIFFICULTY_COLORS = {"easy": "#4caf50", "medium": "#ff9800", "hard": "#e53935"}
SPLIT_ORDER = ("sft", "rl", "eval", "unused")
_IMAGE_LINK = re.compile(r"!\[([^\]]*)\]\(([^)\s]+\.png)\)")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def figure_png(fig: Any, dpi: int = 80) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    return buf.getvalue()


def write_report_file(workdir: Workdir, name: str, data: bytes) -> str:
    path = workdir.path(REPORT_DIR, name)
    write_bytes_atomic(workdir.fs, path, data)
    return path


def read_report_file(workdir: Workdir, name: str) -> bytes | None:
    try:
        with workdir.fs.open(workdir.path(REPORT_DIR, name), "rb") as fh:
            return fh.read()
    except FileNotFoundError:
        return None


def inline_images(markdown: str, workdir: Workdir) -> str:
    """Replace `![alt](name.png)` links to files of the report folder by data URIs."""

    def embed(match: re.Match[str]) -> str:
        data = read_report_file(workdir, match.group(2))
        if data is None:
            return match.group(0)
        return f"![{match.group(1)}](data:image/png;base64,{base64.b64encode(data).decode()})"

    return _IMAGE_LINK.sub(embed, markdown)


def md_text(text: str, limit: int = 240) -> str:
    """Model output made safe for one markdown table cell or list item: one line, no pipes, bounded."""
    flat = " ".join(_CONTROL.sub(" ", text).split()).replace("|", "\\|").replace("`", "'")
    return flat if len(flat) <= limit else flat[: limit - 1] + "\u2026"


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


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

    splits = [s for s in SPLIT_ORDER if s in counts] + sorted(set(counts) - set(SPLIT_ORDER))
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
