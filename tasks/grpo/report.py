"""The GRPO stage's report: `<workdir>/report/grpo.md` with the reward curve beside it."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from tasks.config import GRPOConfig
from tasks.engine.store import Workdir
from tasks.report.charts import GRPO_REWARD_PNG, reward_chart, series
from tasks.report.markdown import markdown_table, write_report_file

REPORT_FILE = "grpo.md"
TABLE_ROWS = 12
COLUMNS = (
    ("reward", "reward", ".3f"), ("accuracy_reward", "accuracy", ".3f"), ("format_reward", "format", ".3f"),
    ("groups_kept", "groups kept", ".2f"), ("kl", "KL", ".4f"), ("clip_fraction", "clip frac.", ".3f"),
    ("response_length", "resp. tokens", ".1f"), ("encoder_calls", "encoder calls", ".0f"), ("cache_hits", "cache hits", ".0f"),
    ("step_time_s", "step s", ".2f"),
)


def write_grpo_report(workdir: Workdir, rows: Sequence[dict[str, Any]], result: dict[str, Any], cfg: GRPOConfig) -> str:
    """Write the report and its chart under `<workdir>/report/`; returns the markdown."""
    png = reward_chart(rows)
    if png is not None:
        write_report_file(workdir, GRPO_REWARD_PNG, png)
    by_step = {name: dict(series(rows, name)) for name, _, _ in COLUMNS}
    steps = sorted(by_step["reward"])
    shown = sorted({steps[round(i * (len(steps) - 1) / (TABLE_ROWS - 1))] for i in range(TABLE_ROWS)}) if steps else []
    table = markdown_table(
        ["step", *(title for _, title, _ in COLUMNS)],
        [[s, *(format(by_step[name][s], spec) if s in by_step[name] else "-" for name, _, spec in COLUMNS)] for s in shown],
    )
    reward = series(rows, "reward")
    resumed = result.get("resumed_from_step")
    markdown = (
        "## GRPO\n\n"
        f"- {result['steps']} steps on {result['examples']} RL questions, G = {cfg.group_size}, {cfg.prompts_per_step} questions "
        f"per step and replica; {result['world_size']} process{'es' if result['world_size'] > 1 else ''}, sequence parallel degree "
        f"{result['sp_degree']}; rollouts: "
        f"{cfg.rollout_engine}; training time {result['train_time_s']:.1f} s" + (f" (resumed after step {resumed})" if resumed else "") + "\n"
        + (f"- mean reward {reward[0][1]:.3f} at step {reward[0][0]} -> {reward[-1][1]:.3f} at step {reward[-1][0]}\n" if reward else "")
        + "- model: `grpo/model/`, metrics: `grpo/metrics.parquet`\n\n"
        + (f"![GRPO rewards]({GRPO_REWARD_PNG})\n\n" if png is not None else "")
        + f"{table}\n"
    )
    write_report_file(workdir, REPORT_FILE, markdown.encode())
    return markdown
