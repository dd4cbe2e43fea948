"""The SFT stage's report: `<workdir>/report/sft.md` with the loss curve beside it."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from tasks.engine.store import Workdir
from tasks.report.charts import LOSS_PNG, loss_chart, series
from tasks.report.markdown import markdown_table, write_report_file

REPORT_FILE = "sft.md"
TABLE_ROWS = 12


def write_sft_report(workdir: Workdir, rows: Sequence[dict[str, Any]], result: dict[str, Any]) -> str:
    """Write the report and its chart under `<workdir>/report/`; returns the markdown."""
    loss, lr = series(rows, "loss"), series(rows, "lr")
    write_report_file(workdir, LOSS_PNG, loss_chart(loss, lr))
    by_step = {name: dict(series(rows, name)) for name in ("loss", "lr", "grad_norm", "tokens_per_s")}
    steps = [s for s, _ in loss]
    shown = sorted({steps[round(i * (len(steps) - 1) / (TABLE_ROWS - 1))] for i in range(TABLE_ROWS)}) if steps else []
    table = markdown_table(
        ["step", "loss", "lr", "grad norm", "tokens/s"],
        [[s, f"{by_step['loss'][s]:.4f}", f"{by_step['lr'][s]:.3g}", f"{by_step['grad_norm'][s]:.3g}",
          f"{by_step['tokens_per_s'][s]:.0f}"] for s in shown],
    )
    resumed = result.get("resumed_from_step")
    markdown = (
        "## SFT\n\n"
        f"- {result['steps']} optimizer steps on {result['examples']} examples; {result['world_size']} processes, "
        f"sequence parallel degree {result['sp_degree']}; training time {result['train_time_s']:.1f} s"
        + (f" (resumed after step {resumed})" if resumed else "") + "\n"
        f"- loss {loss[0][1]:.4f} at step {loss[0][0]} -> {loss[-1][1]:.4f} at step {loss[-1][0]}\n"
        "- model: `sft/model/`, metrics: `sft/metrics.parquet`\n\n"
        f"![SFT loss]({LOSS_PNG})\n\n{table}\n"
    )
    write_report_file(workdir, REPORT_FILE, markdown.encode())
    return markdown
