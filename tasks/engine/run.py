"""Running a stage: shard planning, resumable shard execution with item reuse, and publishing.

Every stage is a `Stage` (`tasks.engine.stage`: what to do with a shard of items); this module
owns how it is done:
a stage whose fingerprint matches a complete manifest is skipped; otherwise its items are cut
into shards, each shard's result is written atomically under `_work/shards/<key>/` with a
completion marker written last, and shards already complete are reused. Only when every shard is
done are the stage's tables published and its manifest written, so a killed run never leaves
output that a rerun would trust.

Refreshing costs what changed: the engine knows before mapping which shards are complete, so only
the others reach the mapper (a Prefect task each); items already processed keep their shards and
only new items are packed into new ones. When a stage completes, its shard folders are compacted
into one file per table (`_work/compact-<gen>/`) with an index of each shard's rows
(`_work/compact.json`), so finalizing a refresh reads that file and the new shards, not every
shard ever written.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from data_schemas import FAILURES, TableSchema, validate_table
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
COMPACT_INDEX = "compact.json"  # under `_work/`: which compacted generation holds which shard's rows
FAILURES_NAME = FAILURES_FILE.removesuffix(".parquet")


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
    # Shards whose complete result the work dir already holds: never mapped, never a task run.
    reusable: frozenset[int] = frozenset()

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


class ShardCatalog:
    """The complete shard results a stage's work dir holds, by shard key: folders written as shards
    finish (`_work/shards/<key>/`, completion marker last) and the compacted generation written
    when the stage completed (`_work/compact-<gen>/<table>.parquet`, each shard a row range listed
    in `_work/compact.json`). A folder wins over a compacted copy of the same shard: it is newer
    (a shard retried for its failures)."""

    def __init__(self, fs: Any, work: str, index: dict[str, Any], records: dict[str, dict[str, Any]], in_dirs: set[str]) -> None:
        self.fs, self.work = fs, work
        self.generation: str | None = index.get("generation")
        self.slices: dict[str, dict[str, list[int]]] = {k: e["slices"] for k, e in index.get("shards", {}).items()}
        self.records, self.in_dirs = records, in_dirs
        self._tables: dict[str, pa.Table] = {}
        self._lock = threading.Lock()

    @classmethod
    def load(cls, stage: Stage, ctx: StageContext) -> ShardCatalog:
        fs = ctx.workdir.fs
        work = ctx.stage_path(stage.name, WORK_DIR)
        index = read_json(fs, f"{work}/{COMPACT_INDEX}") or {}
        records = {key: entry["done"] for key, entry in index.get("shards", {}).items()}
        in_dirs: set[str] = set()
        root = f"{work}/shards"
        if fs.exists(root):  # after a completed stage there is none: only a run cut short leaves folders
            for shard_dir in fs.ls(root, detail=False):
                done = read_json(fs, f"{shard_dir}/{SHARD_DONE}")
                if done is not None:
                    key = shard_dir.rstrip("/").rsplit("/", 1)[-1]
                    records[key] = done
                    in_dirs.add(key)
        return cls(fs, work, index, records, in_dirs)

    def shard_dir(self, key: str) -> str:
        return f"{self.work}/shards/{key}"

    def written(self, key: str) -> None:
        """A shard this run completed in its folder."""
        self.records[key] = read_json(self.fs, f"{self.shard_dir(key)}/{SHARD_DONE}") or {}
        self.in_dirs.add(key)

    def read(self, key: str, schema: TableSchema, name: str | None = None) -> pa.Table:
        """One table of a complete shard; `name` is the file's stem (`_failures` for its failures)."""
        name = name or schema.name
        if key in self.in_dirs:
            return read_table_file(self.fs, f"{self.shard_dir(key)}/{name}.parquet", schema)
        offset, length = self.slices[key][name]
        with self._lock:
            if name not in self._tables:
                self._tables[name] = read_table_file(self.fs, f"{self.work}/compact-{self.generation}/{name}.parquet", schema)
            return self._tables[name].slice(offset, length)


def _shard_key(recipe: str, shard: Sequence[WorkItem]) -> str:
    # Content-addressed: a shard is reused whenever the same items meet the same recipe, even if
    # unrelated upstream items changed the stage fingerprint.
    return stable_hash({"recipe": recipe, "items": [it.key for it in shard]})


def plan_stage(stage: Stage, ctx: StageContext) -> StagePlan:
    return _plan(stage, ctx)[0]


def _plan(stage: Stage, ctx: StageContext) -> tuple[StagePlan, ShardCatalog | None]:
    settings = stage.settings(ctx)
    inputs = stage.input_fingerprints(ctx)
    fingerprint = stage_fingerprint(stage.name, settings, inputs, stage.code_version)
    manifest = read_manifest(ctx.workdir, stage.name)
    retry = ctx.config.execution.retry_failures
    retrying = retry and manifest is not None and manifest.get("failures", 0) > 0
    if manifest is not None and manifest.get("fingerprint") == fingerprint and not retrying:
        return StagePlan(stage.name, fingerprint, inputs, settings, cached=True), None
    items = sorted(stage.list_items(ctx), key=lambda it: it.item_id)
    size = max(1, stage.shard_size(ctx))
    recipe = stable_hash({"stage": stage.name, "code": stage.code_version, "settings": stage.shard_settings(ctx)})
    catalog = ShardCatalog.load(stage, ctx)
    if stage.item_columns:  # items are independent of their shard mates: old shards can stay as they are
        shards = _pack(items, size, recipe, catalog)
    else:
        shards = [tuple(items[i : i + size]) for i in range(0, len(items), size)]
    keys = tuple(_shard_key(recipe, shard) for shard in shards)
    reusable = frozenset(
        i for i, key in enumerate(keys)
        if (done := catalog.records.get(key)) is not None and not (retry and int(done.get("failures", 0)) > 0)
    )
    plan = StagePlan(
        stage.name, fingerprint, inputs, settings, cached=False, recipe=recipe, shards=tuple(shards), shard_keys=keys, reusable=reusable
    )
    return plan, catalog


def _pack(items: list[WorkItem], size: int, recipe: str, catalog: ShardCatalog) -> list[tuple[WorkItem, ...]]:
    """Shards for `items`: every complete shard of this recipe whose items are all still listed
    stays as it was (so its result stays valid), and the other items, in order, are cut into new
    shards of `size`. A source that gained 5 items keeps its old shards and adds one or two, wherever
    the new items sort. Without earlier shards this is plain cutting in item order."""
    by_pair = {(it.item_id, it.key): it for it in items}
    used: set[tuple[str, str]] = set()
    kept: list[tuple[WorkItem, ...]] = []
    for key in sorted(catalog.records):
        done = catalog.records[key]
        pairs = [(item_id, item_key) for item_id, item_key in done.get("item_keys", [])]
        if done.get("recipe") != recipe or not pairs or any(p not in by_pair or p in used for p in pairs):
            continue
        used.update(pairs)
        kept.append(tuple(by_pair[p] for p in pairs))
    rest = [it for it in items if (it.item_id, it.key) not in used]
    position = {it.item_id: i for i, it in enumerate(items)}
    shards = kept + [tuple(rest[i : i + size]) for i in range(0, len(rest), size)]
    return sorted(shards, key=lambda shard: position[shard[0].item_id])


def _shard_dir(ctx: StageContext, stage: Stage, key: str) -> str:
    return ctx.stage_path(stage.name, WORK_DIR, "shards", key)


def begin_stage(stage: Stage, ctx: StageContext) -> None:
    """Withdraw the old manifest before any work: from now on the stage's directory is untrusted."""
    path = ctx.stage_path(stage.name, MANIFEST)
    if ctx.workdir.fs.exists(path):
        ctx.workdir.fs.rm(path)


ItemIndex = dict[str, tuple[str, str]]  # item key -> (key of the shard holding its rows, item id there)


def build_item_index(stage: Stage, ctx: StageContext, recipe: str, catalog: ShardCatalog | None = None) -> ItemIndex:
    """Items already processed under `recipe` in any complete shard the stage's work dir holds
    (without those that failed there, when failures are being retried)."""
    index: ItemIndex = {}
    if not stage.item_columns:
        return index
    catalog = catalog or ShardCatalog.load(stage, ctx)
    retry = ctx.config.execution.retry_failures
    for key, done in catalog.records.items():
        if done.get("recipe") != recipe:
            continue
        failed = set(catalog.read(key, FAILURES, FAILURES_NAME).column("item_id").to_pylist()) if retry and done.get("failures") else set()
        for item_id, item_key in done.get("item_keys", []):
            if item_id not in failed:
                index[item_key] = (key, item_id)
    return index


def _reuse_items(stage: Stage, catalog: ShardCatalog, found: dict[str, list[str]]) -> ShardResult:
    """Rows and failures of already-processed items, read back from the shards that hold them."""
    tables: dict[str, list[pa.Table]] = {s.name: [] for s in stage.all_outputs}
    failures: list[Failure] = []
    for key, item_ids in found.items():
        wanted = pa.array(item_ids)
        for schema in stage.all_outputs:
            table = catalog.read(key, schema)
            tables[schema.name].append(table.filter(pc.is_in(table[stage.item_columns[schema.name]], value_set=wanted)))
        wanted_set = set(item_ids)
        for row in catalog.read(key, FAILURES, FAILURES_NAME).to_pylist():
            if row["item_id"] in wanted_set:
                failures.append(Failure.from_row(row))
    return ShardResult({name: pa.concat_tables(parts) for name, parts in tables.items() if parts}, failures)


def _in_item_order(table: pa.Table, column: str, order: dict[str, int]) -> pa.Table:
    """Rows grouped by item in the shard's item order (stable within an item): what a clean run writes."""
    if table.num_rows == 0:
        return table
    positions = pa.array([order.get(v, len(order)) for v in table[column].to_pylist()])
    return table.take(pc.sort_indices(pa.table({"p": positions, "i": pa.array(range(table.num_rows))}), sort_keys=[("p", "ascending"), ("i", "ascending")]))


def _process_with_reuse(
    stage: Stage, ctx: StageContext, items: list[WorkItem], item_index: ItemIndex, catalog: ShardCatalog
) -> tuple[ShardResult, int]:
    fresh = [it for it in items if it.key not in item_index]
    found: dict[str, list[str]] = {}
    for it in items:
        if it.key in item_index:
            key, old_id = item_index[it.key]
            found.setdefault(key, []).append(old_id)
    result = stage.process_shard(ctx, fresh) if fresh else ShardResult({}, [])
    if not found:
        return result, 0
    reused = _reuse_items(stage, catalog, found)
    order = {it.item_id: i for i, it in enumerate(items)}
    tables = {}
    for schema in stage.all_outputs:
        parts = [t for t in (reused.tables.get(schema.name), result.tables.get(schema.name)) if t is not None]
        combined = pa.concat_tables([validate_table(t, schema) for t in parts]) if parts else schema.empty()
        tables[schema.name] = _in_item_order(combined, stage.item_columns[schema.name], order)
    failures = sorted(reused.failures + result.failures, key=lambda f: order.get(f.item_id, len(order)))
    return ShardResult(tables, failures), len(items) - len(fresh)


def _reused_outcome(index: int, key: str, done: dict[str, Any]) -> ShardOutcome:
    return ShardOutcome(index, key, True, int(done["rows"]), int(done["failures"]), float(done["work_s"]))


def run_shard(
    stage: Stage, ctx: StageContext, plan: StagePlan, index: int, item_index: Callable[[], ItemIndex] | None = None,
    catalog: ShardCatalog | None = None,
) -> ShardOutcome:
    key = plan.shard_keys[index]
    shard_dir = _shard_dir(ctx, stage, key)
    fs = ctx.workdir.fs
    marker = f"{shard_dir}/{SHARD_DONE}"
    done = read_json(fs, marker)
    if done is None and catalog is not None and key in catalog.records and key not in catalog.in_dirs:
        done = catalog.records[key]  # compacted when the stage last completed
    retry = done is not None and ctx.config.execution.retry_failures and int(done["failures"]) > 0
    if done is not None and not retry:
        return _reused_outcome(index, key, done)
    items = list(plan.shards[index])
    started = time.perf_counter()
    index_now = item_index() if stage.item_columns and item_index is not None else None  # before this shard is withdrawn
    if retry and fs.exists(marker):
        fs.rm(marker)  # from here on the shard is incomplete, as after a crash
    if index_now is not None:
        result, items_reused = _process_with_reuse(stage, ctx, items, index_now, catalog or ShardCatalog.load(stage, ctx))
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
        marker,
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


def _item_order(plan: StagePlan) -> dict[str, int] | None:
    """Each item's position in item order, when the plan's shards do not already follow it (old
    shards kept, new items packed after them); None when they do, as in a clean run."""
    ids = [it.item_id for shard in plan.shards for it in shard]
    ordered = sorted(ids)
    return None if ids == ordered else {item_id: i for i, item_id in enumerate(ordered)}


def finalize_stage(
    stage: Stage, ctx: StageContext, plan: StagePlan, outcomes: Sequence[ShardOutcome], started_at: datetime, started: float,
    catalog: ShardCatalog | None = None,
) -> dict[str, Any]:
    fs = ctx.workdir.fs
    finalize_started = time.perf_counter()
    catalog = catalog or ShardCatalog.load(stage, ctx)
    for outcome in outcomes:
        if not outcome.reused:
            catalog.written(outcome.key)
    # Every shard's rows, in plan order: each a file of a new shard or a row range of the compacted
    # generation, so a refresh reads one file per table plus what changed.
    files = [(schema, schema.name) for schema in stage.all_outputs] + [(FAILURES, FAILURES_NAME)]
    raw: dict[str, pa.Table] = {}
    slices: dict[str, dict[str, list[int]]] = {key: {} for key in plan.shard_keys}
    for schema, name in files:
        parts, offset = [], 0
        for key in plan.shard_keys:
            part = catalog.read(key, schema, name)
            slices[key][name] = [offset, part.num_rows]
            offset += part.num_rows
            parts.append(part)
        raw[name] = pa.concat_tables(parts) if parts else schema.empty()
    tables = {schema.name: raw[schema.name] for schema in stage.all_outputs}
    failures = [Failure.from_row(r) for r in raw[FAILURES_NAME].to_pylist()]
    order = _item_order(plan)
    if order is not None:  # the rows a clean run would publish, in its order
        tables = {
            name: _in_item_order(table, stage.item_columns[name], order) if name in stage.item_columns else table
            for name, table in tables.items()
        }
        failures.sort(key=lambda f: order.get(f.item_id, len(order)))
    tables, failures = stage.finalize(ctx, tables, failures)

    table_info = {}
    for schema in stage.all_outputs:
        files_written = stage.publish_table(ctx, schema, tables[schema.name])
        directory = files_written[0].rsplit("/", 1)[0]
        table_info[schema.name] = {
            "schema": schema.name,
            "schema_version": schema.version,
            "rows": tables[schema.name].num_rows,
            "files": [f.rsplit("/", 1)[-1] for f in files_written],
            "path": directory.removeprefix(ctx.workdir.root + "/"),
        }
    write_table_atomic(fs, ctx.stage_path(stage.name, FAILURES_FILE), failures_table(stage.name, failures), FAILURES)
    _compact(stage, ctx, plan, catalog, {name: (schema, raw[name]) for schema, name in files}, slices)

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


def _compact(
    stage: Stage, ctx: StageContext, plan: StagePlan, catalog: ShardCatalog,
    raw: dict[str, tuple[TableSchema, pa.Table]], slices: dict[str, dict[str, list[int]]],
) -> None:
    """Housekeeping once every shard is done: the plan's shard results become one new generation
    (a file per table, each shard a row range in the index), written and indexed before the shard
    folders and the older generation go. A kill at any point leaves either the folders or an
    index that covers them; shards older plans left behind (another config) are dropped here."""
    fs = ctx.workdir.fs
    generation = uuid.uuid4().hex[:12]
    for name, (schema, table) in raw.items():
        write_table_atomic(fs, f"{catalog.work}/compact-{generation}/{name}.parquet", table, schema)
    shards = {key: {"done": catalog.records[key], "slices": slices[key]} for key in plan.shard_keys}
    write_json_atomic(fs, f"{catalog.work}/{COMPACT_INDEX}", {"generation": generation, "recipe": plan.recipe, "shards": shards})
    for path in fs.ls(catalog.work, detail=False):
        name = path.rstrip("/").rsplit("/", 1)[-1]
        if name == "shards" or (name.startswith("compact-") and name != f"compact-{generation}"):
            fs.rm(path, recursive=True)


class ShardWork:
    """One stage run's shard work as a callable `work(index) -> ShardOutcome`.

    In-process (serial or thread pool) it uses the live stage, so a model loaded for one shard
    serves the next. Pickled for another process (a Ray worker), it travels as plain data (stage
    name, workdir URL, config, source, plan) and rebuilds the stage there, once per process and
    recipe. Progress is recorded by whoever holds the original: `__call__` in-process, the
    dispatcher via `record` for remote runs.
    """

    def __init__(self, stage: Stage, ctx: StageContext, plan: StagePlan, catalog: ShardCatalog | None = None) -> None:
        self.stage, self.ctx, self.plan = stage, ctx, plan
        self._lock = threading.RLock()
        self._catalog = catalog
        self._item_index: ItemIndex | None = None
        self._done = len(plan.reusable)  # reused shards count as done from the start
        self._local = True

    def catalog(self) -> ShardCatalog:
        with self._lock:
            if self._catalog is None:
                self._catalog = ShardCatalog.load(self.stage, self.ctx)
            return self._catalog

    def item_index(self) -> ItemIndex:
        # Built on first need (a plan whose shards are all done never scans), then shared.
        with self._lock:
            if self._item_index is None:
                self._item_index = build_item_index(self.stage, self.ctx, self.plan.recipe, self.catalog())
            return self._item_index

    def run(self, index: int) -> ShardOutcome:
        return run_shard(self.stage, self.ctx, self.plan, index, self.item_index, self.catalog())

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
        self._lock = threading.RLock()
        self._catalog = None
        self._item_index = None
        self._done = len(self.plan.reusable)
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
    plan, catalog = _plan(stage, ctx)
    if plan.cached:
        manifest = read_manifest(ctx.workdir, stage.name)
        assert manifest is not None
        log.info("%s: cached (fingerprint %s)", stage.name, plan.fingerprint)
        return StageReport(stage.name, "cached", manifest)
    assert catalog is not None
    begin_stage(stage, ctx)
    work = ShardWork(stage, ctx, plan, catalog)
    # Shards already complete are settled here: only the others reach the mapper (a task each).
    reused = [_reused_outcome(i, plan.shard_keys[i], catalog.records[plan.shard_keys[i]]) for i in sorted(plan.reusable)]
    pending = [i for i in range(len(plan.shards)) if i not in plan.reusable]
    if ctx.progress:
        ctx.progress(len(reused), len(plan.shards))  # progress shows from the start, not after the first shard
    mapped = map_shards(work, pending) if pending else []
    outcomes = sorted([*reused, *mapped], key=lambda o: o.index)
    manifest = finalize_stage(stage, ctx, plan, outcomes, started_at, started, catalog)
    return StageReport(stage.name, "done", manifest)


