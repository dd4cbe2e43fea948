"""The SFT stage's report: `<workdir>/report/sft.md` with the loss curve beside it."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from tasks.artifacts import Workdir
from tasks.report_charts import figure_png, markdown_table, write_report_file

REPORT_FILE = "sft.md"
LOSS_PNG = "sft_loss.png"
TABLE_ROWS = 12


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
