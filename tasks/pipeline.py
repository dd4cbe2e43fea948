"""The DAG as plain functions: stage selection, sequential execution, run records and status.

`flows/pipeline.py` wraps this in Prefect; tests and `lvr run --engine local` call it directly.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from tasks.artifacts import MANIFEST, WORK_DIR, Workdir, read_json, stable_hash, write_json_atomic
from tasks.config import STAGE_ORDER, PipelineConfig, cache_dir
from tasks.registry import get_stage
from tasks.report import update_report
from tasks.stage import StageContext, StageError, StageReport, output_identity, read_manifest, run_stage

log = logging.getLogger("lvr.pipeline")

RUNS_DIR = "_runs"
LATEST_RUN = "latest.json"


def resolve_source(source: str | None, config: PipelineConfig) -> str:
    """The explicit source, else the config's, else the built-in sample (generated on first use)."""
    if source:
        return source
    if config.source:
        return config.source
    from tasks.sample_videos import write_sample_videos

    directory = cache_dir() / "sample-videos"
    write_sample_videos(directory)
    return str(directory)


def select_stages(from_stage: str | None = None, to_stage: str | None = None) -> list[str]:
    first = STAGE_ORDER.index(from_stage) if from_stage else 0
    last = STAGE_ORDER.index(to_stage) if to_stage else len(STAGE_ORDER) - 1
    if first > last:
        raise ValueError(f"--from {from_stage} comes after --to {to_stage}; stages run in order {' > '.join(STAGE_ORDER)}")
    return list(STAGE_ORDER[first : last + 1])


@dataclass
class RunRecord:
    """What one pipeline run did, stage by stage: the source of `lvr status`'s done/cached/failed."""

    run_id: str
    workdir: str
    stages: list[str]
    started_at: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat())
    finished_at: str | None = None
    status: str = "running"
    results: dict[str, dict[str, Any]] = field(default_factory=dict)

    def save(self, workdir: Workdir) -> None:
        data = self.__dict__.copy()
        write_json_atomic(workdir.fs, workdir.path(RUNS_DIR, f"{self.run_id}.json"), data)
        write_json_atomic(workdir.fs, workdir.path(RUNS_DIR, LATEST_RUN), data)


StageRunner = Callable[[str, StageContext], StageReport]


def run_stage_by_name(name: str, ctx: StageContext) -> StageReport:
    return run_stage(get_stage(name), ctx)


def run_pipeline(
    workdir: Workdir,
    config: PipelineConfig,
    source: str | None = None,
    from_stage: str | None = None,
    to_stage: str | None = None,
    run_id: str | None = None,
    stage_runner: StageRunner = run_stage_by_name,
) -> RunRecord:
    """Run the selected stages in order; stop at the first failure, recording it."""
    stages = select_stages(from_stage, to_stage)
    record = RunRecord(run_id or uuid.uuid4().hex[:12], workdir.url, stages)
    workdir.makedirs()
    record.save(workdir)
    ctx = StageContext(workdir=workdir, config=config, source=source)
    try:
        for name in stages:
            try:
                report = stage_runner(name, ctx)
            except Exception as exc:
                record.results[name] = {"status": "failed", "message": f"{type(exc).__name__}: {exc}"}
                raise
            record.results[name] = {
                "status": report.status,
                "rows": report.rows,
                "failures": report.failures,
                "fingerprint": report.manifest["fingerprint"],
                "wall_time_s": report.manifest.get("wall_time_s"),
            }
            record.save(workdir)
            update_report(workdir)
        record.status = "completed"
    except BaseException:
        record.status = "failed"
        raise
    finally:
        record.finished_at = datetime.now(timezone.utc).isoformat()
        record.save(workdir)
        update_report(workdir)  # a failed run's report shows where it stopped
    return record


def check_stage_manifest(name: str, ctx: StageContext) -> dict[str, Any]:
    """The stage's manifest, after checking it is the output of *this* run's recipe.

    When a stage ran somewhere else (its own deployment, image and machine), a manifest alone
    proves only that something finished there. Before the next stage builds on it, the stage's
    settings, code version and upstream fingerprints must be those this process would have used:
    a stale image, a worker that sees another copy of the workdir, or a config that differs
    between images all fail here instead of silently mixing datasets.
    """
    stage = get_stage(name)
    where = ctx.workdir.uri(name, MANIFEST)
    manifest = read_manifest(ctx.workdir, name)
    if manifest is None:
        raise StageError(
            f"{name}: the stage's run ended but {where} is missing or incomplete; the stage's worker must see the "
            "same workdir as this flow (use shared storage such as s3://... for the workdir)"
        )
    problems = []
    if manifest.get("code_version") != stage.code_version:
        problems.append(f"code version {manifest.get('code_version')!r} where this flow has {stage.code_version!r} (image out of date?)")
    expected = stage.settings(ctx)  # hashed as the manifest's JSON copy was written: tuples as lists
    recorded = manifest.get("config") or {}
    if stable_hash(recorded) != stable_hash(expected):
        keys = sorted(k for k in set(recorded) | set(expected) if stable_hash(recorded.get(k)) != stable_hash(expected.get(k)))
        problems.append(f"settings differ in {', '.join(keys) or 'their structure'}")
    for upstream in stage.inputs:
        upstream_manifest = read_manifest(ctx.workdir, upstream)
        got = manifest.get("input_fingerprints", {}).get(upstream)
        if upstream_manifest is None or got != output_identity(upstream_manifest):
            problems.append(f"it was built on {upstream} {got}, not on the {upstream} output now in the workdir")
    if problems:
        raise StageError(f"{name}: {where} is not the output this run asked for: " + "; ".join(problems))
    return manifest


@dataclass(frozen=True)
class StageStatus:
    stage: str
    status: str  # done | cached | failed | incomplete | missing
    rows: int | None = None
    failures: int | None = None
    wall_time_s: float | None = None
    work_time_s: float | None = None
    finished_at: str | None = None
    message: str = ""


def workdir_status(workdir: Workdir) -> list[StageStatus]:
    latest = read_json(workdir.fs, workdir.path(RUNS_DIR, LATEST_RUN)) or {}
    results: dict[str, dict[str, Any]] = latest.get("results", {})
    statuses = []
    for name in STAGE_ORDER:
        manifest = read_manifest(workdir, name)
        last = results.get(name, {})
        if manifest is not None:
            status = "cached" if last.get("status") == "cached" else "done"
            statuses.append(
                StageStatus(
                    name,
                    status,
                    rows=manifest.get("rows"),
                    failures=manifest.get("failures"),
                    wall_time_s=manifest.get("wall_time_s"),
                    work_time_s=manifest.get("work_time_s"),
                    finished_at=manifest.get("finished_at"),
                )
            )
        elif last.get("status") == "failed":
            statuses.append(StageStatus(name, last["status"], message=last.get("message", "")))
        elif workdir.exists(name, WORK_DIR) or workdir.exists(name, MANIFEST):
            statuses.append(StageStatus(name, "incomplete", message="started but not finished; rerun to resume"))
        else:
            statuses.append(StageStatus(name, "missing"))
    return statuses
