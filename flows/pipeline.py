"""Prefect edge of the pipeline: the `lvr-pipeline` flow, one `lvr-<stage>` subflow per stage, and
one task per shard (never per item, so orchestration stays a small fraction of the work).

All logic lives in `tasks/`; these functions only translate parameters and hand shards to Prefect.
"""

from __future__ import annotations

import enum
import statistics
import time
from collections import deque
from datetime import datetime
from typing import Any

from prefect import flow, get_client, get_run_logger, task
from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.cache_policies import NO_CACHE
from prefect.client.schemas.objects import FlowRun
from prefect.context import FlowRunContext
from prefect.deployments import run_deployment
from prefect.exceptions import ObjectNotFound
from prefect.states import Cancelled, Cancelling
from prefect.task_runners import ProcessPoolTaskRunner, TaskRunner, ThreadPoolTaskRunner

from tasks.config import StageName, load_config
from tasks.engine.manifest import read_manifest
from tasks.engine.progress import FanOut, InBackground, TerminalProgress, Throttled, engine_progress
from tasks.engine.run import ShardOutcome, ShardWork, run_stage
from tasks.engine.runs import StageRunner, check_stage_manifest
from tasks.engine.settings import ExecutionConfig
from tasks.engine.stage import StageContext, StageError, StageReport
from tasks.engine.store import Workdir
from tasks.pipeline import resolve_source, run_pipeline, select_stages
from tasks.preflight.checks import preflight
from tasks.report import update_report
from tasks.stages import STAGE_NAMES, get_stage


@task(name="shard", task_run_name="{label}", cache_policy=NO_CACHE, persist_result=False)
def shard_task(label: str, indices: list[int], work: Any) -> list[ShardOutcome]:
    """Some shards of a stage, one after the other; each is written and reused on its own, so a
    retry of the task redoes only those not yet complete."""
    return [work(i) for i in indices]


def _task_label(stage: str, indices: list[int]) -> str:
    return f"{stage}-shard-{indices[0]}" if len(indices) == 1 else f"{stage}-shards-{indices[0]}-{indices[-1]}"


def shards_per_task(shard_s: float | None, target_s: float | None, pending: int, workers: int) -> int:
    """How many shards the next task takes: one while a shard's time is unknown (or with no target),
    then about `target_s` of work, but never so many that a worker would be left without shards."""
    if not target_s or shard_s is None or pending <= 0:
        return 1
    return max(1, min(int(target_s / max(shard_s, 1e-3)), -(-pending // workers)))


def shard_task_runner(execution: ExecutionConfig) -> TaskRunner:
    """Where shard tasks run: threads of this process, worker processes, or a Ray cluster."""
    if execution.task_runner == "ray":
        try:
            from prefect_ray import RayTaskRunner
        except ImportError as exc:
            raise StageError("execution.task_runner=ray needs the `ray` extra: pip install -c constraints.txt '.[ray]'") from exc
        return RayTaskRunner(address=execution.ray_address)
    if execution.task_runner == "processes":
        return ProcessPoolTaskRunner(max_workers=execution.shard_workers)
    return ThreadPoolTaskRunner(max_workers=execution.shard_workers)


def _prefect_mapper(stage: str, execution: ExecutionConfig):
    """Shards as Prefect tasks with retries and an optional time limit, at most `shard_workers` in flight.
    The engine hands over only the shards still to do: a reused shard is never a task run. Quick
    shards share a task (`execution.task_target_s` of work each), so a task's fixed cost stays small."""
    shard = shard_task.with_options(
        retries=execution.shard_retries, retry_delay_seconds=execution.shard_retry_delay_s, timeout_seconds=execution.shard_timeout_s
    )
    in_process = execution.task_runner == "threads"

    def map_shards(work: ShardWork, indices: list[int]) -> list[ShardOutcome]:
        pending = deque(indices)
        running: deque = deque()
        outcomes: list[ShardOutcome] = []
        computed: list[float] = []  # work time of the shards computed so far
        with shard_task_runner(execution) as runner:
            while pending or running:
                while pending and len(running) < execution.shard_workers:
                    shard_s = statistics.median(computed) if computed else None  # the first may include a model load
                    n = shards_per_task(shard_s, execution.task_target_s, len(pending), execution.shard_workers)
                    batch = [pending.popleft() for _ in range(n)]
                    task_ = shard if execution.shard_timeout_s is None or n == 1 else shard.with_options(
                        timeout_seconds=execution.shard_timeout_s * n
                    )
                    running.append(runner.submit(task_, {"label": _task_label(stage, batch), "indices": batch, "work": work}))
                for outcome in running.popleft().result():
                    if not in_process:
                        work.record(outcome)  # the remote copy cannot report progress here
                    if not outcome.reused:
                        computed.append(outcome.work_s)
                    outcomes.append(outcome)
        return outcomes

    return map_shards


def _summary_markdown(report: StageReport) -> str:
    m = report.manifest
    tables = "\n".join(f"| `{name}` | {info['rows']} | `{info['path'] or '.'}` |" for name, info in m.get("tables", {}).items())
    return (
        f"# lvr {report.stage}: {report.status}\n\n"
        f"- rows: **{m.get('rows')}**, failures: **{m.get('failures')}** (see `_failures.parquet`)\n"
        f"- shards: {m.get('shards', {}).get('total')} ({m.get('shards', {}).get('reused')} reused)\n"
        f"- work time: {m.get('work_time_s')} s, wall time: {m.get('wall_time_s')} s\n"
        f"- fingerprint: `{m.get('fingerprint')}`\n\n"
        f"| table | rows | path |\n|---|---|---|\n{tables}\n"
    )


class PrefectProgress:
    """A stage's progress as a Prefect progress artifact (the bar in the flow run's UI)."""

    def __init__(self) -> None:
        self.artifact_id = None
        self.total = 0
        self.done = 0

    def start(self, stage: str, total: int, unit: str = "shards") -> None:
        self.total, self.done = total, 0
        self.artifact_id = create_progress_artifact(
            progress=0.0, key=f"lvr-{stage}-progress", description=f"lvr {stage}: {unit} done"
        )

    def advance(self, n: int = 1) -> None:
        self.done = min(self.total, self.done + n)
        if self.artifact_id is not None:
            update_progress_artifact(self.artifact_id, progress=100.0 * self.done / max(1, self.total))

    def finish(self) -> None:
        if self.artifact_id is not None:
            update_progress_artifact(self.artifact_id, progress=100.0)


def execute_stage(name: str, ctx: StageContext) -> StageReport:
    """Run one stage with its shards as Prefect tasks; must be called inside a flow run."""
    stage = get_stage(name)
    execution = ctx.config.execution
    logger = get_run_logger()
    # Each artifact update is a request to the Prefect API: at most one a second per stage, plus the
    # last, sent from a thread of its own so that no shard waits for it.
    ctx.progress = engine_progress(FanOut([TerminalProgress(), InBackground(Throttled(PrefectProgress()))]), name)
    report = run_stage(stage, ctx, map_shards=_prefect_mapper(name, execution))
    logger.info("%s: %s, %d rows, %d failures", name, report.status, report.rows, report.failures)
    markdown = _summary_markdown(report)
    extra = stage.report_markdown(ctx, report.manifest)
    if extra:
        markdown += "\n" + extra
    create_markdown_artifact(markdown=markdown, key=f"lvr-{name}", description=f"lvr {name} stage summary")
    rows = stage.report_table(ctx, report.manifest)
    if rows:
        create_table_artifact(table=rows, key=f"lvr-{name}-table", description=f"lvr {name} results")
    return report


def _stage_flow(name: str):
    @flow(name=f"lvr-{name}", log_prints=True, validate_parameters=True)
    def stage_flow(
        workdir: str = "runs/sample",
        config: str = "tiny",
        overrides: list[str] | None = None,
        source: str | None = None,
    ) -> dict[str, Any]:
        cfg = load_config(config, overrides)
        ctx = StageContext(workdir=Workdir(workdir), config=cfg, source=resolve_source(source, cfg, [name]))
        # Run alone from its deployment, a stage is checked as a pipeline is (its own container's keys too).
        preflight(cfg, [name], workdir=workdir, source=ctx.source)
        report = execute_stage(name, ctx)
        return {"stage": name, "status": report.status, "rows": report.rows, "failures": report.failures}

    stage_flow.__doc__ = f"Run the `{name}` stage of lvr on a workdir (its upstream stages must be complete there)."
    return stage_flow


# Module-level names: prefect.yaml's entrypoints (`flows.pipeline.<stage>_flow`) point at them.
clip_flow = _stage_flow("clip")
caption_flow = _stage_flow("caption")
qa_flow = _stage_flow("qa")
filter_flow = _stage_flow("filter")
sft_flow = _stage_flow("sft")
grpo_flow = _stage_flow("grpo")
eval_flow = _stage_flow("eval")
# A stage added to the stage list without its flow fails here, at import.
STAGE_FLOWS = {name: globals()[f"{name}_flow"] for name in STAGE_NAMES}


class ExecutionMode(str, enum.Enum):
    """Where the pipeline's stages run."""

    local = "local"  # stage subflows in this flow run's process (one machine, one image)
    deployments = "deployments"  # each stage as a run of its own deployment (its pool, image, GPUs)


def _subflow_stage_runner(parameters: dict[str, Any]) -> StageRunner:
    def run(name: str, ctx: StageContext) -> StageReport:
        result = STAGE_FLOWS[name](**parameters)
        manifest = read_manifest(ctx.workdir, name)
        if manifest is None:
            raise StageError(f"{name} finished without a complete manifest in {ctx.workdir.uri(name)}")
        return StageReport(name, result["status"], manifest)

    return run


def stage_deployment_name(stage: str, deployment: str) -> str:
    """`flow/deployment` of a stage: the flow is always `lvr-<stage>`; `{stage}` in `deployment` is filled in."""
    return f"lvr-{stage}/{deployment.format(stage=stage)}"


def _deployment_stage_runner(parameters: dict[str, Any], deployment: str) -> StageRunner:
    def run(name: str, ctx: StageContext) -> StageReport:
        target = stage_deployment_name(name, deployment)
        execution = ctx.config.execution
        logger = get_run_logger()
        logger.info("%s: starting deployment %s", name, target)
        try:
            # timeout=0 only creates the run: the wait is ours, so that a wait that ends otherwise
            # than with the run (over its limit, this flow cancelled) can cancel it.
            created = run_deployment(target, parameters=parameters, timeout=0, as_subflow=True)
        except ObjectNotFound:
            raise StageError(f"{name}: no deployment {target!r} on the Prefect server; register it with `prefect deploy --all`") from None
        child = _wait_for_stage_run(name, target, created, execution.stage_timeout_s, execution.deployment_poll_s)
        state = child.state
        if state is None or not state.is_completed():
            raise StageError(
                f"{name}: flow run {child.name!r} of {target} ended {state.name if state else 'without a state'}"
                f"{': ' + state.message if state and state.message else ''}; retry this run once it is fixed (finished stages are kept)"
            )
        manifest = check_stage_manifest(get_stage(name), ctx)
        # A cached stage leaves its old manifest; a run that did work writes a new one.
        started = child.start_time or child.expected_start_time
        finished = datetime.fromisoformat(manifest["finished_at"])
        status = "done" if started is not None and finished >= started else "cached"
        logger.info("%s: %s by flow run %s (%d rows, %d failures)", name, status, child.name, manifest["rows"], manifest["failures"])
        return StageReport(name, status, manifest)

    return run


def _wait_for_stage_run(stage: str, target: str, run: FlowRun, timeout_s: float | None, poll_s: float) -> FlowRun:
    """The stage's flow run once in a final state. A run still going when the wait ends otherwise is
    cancelled: one over `timeout_s` (its infrastructure may be gone: a lost node, a deleted pod) is
    a StageError; when this flow is cancelled, crashes or fails while waiting, the stage's run must
    not go on (or start later) for a pipeline that is no longer there."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    with get_client(sync_client=True) as client:
        try:
            while True:
                if run.state is not None and run.state.is_final():
                    return run
                if deadline is not None and time.monotonic() >= deadline:
                    break
                time.sleep(poll_s if deadline is None else max(0.0, min(poll_s, deadline - time.monotonic())))
                run = client.read_flow_run(run.id)
        except BaseException as exc:  # a cancelled flow run sees a signal here; a crash any exception
            _cancel_flow_run(client, run, f"the pipeline stopped waiting for it ({type(exc).__name__})")
            raise
        limit = f"execution.stage_timeout_s={timeout_s:g} s"
        _cancel_flow_run(client, run, f"no final state within {limit}")
    raise StageError(
        f"{stage}: flow run {run.name!r} ({run.id}) of {target} did not finish within {limit} "
        f"(it was {run.state.name if run.state else 'without a state'}; is a worker polling its pool, did its "
        "infrastructure die?); it was cancelled. Retry this run once it is fixed (finished stages are kept)"
    )


def _cancel_flow_run(client: Any, run: FlowRun, reason: str) -> None:
    """Cancel the run: one no worker has taken is Cancelled at once; for one that runs, Cancelling
    asks its worker to stop its infrastructure. Best effort: the error that got us here matters more."""
    message = f"cancelled by the lvr pipeline: {reason}"
    try:
        run = client.read_flow_run(run.id)
        # Proposed as Cancelling, a Scheduled run is made Cancelled by the server without our message.
        state = Cancelled(message=message) if run.state is not None and run.state.is_scheduled() else Cancelling(message=message)
        client.set_flow_run_state(run.id, state)
    except Exception as exc:  # noqa: BLE001 -- best effort, logged; the caller re-raises its own error
        get_run_logger().warning("could not cancel flow run %s (%s): %s", run.name, reason, exc)


@flow(name="lvr-pipeline", log_prints=True, validate_parameters=True)
def lvr_pipeline(
    source: str | None = None,
    workdir: str = "runs/sample",
    config: str = "tiny",
    overrides: list[str] | None = None,
    from_stage: StageName = StageName(STAGE_NAMES[0]),
    to_stage: StageName = StageName(STAGE_NAMES[-1]),
    execution: ExecutionMode = ExecutionMode.local,
    stage_deployment: str = "lvr-{stage}",
    retry_failures: bool = False,
    allow_shrink: bool = False,
) -> dict[str, Any]:
    """Long videos to a reasoning dataset and a trained VLM: clip > caption > qa > filter > sft > grpo > eval.

    Args:
        source: Videos to process: a directory, list file, Parquet/CSV manifest or video (taken literally), or
            glob:PATTERN (local or s3://...).
            Empty: the config's `source`, else the built-in sample.
        workdir: Where every stage writes its Parquet, media and checkpoints (local path or fsspec URL).
            With `execution: deployments` every stage's worker must see it: use object storage.
        config: A built-in config name (tiny, longvila-r1) or a YAML path.
        overrides: Dotted-key overrides such as `clip.seconds=8`.
        from_stage: First stage to run (earlier stages must already be complete in the workdir).
        to_stage: Last stage to run.
        execution: `local` runs every stage in this flow run's process; `deployments` runs each stage
            as a run of its own deployment (its work pool, image and GPU request), waits for it and
            checks the stage's manifest before starting the next.
        stage_deployment: With `execution: deployments`, the deployment name of each stage's flow
            (`lvr-<stage>`); `{stage}` is replaced by the stage name.
        retry_failures: Process again the items stages recorded as failures (a flaky LLM endpoint,
            a video that was missing); finished items are kept, and stages without failures stay cached.
        allow_shrink: Accept a source that lists fewer than `clip.max_shrink` of the last complete
            run's videos (refused by default: an unmounted or half-written source would wipe the dataset).
    """
    if retry_failures:
        overrides = [*(overrides or []), "execution.retry_failures=true"]
    if allow_shrink:
        overrides = [*(overrides or []), "execution.allow_shrink=true"]
    cfg = load_config(config, overrides)
    flow_run = FlowRunContext.get()
    run_id = str(flow_run.flow_run.id) if flow_run and flow_run.flow_run else None
    mode = ExecutionMode(execution)
    if mode is ExecutionMode.deployments:
        # The source is resolved where clip runs: a default sample made here would not exist there.
        src = source or cfg.source
        parameters = {"workdir": workdir, "config": config, "overrides": overrides, "source": src}
        stage_runner = _deployment_stage_runner(parameters, stage_deployment)
    else:
        src = resolve_source(source, cfg, select_stages(_value(from_stage), _value(to_stage)))
        stage_runner = _subflow_stage_runner({"workdir": workdir, "config": config, "overrides": overrides, "source": src})

    record = run_pipeline(
        Workdir(workdir), cfg, source=src, from_stage=_value(from_stage), to_stage=_value(to_stage),
        run_id=run_id, stage_runner=stage_runner, on_stage_done=update_report,
    )
    return {"run_id": record.run_id, "results": record.results}


def _value(stage: StageName | str) -> str:
    return stage.value if isinstance(stage, StageName) else str(stage)


__all__ = ["lvr_pipeline", "STAGE_FLOWS", "STAGE_NAMES"]
