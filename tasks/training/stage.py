"""The training stage base (sft, grpo): one work item per run, a run key, the torchrun launch with its
job file (mirrored to an object-store workdir by `tasks.training.staging`), and the run's result."""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from data_schemas import TRAIN_METRICS, TableSchema, validate_table
from parallel.launch import LaunchSpec, LaunchTimeout, launch, torchrun_argv
from tasks.engine.stage import Stage, StageContext, StageError, WorkItem
from tasks.engine.store import (
    WORK_DIR,
    Failure,
    read_json,
    stable_hash,
    write_table_atomic,
)
from tasks.report.markdown import inline_images, read_report_file
from tasks.training import checkpoints as ckpt
from tasks.training.loop import (
    JOB_FILE,
    METRICS_FILE,
    MODEL_DIR,
    RESULT_FILE,
    SAMPLES_FILE,
)
from tasks.training.staging import (
    ERRORS_DIR,
    TRAIN_DIR,
    StagedDir,
    mirrored_training,
    run_dir,
    staged_dir,
)
from tasks.training.tracking import TENSORBOARD_DIR

METRICS_TABLE = "metrics.parquet"  # a training stage's table: one file, the folder also holds model/


class TrainingJob(Protocol):
    """What a trainer's workers read from the job file (`TrainJob`, `GRPOJob`)."""

    run_key: str
    model_path: str

    def save(self, path: Path) -> None: ...


def launch_training(
    staged: StagedDir, job: TrainingJob, make_spec: Callable[[Path], LaunchSpec], keep_checkpoints: int,
    timeout_s: float | None = None,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Write the job file, tell the other nodes how to join, run this node's ranks with torchrun
    (mirrored to the workdir when it is remote) and return the run's result and metric rows.
    A run longer than `timeout_s` (`<stage>.launch_timeout_s`) is stopped: a StageError."""
    work = run_dir(staged, job.run_key)
    work.mkdir(parents=True, exist_ok=True)
    job.save(work / JOB_FILE)
    spec = make_spec(work / JOB_FILE)
    stage_log = logging.getLogger(f"lvr.{staged.stage}")
    for node in range(1, spec.nnodes):
        stage_log.info(
            "%s: node %d joins with `lvr train-node %s --node-rank %d` (same workdir, config and overrides), which runs: %s",
            staged.stage, node, staged.stage, node, " ".join(torchrun_argv(spec, node_rank=node)),
        )
    with mirrored_training(staged, job.run_key, keep_checkpoints, spec.nnodes):
        try:
            launch(spec, logging.getLogger(f"lvr.{staged.stage}.workers"), work / ERRORS_DIR, timeout_s=timeout_s)
        except LaunchTimeout as exc:
            raise StageError(
                f"{staged.stage}: training did not finish within {staged.stage}.launch_timeout_s={timeout_s:g} s and was "
                f"stopped (torchrun and its workers); rerun to resume from the last checkpoint, or raise the limit.\n{exc}"
            ) from exc
    result = json.loads((work / RESULT_FILE).read_text())
    stage_log.info(
        "%s: trained %d steps (%s) in %.1f s", staged.stage, result["steps"],
        f"resumed after step {result['resumed_from_step']}" if result["resumed_from_step"] else f"from {job.model_path}",
        result["train_time_s"],
    )
    return result, ckpt.read_metrics(work / METRICS_FILE)


def finished_run(staged: StagedDir, run_key: str) -> dict[str, Any]:
    """The result record of training run `run_key`, read from the workdir once its model is there;
    other runs' work folders are dropped (in the workdir and in local staging)."""
    fs = staged.workdir.fs
    info = read_json(fs, staged.remote_path(MODEL_DIR, ckpt.TRAIN_INFO_FILE)) or {}
    if info.get("run_key") != run_key:
        raise StageError(
            f"{staged.workdir.uri(staged.stage, MODEL_DIR)} does not hold the model this configuration trains (run {run_key}); "
            f"it was replaced by an interrupted run of another configuration. Delete {staged.workdir.uri(staged.stage, WORK_DIR)} "
            "and rerun to retrain"
        )
    result = read_json(fs, staged.remote_path(WORK_DIR, TRAIN_DIR, run_key, RESULT_FILE))
    if result is None:
        raise StageError(f"{staged.workdir.uri(staged.stage, WORK_DIR, TRAIN_DIR, run_key)} has no {RESULT_FILE}: rerun to retrain")
    train_dir = staged.remote_path(WORK_DIR, TRAIN_DIR)
    for other in fs.ls(train_dir, detail=False):
        if other.rstrip("/").rsplit("/", 1)[-1] != run_key:
            fs.rm(other, recursive=True)
    local_train = staged.local_path(WORK_DIR, TRAIN_DIR)
    if staged.mirrored and local_train.is_dir():
        for other in local_train.iterdir():
            if other.name != run_key:
                shutil.rmtree(other, ignore_errors=True)
    return result


class TrainingStage(Stage):
    """What the sft and grpo stages share: one item (the whole run), a run key that checkpoints
    must match, the torchrun launch of `trainer_module`, the metrics as one file (the folder also
    holds `model/`), and the report page."""

    inputs = ("filter",)
    output = TRAIN_METRICS
    report_file: str
    trainer_module: str  # `python -m <module> job.json` runs one rank

    def launch_spec(self, ctx: StageContext, job_file: Path) -> LaunchSpec:
        """torchrun for the trainer, with the stage's process layout: DeepSpeed's CPU accelerator and
        one thread share per process on a machine without CUDA (unless the environment says otherwise)."""
        cfg = self.section(ctx)
        env: dict[str, str] = {}
        if not torch.cuda.is_available():
            env["DS_ACCELERATOR"] = os.environ.get("DS_ACCELERATOR", "cpu")
            env["OMP_NUM_THREADS"] = os.environ.get("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // cfg.procs_per_node)))
        return LaunchSpec(
            module=self.trainer_module, args=(str(job_file),), nproc_per_node=cfg.procs_per_node, nnodes=cfg.nnodes,
            node_rank=cfg.node_rank, master_addr=cfg.master_addr, master_port=cfg.master_port, env=env,
        )

    def train(self, ctx: StageContext, job: TrainingJob) -> list[dict[str, Any]]:
        """Launch the run (resuming its newest checkpoint) and return its metric rows."""
        staged = staged_dir(ctx.workdir, self.name)
        cfg = self.section(ctx)
        _, metrics = launch_training(
            staged, job, lambda job_file: self.launch_spec(ctx, job_file), cfg.keep_checkpoints, timeout_s=cfg.launch_timeout_s
        )
        if staged.mirrored and staged.local_path(TENSORBOARD_DIR).is_dir():
            staged.push(TENSORBOARD_DIR)  # the default tensorboard log_dir, written locally by rank 0
        return metrics

    def run_samples(self, ctx: StageContext, run_key: str, schema: TableSchema) -> pa.Table:
        """The sampled rows rank 0 of run `run_key` kept (`SAMPLES_FILE` in its work folder); empty when none."""
        path = run_dir(staged_dir(ctx.workdir, self.name), run_key) / SAMPLES_FILE
        return validate_table(pq.read_table(path), schema) if path.is_file() else schema.empty()

    def run_key(self, ctx: StageContext, item: WorkItem) -> str:
        """Identifies one training run (data, initial model, settings, code): checkpoints of
        another run key are never resumed from."""
        return stable_hash({"item": item.key, "settings": self.settings(ctx), "code": self.code_version})

    def publish_table(self, ctx: StageContext, schema: TableSchema, table: pa.Table) -> list[str]:
        if schema.name != self.output.name:  # side tables have folders of their own
            return super().publish_table(ctx, schema, table)
        path = ctx.stage_path(self.name, METRICS_TABLE)
        write_table_atomic(ctx.workdir.fs, path, table, schema)
        return [path]

    def finalize(
        self, ctx: StageContext, tables: dict[str, pa.Table], failures: list[Failure]
    ) -> tuple[dict[str, pa.Table], list[Failure]]:
        (item,) = self.list_items(ctx)
        result = finished_run(staged_dir(ctx.workdir, self.name), self.run_key(ctx, item))
        self.write_report(ctx, tables[TRAIN_METRICS.name].to_pylist(), result)
        return tables, failures

    def write_report(self, ctx: StageContext, metrics: list[dict[str, Any]], result: dict[str, Any]) -> None:
        raise NotImplementedError

    def report_markdown(self, ctx: StageContext, manifest: dict[str, Any]) -> str | None:
        data = read_report_file(ctx.workdir, self.report_file)
        return inline_images(data.decode(), ctx.workdir) if data is not None else None
