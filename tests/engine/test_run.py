"""The stage engine on a small concrete stage: fingerprints, shards, atomic publication, resume."""

from __future__ import annotations

import json

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data_schemas import SchemaError, TableSchema
from tasks.config import load_config
from tasks.engine.manifest import read_manifest
from tasks.engine.run import plan_stage, run_stage
from tasks.engine.stage import ShardResult, Stage, StageContext, StageError, WorkItem
from tasks.engine.store import (
    Failure,
    Workdir,
    read_dataset,
    write_bytes_atomic,
    write_table_atomic,
)

SQUARES = TableSchema("squares", 1, pa.schema([pa.field("n", pa.int64(), nullable=False), pa.field("square", pa.int64(), nullable=False)]))


class SquareStage(Stage):
    """Squares the numbers 0..n-1; multiples of 7 fail; can crash on demand."""

    name = "clip"
    code_version = "1"
    output = SQUARES

    def __init__(self, n: int = 10, crash_on: set[int] | None = None, offset: int = 0):
        self.n = n
        self.offset = offset
        self.crash_on = crash_on or set()
        self.processed: list[int] = []

    def shard_size(self, ctx):
        return 3

    def settings(self, ctx):
        return {"offset": self.offset}

    def input_fingerprints(self, ctx):
        return {"source": str(self.n)}  # like a source listing: which items exist

    def list_items(self, ctx):
        return [WorkItem(f"{i:03d}", key=str(i), payload={"n": i}) for i in range(self.n)]

    def process_shard(self, ctx, items):
        rows, failures = [], []
        for it in items:
            n = it.payload["n"]
            if n in self.crash_on:
                raise RuntimeError(f"simulated crash at {n}")
            self.processed.append(n)
            if n and n % 7 == 0:
                failures.append(Failure(it.item_id, "multiple_of_seven", f"{n} is a multiple of 7"))
            else:
                rows.append({"n": n, "square": n * n + self.offset})
        return ShardResult({"squares": SQUARES.from_rows(rows)}, failures)


def _ctx(tmp_path):
    return StageContext(workdir=Workdir(str(tmp_path / "wd")), config=load_config("tiny"))


def test_run_publishes_table_failures_and_manifest(tmp_path):
    ctx = _ctx(tmp_path)
    report = run_stage(SquareStage(), ctx)
    assert report.status == "done"
    df = pd.read_parquet(tmp_path / "wd" / "clip")  # the stage dir reads as exactly its main table
    assert sorted(df["n"]) == [0, 1, 2, 3, 4, 5, 6, 8, 9]
    assert list(df.columns) == ["n", "square"]
    failures = pq.read_table(tmp_path / "wd" / "clip" / "_failures.parquet")
    assert failures.to_pylist() == [
        {"item_id": "007", "stage": "clip", "error_kind": "multiple_of_seven", "message": "7 is a multiple of 7", "detail": None,
         "failure_class": "input"}
    ]
    manifest = json.loads((tmp_path / "wd" / "clip" / "_manifest.json").read_text())
    assert manifest["rows"] == 9 and manifest["failures"] == 1 and manifest["items"] == 10
    assert manifest["shards"] == {"total": 4, "reused": 0}
    assert manifest["config"] == {"offset": 0} and manifest["schema"] == {"name": "squares", "version": 1}
    # Work time is the shards' own processing time plus publishing: at least what the shards
    # recorded, and never more than the wall time the stage took.
    index = json.loads((tmp_path / "wd" / "clip" / "_work" / "compact.json").read_text())
    shard_work = sum(entry["done"]["work_s"] for entry in index["shards"].values())
    assert 0 < shard_work <= manifest["work_time_s"] <= manifest["wall_time_s"] + 1e-3


def test_second_run_is_cached_and_does_no_work(tmp_path):
    ctx = _ctx(tmp_path)
    run_stage(SquareStage(), ctx)
    again = SquareStage()
    report = run_stage(again, ctx)
    assert report.status == "cached" and again.processed == []


class FlakyStage(SquareStage):
    """SquareStage whose multiples of 7 fail only while `down` (a flaky dependency)."""

    def __init__(self, down: bool, **kw):
        super().__init__(**kw)
        self.down = down

    def process_shard(self, ctx, items):
        if self.down:
            return super().process_shard(ctx, items)
        self.processed += [it.payload["n"] for it in items]
        return ShardResult({"squares": SQUARES.from_rows([{"n": it.payload["n"], "square": it.payload["n"] ** 2} for it in items])}, [])


def test_retry_failures_reruns_only_shards_with_failures_and_changes_the_output_identity(tmp_path):
    from tasks.engine.manifest import output_identity

    ctx = _ctx(tmp_path)
    first = run_stage(FlakyStage(down=True), ctx)
    assert first.failures == 1 and first.manifest["failed_items"]  # 7 (0 is not a failure)
    assert run_stage(FlakyStage(down=False), ctx).status == "cached"  # retrying is asked for, never implied

    ctx.config.execution.retry_failures = True
    retry = FlakyStage(down=False)
    report = run_stage(retry, ctx)
    assert report.status == "done" and retry.processed == [6, 7, 8]  # the shard of 7, not the others
    assert report.failures == 0 and report.manifest["failed_items"] is None and report.rows == 10
    assert report.manifest["fingerprint"] == first.manifest["fingerprint"]
    # What downstream stages build on changed: they rerun, though the fingerprint did not.
    assert output_identity(report.manifest) == report.manifest["fingerprint"] != output_identity(first.manifest)
    assert sorted(pd.read_parquet(tmp_path / "wd" / "clip")["n"]) == list(range(10))
    nothing_failed = FlakyStage(down=False)
    assert run_stage(nothing_failed, ctx).status == "cached" and nothing_failed.processed == []


def test_settings_change_reruns_every_shard(tmp_path):
    run_stage(SquareStage(10), _ctx(tmp_path))
    stage = SquareStage(10, offset=1)
    report = run_stage(stage, _ctx(tmp_path))
    assert report.status == "done" and report.manifest["shards"]["reused"] == 0
    assert len(stage.processed) == 10
    assert pd.read_parquet(tmp_path / "wd" / "clip")["square"].tolist()[:2] == [1, 2]


def test_new_items_rerun_only_their_shard(tmp_path):
    run_stage(SquareStage(10), _ctx(tmp_path))
    stage = SquareStage(12)
    report = run_stage(stage, _ctx(tmp_path))
    assert report.status == "done" and report.rows == 11
    # Shards whose items did not change are reused: only the shard holding 9..11 is new work.
    assert sorted(stage.processed) == [9, 10, 11]
    assert report.manifest["shards"] == {"total": 4, "reused": 3}


def test_crash_mid_stage_then_rerun_does_only_missing_shards(tmp_path):
    ctx = _ctx(tmp_path)
    crashing = SquareStage(crash_on={7})
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_stage(crashing, ctx)
    assert read_manifest(ctx.workdir, "clip") is None  # nothing a rerun would trust
    assert sorted(crashing.processed) == [0, 1, 2, 3, 4, 5, 6]  # shard 6..8 died at 7
    resumed = SquareStage()
    report = run_stage(resumed, ctx)
    assert sorted(resumed.processed) == [6, 7, 8, 9]
    assert report.manifest["shards"]["reused"] == 2
    clean_ctx = _ctx(tmp_path / "clean")
    clean = run_stage(SquareStage(), clean_ctx)
    assert read_dataset(ctx.workdir.fs, ctx.workdir.path("clip"), SQUARES).equals(
        read_dataset(clean_ctx.workdir.fs, clean_ctx.workdir.path("clip"), SQUARES)
    )
    assert clean.rows == report.rows


def test_rerun_after_crash_withdraws_old_manifest(tmp_path):
    ctx = _ctx(tmp_path)
    run_stage(SquareStage(), ctx)
    with pytest.raises(RuntimeError):
        run_stage(SquareStage(12, crash_on={11}), _ctx(tmp_path))
    assert read_manifest(ctx.workdir, "clip") is None


def test_stale_shards_are_collected(tmp_path):
    run_stage(SquareStage(10), _ctx(tmp_path))
    run_stage(SquareStage(4), _ctx(tmp_path))
    work = tmp_path / "wd" / "clip" / "_work"
    # Completed shards are compacted: one generation, indexing only the current plan's shards.
    assert len(json.loads((work / "compact.json").read_text())["shards"]) == 2
    assert sorted(p.name for p in work.iterdir() if not p.name.startswith("compact-")) == ["compact.json"]
    assert len(list(work.glob("compact-*"))) == 1


def test_empty_stage_still_has_schema_and_failures(tmp_path):
    run_stage(SquareStage(0), _ctx(tmp_path))
    df = pd.read_parquet(tmp_path / "wd" / "clip")
    assert len(df) == 0 and list(df.columns) == ["n", "square"]
    assert len(pd.read_parquet(tmp_path / "wd" / "clip" / "_failures.parquet")) == 0


def test_atomic_write_leaves_no_temp_and_keeps_old_file_on_failure(tmp_path):
    wd = Workdir(str(tmp_path))
    path = wd.path("t.parquet")
    write_table_atomic(wd.fs, path, SQUARES.from_rows([{"n": 1, "square": 1}]), SQUARES)
    with pytest.raises(SchemaError):
        write_table_atomic(wd.fs, path, pa.table({"n": ["bad"], "square": [1]}), SQUARES)
    assert pq.read_table(path).to_pylist() == [{"n": 1, "square": 1}]
    assert [p.name for p in tmp_path.iterdir()] == ["t.parquet"]

    class Boom(Exception):
        pass

    # A failure during the write itself never replaces the old file and leaves no temp behind.
    original = wd.fs.mv
    wd.fs.mv = lambda *a, **k: (_ for _ in ()).throw(Boom())
    try:
        with pytest.raises(Boom):
            write_bytes_atomic(wd.fs, path, b"garbage")
    finally:
        wd.fs.mv = original
    assert pq.read_table(path).num_rows == 1
    assert [p.name for p in tmp_path.iterdir()] == ["t.parquet"]


def test_missing_upstream_is_a_clear_error(tmp_path):
    class Downstream(SquareStage):
        name = "caption"
        inputs = ("clip",)

        def input_fingerprints(self, ctx):
            return Stage.input_fingerprints(self, ctx)

    with pytest.raises(StageError, match="needs the output of 'clip'.*--from clip"):
        plan_stage(Downstream(), _ctx(tmp_path))


def test_input_of_wrong_schema_names_column(tmp_path):
    wd = Workdir(str(tmp_path))
    pq.write_table(pa.table({"n": [1], "square": ["one"]}), tmp_path / "part-00000.parquet")
    with pytest.raises(SchemaError, match=r"column 'square' has type string, expected int64"):
        read_dataset(wd.fs, wd.root, SQUARES)
