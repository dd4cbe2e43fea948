"""The filter stage's report: `<workdir>/report/filter.md` with two PNG charts beside it.

Difficulty per category (table and histogram of correct answers), items per split and category
(table and stacked bars), what the rollouts looked like (format compliance, how answers were
graded), where the exports are, and a few example items per difficulty with sampled answers.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Sequence
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from data_schemas import DIFFICULTIES, SPLITS
from tasks.config import FilterConfig
from tasks.engine.store import Failure, Workdir
from tasks.grading.difficulty import difficulty
from tasks.report.charts import (
    DIFFICULTY_PNG,
    SPLITS_PNG,
    difficulty_histogram_chart,
    split_category_chart,
)
from tasks.report.markdown import markdown_table, md_text, write_report_file

REPORT_FILE = "filter.md"
SAMPLES_SHOWN = 3


def _difficulty_section(rows: Sequence[dict[str, Any]]) -> str:
    by_category: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        by_category[row["category"]].append(row)
    table = []
    for category in sorted(by_category):
        members = by_category[category]
        counts = Counter(r["difficulty"] for r in members)
        mean = sum(r["pass_rate"] for r in members) / len(members)
        table.append([category, *(counts.get(d, 0) for d in DIFFICULTIES), len(members), f"{mean:.2f}"])
    totals = Counter(r["difficulty"] for r in rows)
    mean_all = sum(r["pass_rate"] for r in rows) / len(rows) if rows else 0.0
    table.append(["**all**", *(totals.get(d, 0) for d in DIFFICULTIES), len(rows), f"{mean_all:.2f}"])
    return markdown_table(["category", *DIFFICULTIES, "items", "mean pass rate"], table)


def _split_counts(rows: Sequence[dict[str, Any]]) -> dict[str, dict[str, int]]:
    counts: dict[str, dict[str, int]] = {s: {} for s in SPLITS}
    for row in rows:
        per = counts[row["split"]]
        per[row["category"]] = per.get(row["category"], 0) + 1
    return counts


def _split_section(counts: dict[str, dict[str, int]]) -> str:
    categories = sorted({c for per in counts.values() for c in per})
    table = [[split, *(counts[split].get(c, 0) for c in categories), sum(counts[split].values())] for split in SPLITS]
    return markdown_table(["split", *categories, "total"], table)


def _rollout_section(rollouts: pa.Table) -> str:
    n = rollouts.num_rows
    if n == 0:
        return "No answers were drawn."
    format_ok = pc.sum(rollouts["format_ok"]).as_py() or 0
    predicted = n - rollouts["predicted"].null_count
    finished = pc.sum(rollouts["finished"]).as_py() or 0
    graders = Counter(rollouts["grader"].to_pylist())
    graded = ", ".join(f"{name}: {count}" for name, count in sorted(graders.items()))
    return (
        f"- {n} answers; {format_ok / n:.1%} in the exact `<think>...</think><answer>...</answer>` format; "
        f"{predicted / n:.1%} with an answer that could be read; {finished / n:.1%} ended before `max_new_tokens`.\n"
        f"- graded by {graded} (choice: option letter, match: normalised text, judge: the LLM judge)."
    )


def _examples(rows: Sequence[dict[str, Any]], rollouts: pa.Table, per_difficulty: int) -> str:
    chosen = [row for level in DIFFICULTIES for row in [r for r in rows if r["difficulty"] == level][:per_difficulty]]
    if not chosen:
        return "No items."
    wanted = pa.array([r["qa_id"] for r in chosen])
    samples: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for answer in rollouts.filter(pc.is_in(rollouts["qa_id"], value_set=wanted)).to_pylist():
        samples[answer["qa_id"]].append(answer)
    parts = []
    for row in chosen:
        options = "".join(f"<br>{letter}. {md_text(text, 120)}" for letter, text in zip("ABCDEFGHIJ", row["options"] or []))
        lines = [
            f"#### {row['difficulty']}: {row['category']}, {row['question_type']} (`{row['qa_id']}`, split {row['split']})",
            f"**Question:** {md_text(row['question'])}{options}",
            f"**Reference:** {md_text(row['answer'], 120)}; {row['n_correct']}/{row['n_runs']} answers right",
        ]
        for answer in sorted(samples[row["qa_id"]], key=lambda a: a["run"])[:SAMPLES_SHOWN]:
            mark = "right" if answer["correct"] else "wrong"
            lines.append(f"- run {answer['run']} ({mark}, read as {md_text(answer['predicted'] or '-', 60)}): {md_text(answer['response'])}")
        parts.append("\n".join(lines))
    return "\n\n".join(parts)


def filter_report(
    rows: Sequence[dict[str, Any]], rollouts: pa.Table, failures: Sequence[Failure], cfg: FilterConfig, exports_path: str
) -> str:
    failure_kinds = ", ".join(f"{k}: {v}" for k, v in sorted(Counter(f.error_kind for f in failures).items())) or "none"
    return "\n\n".join(
        [
            "# Filter: difficulty and splits",
            f"Base model `{cfg.model}` ({cfg.backend}) answered each of {len(rows)} questions {cfg.runs} times "
            f"(temperature {cfg.temperature:g}, {cfg.video_inputs_text()} across the whole video). Failures: {failure_kinds}.",
            f"Difficulty: easy when the pass rate is at least {cfg.easy_min_pass_rate:g}, hard when at most "
            f"{cfg.hard_max_pass_rate:g}, medium in between.",
            _difficulty_section(rows),
            f"![difficulty per category]({DIFFICULTY_PNG})",
            "## Splits",
            f"Eval holds out {cfg.eval_fraction:.0%} of each category; SFT then takes up to {cfg.sft_fraction:.0%} of all "
            f"items ({', '.join(cfg.sft_difficulties)}), best reference reasoning first; RL takes the remaining "
            f"{', '.join(cfg.rl_difficulties)} items.",
            _split_section(_split_counts(rows)),
            f"![items per split and category]({SPLITS_PNG})",
            f"Exports (LongVideo-Reason Parquet for Long-RL, EasyR1 Parquet, TRL Parquet, LLaVA/VILA JSON; "
            f"`manifest.json` names the files and the videos' folder): `{exports_path}`.",
            "## Answers",
            _rollout_section(rollouts),
            "## Examples",
            _examples(rows, rollouts, cfg.report_examples),
        ]
    ) + "\n"


def write_filter_report(
    workdir: Workdir, rows: Sequence[dict[str, Any]], rollouts: pa.Table, failures: Sequence[Failure], cfg: FilterConfig, exports_path: str
) -> str:
    """Write the markdown and both charts under `<workdir>/report/`; returns the markdown."""
    n_correct: dict[str, list[int]] = defaultdict(list)
    for row in rows:
        n_correct[row["category"]].append(row["n_correct"])
    runs = max([cfg.runs, *(r["n_runs"] for r in rows)])
    write_report_file(
        workdir, DIFFICULTY_PNG,
        difficulty_histogram_chart(n_correct, runs, lambda k: difficulty(k / runs, cfg.easy_min_pass_rate, cfg.hard_max_pass_rate)),
    )
    write_report_file(workdir, SPLITS_PNG, split_category_chart(_split_counts(rows)))
    markdown = filter_report(rows, rollouts, failures, cfg, exports_path)
    write_report_file(workdir, REPORT_FILE, markdown.encode())
    return markdown
