"""Refreshing costs what changed: reused shards never reach the mapper (a Prefect task each),
new items are packed into new shards, finalizing reads the compacted generation, and progress
updates to costly front ends are throttled; the documented Prefect history retention is
what Prefect reads."""

from __future__ import annotations

import json
import os
from typing import ClassVar

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data_schemas import TableSchema
from tasks.config import load_config
from tasks.engine.progress import InBackground, Throttled, engine_progress
from tasks.engine.run import run_stage, serial_map
from tasks.engine.stage import ShardResult, Stage, StageContext, WorkItem
from tasks.engine.store import Failure, Workdir, read_dataset

ROWS = TableSchema("rows", 1, pa.schema([pa.field("item", pa.string(), nullable=False), pa.field("value", pa.int64(), nullable=False)]))


class ItemStage(Stage):
    """Two rows per number (n, 10n); multiples of 7 fail while `down`; items are independent."""

    name = "clip"
    code_version = "1"
    output = ROWS
    item_columns: ClassVar[dict[str, str]] = {ROWS.name: "item"}

    def __init__(self, numbers, down: bool = True, crash_on=(), tag: str = "a"):
        self.numbers, self.down, self.crash_on, self.tag = list(numbers), down, set(crash_on), tag
        self.processed: list[int] = []

    def shard_size(self, ctx):
        return 3

    def settings(self, ctx):
        return {"tag": self.tag}  # in the fingerprint, not in the shard recipe

    def shard_settings(self, ctx):
        return {}

    def input_fingerprints(self, ctx):
        return {"source": ",".join(map(str, self.numbers))}

    def list_items(self, ctx):
        return [WorkItem(f"v{n:03d}", key=f"k{n}", payload={"n": n}) for n in self.numbers]

    def process_shard(self, ctx, items):
        rows, failures = [], []
        for it in items:
            n = it.payload["n"]
            if n in self.crash_on:
                raise RuntimeError(f"crash at {n}")
            self.processed.append(n)
            if self.down and n and n % 7 == 0:
                failures.append(Failure(it.item_id, "seven", f"{n}"))
            else:
                rows += [{"item": it.item_id, "value": n}, {"item": it.item_id, "value": 10 * n}]
        return ShardResult({ROWS.name: ROWS.from_rows(rows)}, failures)


class CountingMapper:
    def __init__(self):
        self.calls: list[list[int]] = []

    def __call__(self, work, indices):
        self.calls.append(list(indices))
        return serial_map(work, indices)

    @property
    def mapped(self) -> int:
        return sum(len(c) for c in self.calls)


def _ctx(tmp_path, name="wd"):
    return StageContext(workdir=Workdir(str(tmp_path / name)), config=load_config("tiny"))


EVEN = range(0, 20, 2)  # 10 items: 4 shards of 3


def test_refresh_maps_only_new_shards_and_publishes_what_a_clean_run_does(tmp_path):
    ctx = _ctx(tmp_path)
    first = CountingMapper()
    run_stage(ItemStage(EVEN), ctx, first)
    assert first.mapped == 4
    assert not (tmp_path / "wd" / "clip" / "_work" / "shards").exists()  # compacted

    grown = [*EVEN, 1, 7, 19]  # sort between the old items: plain cutting would change every shard
    stage, mapper = ItemStage(grown), CountingMapper()
    report = run_stage(stage, ctx, mapper)
    assert mapper.calls == [[mapper.calls[0][0]]]  # one task: the new items' shard
    assert sorted(stage.processed) == [1, 7, 19]
    assert report.manifest["shards"] == {"total": 5, "reused": 4} and report.manifest["items_computed"] == 3

    clean_ctx = _ctx(tmp_path, "clean")
    clean = run_stage(ItemStage(grown), clean_ctx)
    assert read_dataset(ctx.workdir.fs, ctx.workdir.path("clip"), ROWS).equals(
        read_dataset(clean_ctx.workdir.fs, clean_ctx.workdir.path("clip"), ROWS)
    )
    failures = [pq.read_table(tmp_path / d / "clip" / "_failures.parquet") for d in ("wd", "clean")]
    assert failures[0].equals(failures[1]) and report.failures == clean.failures == 2  # 7 and 14

    # A rerun whose fingerprint changed but whose shards did not maps nothing at all.
    idle = CountingMapper()
    again = run_stage(ItemStage(grown, tag="b"), ctx, idle)
    assert again.status == "done" and idle.calls == [] and again.manifest["shards"]["reused"] == 5
    assert read_dataset(ctx.workdir.fs, ctx.workdir.path("clip"), ROWS).equals(
        read_dataset(clean_ctx.workdir.fs, clean_ctx.workdir.path("clip"), ROWS)
    )


def test_removed_items_leave_their_shard_mates_reused_not_recomputed(tmp_path):
    ctx = _ctx(tmp_path)
    run_stage(ItemStage(EVEN), ctx)
    stage, mapper = ItemStage([n for n in EVEN if n != 2]), CountingMapper()  # 2 shared a shard with 0 and 4
    report = run_stage(stage, ctx, mapper)
    assert stage.processed == [] and mapper.mapped == 1  # 0 and 4 copied from the compacted generation
    assert report.rows == 2 * 8 and report.failures == 1
    index = json.loads((tmp_path / "wd" / "clip" / "_work" / "compact.json").read_text())
    assert len(index["shards"]) == 4 and len(list((tmp_path / "wd" / "clip" / "_work").glob("compact-*"))) == 1


def test_crash_during_refresh_then_rerun_maps_only_what_is_missing(tmp_path):
    ctx = _ctx(tmp_path)
    run_stage(ItemStage(EVEN), ctx)
    grown = [*EVEN, 1, 3, 5, 21, 23, 25]  # two new shards: (1, 3, 5) and (21, 23, 25)
    with pytest.raises(RuntimeError, match="crash at 21"):
        run_stage(ItemStage(grown, crash_on={21}), ctx)
    stage, mapper = ItemStage(grown), CountingMapper()
    report = run_stage(stage, ctx, mapper)
    assert mapper.mapped == 1 and sorted(stage.processed) == [21, 23, 25]
    assert report.manifest["shards"] == {"total": 6, "reused": 5} and report.rows == 2 * 14


def test_retry_failures_maps_only_shards_with_failures_from_the_compacted_generation(tmp_path):
    ctx = _ctx(tmp_path)
    run_stage(ItemStage(EVEN), ctx)  # 14 fails: shard (12, 14, 16)
    ctx.config.execution.retry_failures = True
    stage, mapper = ItemStage(EVEN, down=False), CountingMapper()
    report = run_stage(stage, ctx, mapper)
    assert mapper.mapped == 1 and stage.processed == [14]  # 12 and 16 copied
    assert report.failures == 0 and report.rows == 20


class Recorder:
    """A progress display that records what it is told."""

    def __init__(self, calls: list):
        self.calls = calls

    def start(self, stage, total, unit="shards"):
        self.calls.append(("start", total))

    def advance(self, n=1):
        self.calls.append(("advance", n))

    def finish(self):
        self.calls.append(("finish",))


def test_progress_starts_with_reused_shards_done():
    calls = []

    callback = engine_progress(Recorder(calls), "clip")
    callback(4, 5)  # what the engine reports first on a refresh: 4 of 5 shards reused
    callback(5, 5)
    assert calls == [("start", 5), ("advance", 4), ("advance", 1), ("finish",)]


def test_throttled_progress_passes_at_most_one_advance_per_interval_and_the_finish():
    calls, now = [], [0.0]

    throttled = Throttled(Recorder(calls), interval_s=1.0, clock=lambda: now[0])
    callback = engine_progress(throttled, "clip")
    callback(0, 600)
    for done in range(1, 601):
        now[0] = done * 0.01  # 600 shards in 6 s
        callback(done, 600)
    advances = [c for c in calls if c[0] == "advance"]
    assert calls[0] == ("start", 600) and calls[-1] == ("finish",)
    assert len(advances) <= 6 and sum(n for _, n in advances) <= 600


def test_background_progress_never_waits_for_a_slow_front_end_and_finish_delivers_everything():
    import contextvars
    import threading

    calls, release, seen_context = [], threading.Event(), []
    marker = contextvars.ContextVar("marker", default=None)

    class Slow(Recorder):
        def start(self, stage, total, unit="shards"):
            seen_context.append(marker.get())  # the caller's context, on the reporter's thread
            assert release.wait(10)  # an HTTP call that takes its time
            super().start(stage, total, unit)

        def advance(self, n=1):
            if n == 99:
                raise RuntimeError("the API is away")  # logged, not raised into the shard
            super().advance(n)

    background = InBackground(Slow(calls))
    marker.set("flow run")
    background.start("clip", 10)
    for _ in range(7):
        background.advance(1)  # returns at once: the start is still in flight
    assert calls == [] and threading.current_thread() is threading.main_thread()
    release.set()
    background.finish()
    assert seen_context == ["flow run"]
    assert calls[0] == ("start", 10) and calls[-1] == ("finish",)
    assert sum(n for name, *rest in calls if name == "advance" for n in rest) == 7
    assert len([c for c in calls if c[0] == "advance"]) <= 2  # queued advances were summed
    assert background._thread is None  # finished: its thread ended
    background.advance(99)
    background.finish()
    assert calls[-1] == ("finish",) and len([c for c in calls if c[0] == "finish"]) == 2


def test_quick_shards_share_a_prefect_task_without_starving_workers():
    from flows.pipeline import shards_per_task

    assert shards_per_task(None, 5.0, 600, 1) == 1  # a shard's time is not known yet
    assert shards_per_task(0.25, 5.0, 600, 1) == 20  # about 5 s of work per task
    assert shards_per_task(0.25, 5.0, 10, 4) == 3  # every worker still gets shards
    assert shards_per_task(30.0, 5.0, 600, 1) == 1 and shards_per_task(0.25, None, 600, 1) == 1


def test_documented_prefect_retention_settings_are_what_prefect_reads(monkeypatch):
    import re
    from datetime import timedelta
    from pathlib import Path

    from prefect.settings import Settings

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    documented = dict(re.findall(r"`(PREFECT_SERVER_SERVICES_DB_VACUUM_\w+)=([\w,]+)`", readme))
    assert set(documented) == {"PREFECT_SERVER_SERVICES_DB_VACUUM_ENABLED", "PREFECT_SERVER_SERVICES_DB_VACUUM_RETENTION_PERIOD"}
    for name, value in documented.items():
        monkeypatch.setenv(name, value)
    vacuum = Settings().server.services.db_vacuum
    assert "flow_runs" in vacuum.enabled_vacuum_types and vacuum.retention_period == timedelta(days=14)


def test_local_history_is_pruned_at_most_hourly(tmp_path):
    from datetime import timedelta

    from flows.history import prune_due

    stamp = tmp_path / "lvr-history-pruned"
    assert prune_due(stamp, now=1_000_000.0)  # never pruned
    stamp.touch()
    os.utime(stamp, (1_000_000.0, 1_000_000.0))
    assert not prune_due(stamp, now=1_000_000.0 + 3599)
    assert prune_due(stamp, now=1_000_000.0 + 3600)
    assert not prune_due(stamp, now=1_000_000.0 + 60, every=timedelta(minutes=2))
    assert prune_due(stamp, now=1_000_000.0 - 60)  # a stamp from the future (clock set back) does not block pruning
