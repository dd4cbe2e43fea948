"""Experiment tracking for the training workers: one small interface, one backend per
`tracking.backend`, picked by name.

Rank 0 of a run opens one tracker (`open_tracker`); `StepTrainer` hands it every step's metrics
from `record()`, the sampled rollouts a trainer keeps, and closes it at the end. A tracker run is
named `<stage>-<run key>`: a rerun or a resume of the same recipe continues the same run (TensorBoard
drops the events a killed run wrote past the checkpoint it resumes from; MLflow and W&B reopen the
run, so steps redone after a kill appear twice in their history). The trackers only watch:
`metrics.parquet` and `grpo/_samples/` stay the record of a run.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tasks.config import TrackingConfig

TENSORBOARD_DIR = "_tensorboard"  # in the stage folder: the default tensorboard log_dir


@dataclass(frozen=True)
class TrackedRun:
    """What identifies a run to a tracker: the stage, the run key, the name (`<stage>-<run key>`),
    the stage folder the workers write (the default home of local logs), the step it resumes
    after, and the stage's settings (logged as parameters)."""

    stage: str
    run_key: str
    out_dir: str
    resume_step: int = 0
    params: dict[str, Any] | None = None

    @property
    def name(self) -> str:
        return run_name(self.stage, self.run_key)


def run_name(stage: str, run_key: str) -> str:
    return f"{stage}-{run_key}"


class Tracker:
    """The interface; this base is the `none` backend and does nothing. Metric names arrive as
    `<stage>/<name>`; steps are 1-based optimizer steps, as in `metrics.parquet`."""

    def log_metrics(self, step: int, values: dict[str, float]) -> None:
        pass

    def log_samples(self, step: int, rows: Sequence[dict[str, Any]]) -> None:
        pass

    def close(self, failed: bool = False) -> None:
        pass


def samples_markdown(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    """Rows as a markdown table (TensorBoard renders text summaries as markdown)."""

    def cell(value: Any) -> str:
        text = f"{value:.4g}" if isinstance(value, float) else str(value)
        return text.replace("|", "\\|").replace("\n", "<br>")

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r[c]) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


class TensorBoardTracker(Tracker):
    """Event files under `<log_dir>/<run name>/`: scalars, and the samples as a markdown text per step."""

    def __init__(self, cfg: TrackingConfig, run: TrackedRun):
        from torch.utils.tensorboard import SummaryWriter

        root = Path(cfg.log_dir).expanduser() if cfg.log_dir else Path(run.out_dir) / TENSORBOARD_DIR
        self.stage = run.stage
        # purge_step: events a killed run wrote after the checkpoint this one resumes from are dropped.
        self.writer = SummaryWriter(str(root / run.name), purge_step=run.resume_step + 1 if run.resume_step else None)
        if run.params is not None and not run.resume_step:
            self.writer.add_text(f"{run.stage}/config", f"```json\n{json.dumps(run.params, indent=1, sort_keys=True)}\n```", 0)

    def log_metrics(self, step: int, values: dict[str, float]) -> None:
        for name, value in values.items():
            self.writer.add_scalar(name, value, step)
        self.writer.flush()  # a step takes seconds at least: watchers see it now, and a killed run loses nothing

    def log_samples(self, step: int, rows: Sequence[dict[str, Any]]) -> None:
        if rows:
            self.writer.add_text(f"{self.stage}/samples", samples_markdown(rows, list(rows[0])), step)

    def close(self, failed: bool = False) -> None:
        self.writer.close()


RUN_KEY_TAG = "lvr.run_key"


class MLflowTracker(Tracker):
    """An MLflow run in experiment `project`, found again by its run-key tag; metrics batched per
    step, the stage's settings as parameters, samples as a table artifact per step
    (`samples/step-<N>.json`)."""

    def __init__(self, cfg: TrackingConfig, run: TrackedRun):
        if cfg.tracking_uri and cfg.tracking_uri.startswith("file:"):
            # MLflow 3 refuses its file store unless asked for it; a file:// URI in the config is that request.
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=cfg.tracking_uri)
        experiment = self.client.get_experiment_by_name(cfg.project)
        experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(cfg.project)
        found = self.client.search_runs([experiment_id], filter_string=f"tags.`{RUN_KEY_TAG}` = '{run.run_key}'", max_results=1)
        if found:
            self.run_id = found[0].info.run_id
            self.client.update_run(self.run_id, status="RUNNING")
        else:
            tags = {RUN_KEY_TAG: run.run_key, "lvr.stage": run.stage}
            self.run_id = self.client.create_run(experiment_id, run_name=run.name, tags=tags).info.run_id
            if run.params:
                from mlflow.entities import Param

                flat = {k: json.dumps(v) if isinstance(v, (dict, list)) else str(v) for k, v in run.params.items()}
                self.client.log_batch(self.run_id, params=[Param(k, v[:6000]) for k, v in sorted(flat.items())])

    def log_metrics(self, step: int, values: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        # MLflow's stores reject non-finite values inconsistently; a NaN grad norm is in metrics.parquet.
        metrics = [Metric(name, float(value), now, step) for name, value in values.items() if math.isfinite(value)]
        if metrics:
            self.client.log_batch(self.run_id, metrics=metrics)

    def log_samples(self, step: int, rows: Sequence[dict[str, Any]]) -> None:
        if rows:
            columns = {c: [r[c] for r in rows] for c in rows[0]}
            self.client.log_table(self.run_id, columns, f"samples/step-{step}.json")

    def close(self, failed: bool = False) -> None:
        self.client.set_terminated(self.run_id, status="FAILED" if failed else "FINISHED")


class WandbTracker(Tracker):
    """A W&B run whose id is the run key (resumed when it exists); WANDB_MODE=offline keeps it local."""

    def __init__(self, cfg: TrackingConfig, run: TrackedRun):
        import wandb

        self.wandb = wandb
        self.stage = run.stage
        self.run = wandb.init(
            project=cfg.project, name=run.name, id=run.name, resume="allow", config=run.params or {},
            dir=str(Path(cfg.log_dir).expanduser()) if cfg.log_dir else None, tags=[run.stage],
        )

    def log_metrics(self, step: int, values: dict[str, float]) -> None:
        self.run.log(dict(values), step=step)

    def log_samples(self, step: int, rows: Sequence[dict[str, Any]]) -> None:
        if rows:
            columns = list(rows[0])
            table = self.wandb.Table(columns=columns, data=[[r[c] for c in columns] for r in rows])
            self.run.log({f"{self.stage}/samples": table}, step=step)

    def close(self, failed: bool = False) -> None:
        self.run.finish(exit_code=1 if failed else 0)


BACKENDS: dict[str, Callable[[TrackingConfig, TrackedRun], Tracker]] = {
    "none": lambda cfg, run: Tracker(),
    "tensorboard": TensorBoardTracker,
    "mlflow": MLflowTracker,
    "wandb": WandbTracker,
}


def open_tracker(cfg: TrackingConfig, run: TrackedRun) -> Tracker:
    """The backend `cfg.backend` names, opened on `run` (rank 0 only)."""
    try:
        make = BACKENDS[cfg.backend]
    except KeyError:
        raise ValueError(f"unknown tracking.backend {cfg.backend!r}; valid: {', '.join(BACKENDS)}") from None
    try:
        return make(cfg, run)
    except ImportError as exc:
        raise RuntimeError(
            f"tracking.backend={cfg.backend} needs a package that is not installed ({exc.name}): "
            "pip install 'longvideo-reasoning[tracking]'"
        ) from exc
