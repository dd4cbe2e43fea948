"""Running a stage: shard planning, resumable shard execution with item reuse, and publishing.

Every stage is a `Stage` (`tasks.engine.stage`: what to do with a shard of items); this module
owns how it is done:
a stage whose fingerprint matches a complete manifest is skipped; otherwise its items are cut
into shards, each shard's result is written atomically under `_work/shards/<key>/` with a
completion marker written last, and shards already complete are reused. Only when every shard is
done are the stage's tables published and its manifest written, so a killed run never leaves
output that a rerun would trust.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from data_schemas import FAILURES, validate_table
from tasks.engine.lease import StageLease
from tasks.engine.manifest import lvr_version, read_manifest, stage_fingerprint
from tasks.engine.stage import (
    ShardResult,
    Stage,
    StageContext,
    StageError,
    StageReport,
    WorkItem,
    class_path,
    load_class,
    load_stage,
)
from tasks.engine.store import (
    FAILURES_FILE,
    MANIFEST,
    WORK_DIR,
    Failure,
    Workdir,
    failures_table,
    read_json,
    read_table_file,
    stable_hash,
    write_json_atomic,
    write_table_atomic,
)

log = logging.getLogger("lvr.stage")

SHARD_DONE = "_done.json"


@dataclass(frozen=True)
class StagePlan:
    stage: str
    fingerprint: str
    input_fingerprints: dict[str, str]
    settings: dict[str, Any]
    cached: bool
    recipe: str = ""  # hash of what turns an item into rows: stage, code version, shard settings
    shards: tuple[tuple[WorkItem, ...], ...] = ()
    shard_keys: tuple[str, ...] = ()

    @property
    def n_items(self) -> int:
        return sum(len(s) for s in self.shards)


@dataclass(frozen=True)
class ShardOutcome:
    index: int
    key: str
    reused: bool
    rows: int
    failures: int
    work_s: float
    items_reused: int = 0
    items_computed: int = 0


def plan_stage(stage: Stage, ctx: StageContext) -> StagePlan:
    settings = stage.settings(ctx)
    inputs = stage.input_fingerprints(ctx)
    fingerprint = stage_fingerprint(stage.name, settings, inputs, stage.code_version)
    manifest = read_manifest(ctx.workdir, stage.name)
    retrying = ctx.config.execution.retry_failures and manifest is not None and manifest.get("failures", 0) > 0
    if manifest is not None and manifest.get("fingerprint") == fingerprint and not retrying:
        return StagePlan(stage.name, fingerprint, inputs, settings, cached=True)
    items = sorted(stage.list_items(ctx), key=lambda it: it.item_id)
    size = max(1, stage.shard_size(ctx))
    shards = tuple(tuple(items[i : i + size]) for i in range(0, len(items), size))
    recipe = stable_hash({"stage": stage.name, "code": stage.code_version, "settings": stage.shard_settings(ctx)})
    # Content-addressed shard keys: a shard is reused whenever the same items meet the same
    # recipe, even if unrelated upstream items changed the stage fingerprint.
    keys = tuple(stable_hash({"recipe": recipe, "items": [it.key for it in shard]}) for shard in shards)
    return StagePlan(stage.name, fingerprint, inputs, settings, cached=False, recipe=recipe, shards=shards, shard_keys=keys)


def _shard_dir(ctx: StageContext, stage: Stage, key: str) -> str:
    return ctx.stage_path(stage.name, WORK_DIR, "shards", key)


def begin_stage(stage: Stage, ctx: StageContext) -> None:
    """Withdraw the old manifest before any work: from now on the stage's directory is untrusted."""
    path = ctx.stage_path(stage.name, MANIFEST)
    if ctx.workdir.fs.exists(path):
        ctx.workdir.fs.rm(path)


ItemIndex = dict[str, tuple[str, str]]  # item key -> (shard dir holding its rows, item id there)


def build_item_index(stage: Stage, ctx: StageContext, recipe: str) -> ItemIndex:
    """Items already processed under `recipe` in any complete shard left in the stage's work dir
    (without those that failed there, when failures are being retried)."""
    fs = ctx.workdir.fs
    root = ctx.stage_path(stage.name, WORK_DIR, "shards")
    index: ItemIndex = {}
    if not stage.item_columns or not fs.exists(root):
        return index
    for shard_dir in fs.ls(root, detail=False):
        done = read_json(fs, f"{shard_dir}/{SHARD_DONE}")
        if done is None or done.get("recipe") != recipe:
            continue
        failed = _failed_item_ids(fs, shard_dir) if ctx.config.execution.retry_failures and done.get("failures") else set()
        for item_id, key in done.get("item_keys", []):
            if item_id not in failed:
                index[key] = (shard_dir, item_id)
    return index


def _failed_item_ids(fs, shard_dir: str) -> set[str]:
    return set(read_table_file(fs, f"{shard_dir}/{FAILURES_FILE}", FAILURES).column("item_id").to_pylist())


def _reuse_items(stage: Stage, ctx: StageContext, found: dict[str, list[str]]) -> ShardResult:
    """Rows and failures of already-processed items, read back from the shards that hold them."""
    fs = ctx.workdir.fs
    tables: dict[str, list[pa.Table]] = {s.name: [] for s in stage.all_outputs}
    failures: list[Failure] = []
    for shard_dir, item_ids in found.items():
        wanted = pa.array(item_ids)
        for schema in stage.all_outputs:
            table = read_table_file(fs, f"{shard_dir}/{schema.name}.parquet", schema)
            tables[schema.name].append(table.filter(pc.is_in(table[stage.item_columns[schema.name]], value_set=wanted)))
        wanted_set = set(item_ids)
        for row in read_table_file(fs, f"{shard_dir}/{FAILURES_FILE}", FAILURES).to_pylist():
            if row["item_id"] in wanted_set:
                failures.append(Failure.from_row(row))
    return ShardResult({name: pa.concat_tables(parts) for name, parts in tables.items() if parts}, failures)


def _in_item_order(table: pa.Table, column: str, order: dict[str, int]) -> pa.Table:
    """Rows grouped by item in the shard's item order (stable within an item): what a clean run writes."""
    if table.num_rows == 0:
        return table
    positions = pa.array([order.get(v, len(order)) for v in table[column].to_pylist()])
    return table.take(pc.sort_indices(pa.table({"p": positions, "i": pa.array(range(table.num_rows))}), sort_keys=[("p", "ascending"), ("i", "ascending")]))


def _process_with_reuse(stage: Stage, ctx: StageContext, items: list[WorkItem], item_index: ItemIndex) -> tuple[ShardResult, int]:
    fresh = [it for it in items if it.key not in item_index]
    found: dict[str, list[str]] = {}
    for it in items:
        if it.key in item_index:
            shard_dir, old_id = item_index[it.key]
            found.setdefault(shard_dir, []).append(old_id)
    result = stage.process_shard(ctx, fresh) if fresh else ShardResult({}, [])
    if not found:
        return result, 0
    reused = _reuse_items(stage, ctx, found)
    order = {it.item_id: i for i, it in enumerate(items)}
    tables = {}
    for schema in stage.all_outputs:
        parts = [t for t in (reused.tables.get(schema.name), result.tables.get(schema.name)) if t is not None]
        combined = pa.concat_tables([validate_table(t, schema) for t in parts]) if parts else schema.empty()
        tables[schema.name] = _in_item_order(combined, stage.item_columns[schema.name], order)
    failures = sorted(reused.failures + result.failures, key=lambda f: order.get(f.item_id, len(order)))
    return ShardResult(tables, failures), len(items) - len(fresh)


def run_shard(
    stage: Stage, ctx: StageContext, plan: StagePlan, index: int, item_index: Callable[[], ItemIndex] | None = None
) -> ShardOutcome:
    key = plan.shard_keys[index]
    shard_dir = _shard_dir(ctx, stage, key)
    fs = ctx.workdir.fs
    done = read_json(fs, f"{shard_dir}/{SHARD_DONE}")
    retry = done is not None and ctx.config.execution.retry_failures and int(done["failures"]) > 0
    if done is not None and not retry:
        return ShardOutcome(index, key, True, int(done["rows"]), int(done["failures"]), float(done["work_s"]))
    items = list(plan.shards[index])
    started = time.perf_counter()
    index_now = item_index() if stage.item_columns and item_index is not None else None  # before this shard is withdrawn
    if retry:
        fs.rm(f"{shard_dir}/{SHARD_DONE}")  # from here on the shard is incomplete, as after a crash
    if index_now is not None:
        result, items_reused = _process_with_reuse(stage, ctx, items, index_now)
    else:
        result, items_reused = stage.process_shard(ctx, items), 0
    work_s = time.perf_counter() - started
    unknown = set(result.tables) - {s.name for s in stage.all_outputs}
    if unknown:
        raise StageError(f"stage {stage.name!r} returned unknown table(s) {sorted(unknown)}")
    for schema in stage.all_outputs:
        table = result.tables.get(schema.name, schema.empty())
        write_table_atomic(fs, f"{shard_dir}/{schema.name}.parquet", table, schema)
    write_table_atomic(fs, f"{shard_dir}/{FAILURES_FILE}", failures_table(stage.name, result.failures), FAILURES)
    rows = result.tables.get(stage.output.name, stage.output.empty()).num_rows
    write_json_atomic(
        fs,
        f"{shard_dir}/{SHARD_DONE}",
        {
            "rows": rows, "failures": len(result.failures), "work_s": work_s, "recipe": plan.recipe,
            "items_reused": items_reused, "item_keys": [[it.item_id, it.key] for it in items],
        },
    )
    log.info(
        "%s shard %d/%d: %d rows, %d failures, %d items reused, in %.2fs",
        stage.name, index + 1, len(plan.shards), rows, len(result.failures), items_reused, work_s,
    )
    return ShardOutcome(index, key, False, rows, len(result.failures), work_s, items_reused, len(items) - items_reused)


def finalize_stage(
    stage: Stage, ctx: StageContext, plan: StagePlan, outcomes: Sequence[ShardOutcome], started_at: datetime, started: float
) -> dict[str, Any]:
    fs = ctx.workdir.fs
    finalize_started = time.perf_counter()
    tables: dict[str, pa.Table] = {}
    for schema in stage.all_outputs:
        parts = [read_table_file(fs, f"{_shard_dir(ctx, stage, k)}/{schema.name}.parquet", schema) for k in plan.shard_keys]
        tables[schema.name] = pa.concat_tables(parts) if parts else schema.empty()
    failure_parts = [read_table_file(fs, f"{_shard_dir(ctx, stage, k)}/{FAILURES_FILE}", FAILURES) for k in plan.shard_keys]
    failures = [
        Failure.from_row(r)
        for part in failure_parts
        for r in part.to_pylist()
    ]
    tables, failures = stage.finalize(ctx, tables, failures)

    table_info = {}
    for schema in stage.all_outputs:
        files = stage.publish_table(ctx, schema, tables[schema.name])
        directory = files[0].rsplit("/", 1)[0]
        table_info[schema.name] = {
            "schema": schema.name,
            "schema_version": schema.version,
            "rows": tables[schema.name].num_rows,
            "files": [f.rsplit("/", 1)[-1] for f in files],
            "path": directory.removeprefix(ctx.workdir.root + "/"),
        }
    write_table_atomic(fs, ctx.stage_path(stage.name, FAILURES_FILE), failures_table(stage.name, failures), FAILURES)
    _collect_garbage(stage, ctx, plan)

    finalize_s = time.perf_counter() - finalize_started
    manifest = {
        "stage": stage.name,
        "status": "complete",
        "fingerprint": plan.fingerprint,
        "input_fingerprints": plan.input_fingerprints,
        "config": plan.settings,
        "code_version": stage.code_version,
        "lvr_version": lvr_version(),
        "schema": {"name": stage.output.name, "version": stage.output.version},
        "tables": table_info,
        "rows": tables[stage.output.name].num_rows,
        "failures": len(failures),
        # Which items failed (a digest): part of what downstream stages build on (`output_identity`).
        "failed_items": stable_hash(sorted({f.item_id for f in failures})) if failures else None,
        "items": plan.n_items,
        "shards": {"total": len(outcomes), "reused": sum(o.reused for o in outcomes)},
        # Items whose work was done by this run; the others came from earlier shards or runs.
        "items_computed": sum(o.items_computed for o in outcomes),
        # Work time sums each shard's own processing time (as first measured, also for reused
        # shards) and the publishing step: orchestration overhead is deliberately excluded.
        "work_time_s": round(sum(o.work_s for o in outcomes) + finalize_s, 4),
        "wall_time_s": round(time.perf_counter() - started, 4),
        "started_at": started_at.isoformat(),
        "finished_at": datetime.now(timezone.utc).isoformat(),
    }
    write_json_atomic(fs, ctx.stage_path(stage.name, MANIFEST), manifest)
    return manifest


def _collect_garbage(stage: Stage, ctx: StageContext, plan: StagePlan) -> None:
    """Drop shard results the current plan no longer references (older configs' leftovers)."""
    fs = ctx.workdir.fs
    root = ctx.stage_path(stage.name, WORK_DIR, "shards")
    if not fs.exists(root):
        return
    keep = set(plan.shard_keys)
    for path in fs.ls(root, detail=False):
        if path.rstrip("/").rsplit("/", 1)[-1] not in keep:
            fs.rm(path, recursive=True)


class ShardWork:
    """One stage run's shard work as a callable `work(index) -> ShardOutcome`.

    In-process (serial or thread pool) it uses the live stage, so a model loaded for one shard
    serves the next. Pickled for another process (a Ray worker), it travels as plain data (stage
    name, workdir URL, config, source, plan) and rebuilds the stage there, once per process and
    recipe. Progress is recorded by whoever holds the original: `__call__` in-process, the
    dispatcher via `record` for remote runs.
    """

    def __init__(self, stage: Stage, ctx: StageContext, plan: StagePlan) -> None:
        self.stage, self.ctx, self.plan = stage, ctx, plan
        self._lock = threading.Lock()
        self._item_index: ItemIndex | None = None
        self._done = 0
        self._local = True

    def item_index(self) -> ItemIndex:
        # Built on first need (a plan whose shards are all done never scans), then shared.
        with self._lock:
            if self._item_index is None:
                self._item_index = build_item_index(self.stage, self.ctx, self.plan.recipe)
            return self._item_index

    def run(self, index: int) -> ShardOutcome:
        return run_shard(self.stage, self.ctx, self.plan, index, self.item_index)

    def __call__(self, index: int) -> ShardOutcome:
        outcome = self.run(index)
        if self._local:
            self.record(outcome)
        return outcome

    def record(self, outcome: ShardOutcome) -> None:
        with self._lock:
            self._done += 1
            done = self._done
        if self.ctx.progress:
            self.ctx.progress(done, len(self.plan.shards))

    def __getstate__(self) -> dict[str, Any]:
        return {
            "stage": class_path(self.stage), "workdir": self.ctx.workdir.url, "config_class": class_path(self.ctx.config),
            "config": self.ctx.config.model_dump(mode="json"), "source": self.ctx.source, "plan": self.plan,
        }

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.stage = _process_stage(state["stage"], state["plan"].recipe)
        config_class = load_class(state["config_class"])
        self.ctx = StageContext(Workdir(state["workdir"]), config_class.model_validate(state["config"]), state["source"])
        self.plan = state["plan"]
        self._lock = threading.Lock()
        self._item_index = None
        self._done = 0
        self._local = False


_PROCESS_STAGES: dict[tuple[str, str], Stage] = {}
_PROCESS_STAGES_LOCK = threading.Lock()


def _process_stage(path: str, recipe: str) -> Stage:
    """One stage instance per worker process and recipe, so its model loads once per process."""
    with _PROCESS_STAGES_LOCK:
        if (path, recipe) not in _PROCESS_STAGES:
            _PROCESS_STAGES[(path, recipe)] = load_stage(path)
        return _PROCESS_STAGES[(path, recipe)]



ShardMapper = Callable[[ShardWork, list[int]], list[ShardOutcome]]


def serial_map(work: ShardWork, indices: list[int]) -> list[ShardOutcome]:
    return [work(i) for i in indices]


def run_stage(stage: Stage, ctx: StageContext, map_shards: ShardMapper = serial_map) -> StageReport:
    """Plan, run the shards (via `map_shards`, e.g. Prefect tasks) and publish; or report cached.
    The stage's lease is held throughout: no other run plans, writes or collects in it meanwhile."""
    execution = ctx.config.execution
    owner = ctx.run_id or f"{socket.gethostname()}:{os.getpid()}"
    with StageLease(ctx.workdir, stage.name, owner, wait=execution.wait_for_lock, stale_s=execution.lock_stale_s):
        return _run_stage(stage, ctx, map_shards)


def _run_stage(stage: Stage, ctx: StageContext, map_shards: ShardMapper) -> StageReport:
    started_at = datetime.now(timezone.utc)
    started = time.perf_counter()
    plan = plan_stage(stage, ctx)
    if plan.cached:
        manifest = read_manifest(ctx.workdir, stage.name)
        assert manifest is not None
        log.info("%s: cached (fingerprint %s)", stage.name, plan.fingerprint)
        return StageReport(stage.name, "cached", manifest)
    begin_stage(stage, ctx)
    work = ShardWork(stage, ctx, plan)
    if ctx.progress:
        ctx.progress(0, len(plan.shards))  # progress shows from the start, not after the first shard
    outcomes = sorted(map_shards(work, list(range(len(plan.shards)))), key=lambda o: o.index)
    manifest = finalize_stage(stage, ctx, plan, outcomes, started_at, started)
    return StageReport(stage.name, "done", manifest)


