"""Runs of several stages: one after another, with a run record per run and the workdir's status.

`tasks.pipeline` picks the stages (from the stage list); `flows/pipeline.py` wraps a run in
Prefect; tests and `lvr run --engine local` call it directly. Whatever watches a run (the HTML
report, Prefect artifacts) is handed in as `on_stage_done`: the engine knows no observer.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from tasks.engine.manifest import output_identity, read_manifest
from tasks.engine.stage import Stage, StageContext, StageError, StageReport
from tasks.engine.store import (
    MANIFEST,
    WORK_DIR,
    Workdir,
    read_json,
    stable_hash,
    write_json_atomic,
)

log = logging.getLogger("lvr.pipeline")

RUNS_DIR = "_runs"
LATEST_RUN = "latest.json"


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
StageObserver = Callable[[Workdir], object]


def run_stages(
    workdir: Workdir,
    config: Any,
    stages: Sequence[str],
    stage_runner: StageRunner,
    source: str | None = None,
    run_id: str | None = None,
    on_stage_done: StageObserver | None = None,
) -> RunRecord:
    """Run `stages` in order with `stage_runner`; stop at the first failure, recording it.
    `on_stage_done(workdir)` is called after each stage and once at the end, failed or not."""
    record = RunRecord(run_id or uuid.uuid4().hex[:12], workdir.url, list(stages))
    workdir.makedirs()
    record.save(workdir)
    ctx = StageContext(workdir=workdir, config=config, source=source, run_id=record.run_id)
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
            if on_stage_done:
                on_stage_done(workdir)
        record.status = "completed"
    except BaseException:
        record.status = "failed"
        raise
    finally:
        record.finished_at = datetime.now(timezone.utc).isoformat()
        record.save(workdir)
        if on_stage_done:
            on_stage_done(workdir)  # a failed run's report shows where it stopped
    return record


def check_stage_manifest(stage: Stage, ctx: StageContext) -> dict[str, Any]:
    """The stage's manifest, after checking it is the output of *this* run's recipe.

    When a stage ran somewhere else (its own deployment, image and machine), a manifest alone
    proves only that something finished there. Before the next stage builds on it, the stage's
    settings, code version and upstream fingerprints must be those this process would have used:
    a stale image, a worker that sees another copy of the workdir, or a config that differs
    between images all fail here instead of silently mixing datasets.
    """
    name = stage.name
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


def workdir_status(workdir: Workdir, stages: Sequence[str]) -> list[StageStatus]:
    """Each of `stages` (in order) as the workdir holds it and as the latest run left it."""
    latest = read_json(workdir.fs, workdir.path(RUNS_DIR, LATEST_RUN)) or {}
    results: dict[str, dict[str, Any]] = latest.get("results", {})
    statuses = []
    for name in stages:
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
