"""The other nodes of a multi-node training stage (sft, grpo).

Node 0 runs the stage itself (`lvr run --from sft --to sft ...`): it plans the run, writes the job
file into the stage's work folder and starts its share of the ranks with torchrun. Every other node
K runs `run_training_node(stage, ctx, K)` with the same workdir and config: it derives the same job
file path from the same inputs (the run key: data, model, settings, never the node's rank), waits
until node 0 has written the job for a launch that has not finished yet, and starts node K's
torchrun on it, the command node 0 logs for node K. The workdir must be a filesystem
every node mounts: the job file, checkpoints and worker tracebacks are shared through it.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

from parallel.launch import LaunchResult, LaunchSpec, launch
from tasks.engine.manifest import read_manifest
from tasks.engine.run import plan_stage
from tasks.engine.stage import StageContext, StageError
from tasks.stages import TRAINING_STAGES, get_stage
from tasks.training.loop import JOB_FILE, RESULT_FILE
from tasks.training.staging import ERRORS_DIR, run_dir, staged_dir

log = logging.getLogger("lvr.multinode")
@dataclass(frozen=True)
class NodeJob:
    """What node 0 launches for a stage's run: the job file and the torchrun spec around it."""

    stage: str
    fingerprint: str  # the stage's fingerprint: a manifest with it means the run is complete
    job_file: Path
    spec: LaunchSpec

    @property
    def error_dir(self) -> Path:
        return self.job_file.parent / ERRORS_DIR


def node_job(stage_name: str, ctx: StageContext) -> NodeJob | None:
    """The launch node 0 makes for `stage_name` on this workdir and config; None when the stage is
    already complete there (node 0 will find it cached and launch nothing)."""
    if stage_name not in TRAINING_STAGES:
        raise StageError(f"{stage_name} is not a training stage; multi-node stages: {', '.join(TRAINING_STAGES)}")
    if not ctx.workdir.is_local:
        raise StageError(f"{stage_name}: multi-node training needs a workdir every node mounts, not {ctx.workdir.url}")
    stage = get_stage(stage_name)
    plan = plan_stage(stage, ctx)
    if plan.cached:
        return None
    ((item,),) = plan.shards  # a training stage is one item: the whole run
    run_key = stage.run_key(ctx, item)
    job_file = run_dir(staged_dir(ctx.workdir, stage_name), run_key) / JOB_FILE
    spec = stage.launch_spec(ctx, job_file)
    return NodeJob(stage_name, plan.fingerprint, job_file, spec)


def launch_pending(job_file: Path) -> bool:
    """Node 0 has written the job of a launch that has not finished: the job file exists and is
    newer than the run's result (node 0 rewrites the job before every launch, rank 0 writes the
    result at the end; both on node 0, so one clock orders them)."""
    try:
        job_mtime = job_file.stat().st_mtime_ns
    except FileNotFoundError:
        return False
    result = job_file.with_name(RESULT_FILE)
    return not result.exists() or result.stat().st_mtime_ns < job_mtime


def run_training_node(
    stage_name: str, ctx: StageContext, node_rank: int, timeout_s: float = 3600.0, poll_s: float = 2.0
) -> LaunchResult | None:
    """Node `node_rank` (> 0) of the stage's multi-node run: wait for node 0's job, then run this
    node's torchrun until the training ends. None when the stage is (or becomes) complete without
    this node. Raises TimeoutError when node 0 writes no job within `timeout_s`, WorkerFailed when
    a rank fails."""
    job = node_job(stage_name, ctx)
    nnodes = getattr(ctx.config, stage_name).nnodes
    if not 0 < node_rank < nnodes:
        raise StageError(f"node rank {node_rank} is not a worker node of {stage_name}.nnodes={nnodes} (node 0 runs the stage itself)")
    deadline = time.monotonic() + timeout_s
    announced = False
    while job is not None and not launch_pending(job.job_file):
        manifest = read_manifest(ctx.workdir, stage_name)
        if manifest is not None and manifest.get("fingerprint") == job.fingerprint:
            job = None
            break
        if not announced:
            log.info("%s node %d: waiting for node 0 to write %s", stage_name, node_rank, job.job_file)
            announced = True
        if time.monotonic() > deadline:
            raise TimeoutError(f"{stage_name} node {node_rank}: node 0 wrote no job at {job.job_file} within {timeout_s:.0f} s")
        time.sleep(poll_s)
    if job is None:
        log.info("%s is complete in %s: node %d has nothing to run", stage_name, ctx.workdir.url, node_rank)
        return None
    # The stage's limit holds here too: node 0 stopping alone would leave this node's ranks waiting on it.
    return launch(job.spec, log, job.error_dir, node_rank=node_rank, timeout_s=getattr(ctx.config, stage_name).launch_timeout_s)
