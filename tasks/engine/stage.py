"""The stage contract: what a stage author writes (a `Stage` subclass) and the records it deals in.

A stage says what it is (name, code version, inputs, output schema, item columns) and implements
`list_items` and `process_shard`; the engine (`tasks.engine.run`) does planning, reuse, manifests
and progress. Stages are named by their class path (`module:Class`), so any process can rebuild
one without a registry (`load_stage`).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from data_schemas import TableSchema
from tasks.engine.manifest import output_identity, read_manifest
from tasks.engine.settings import Section
from tasks.engine.store import Failure, Workdir, read_dataset, write_dataset


class StageError(RuntimeError):
    """A stage that cannot run (missing input, bad input schema); the message says what to do."""


@dataclass(frozen=True)
class WorkItem:
    """One unit of a stage's input. `key` captures everything about the item that affects its output."""

    item_id: str
    key: str
    payload: dict[str, Any] = field(default_factory=dict)


@dataclass
class ShardResult:
    tables: dict[str, pa.Table]
    failures: list[Failure]


@dataclass
class StageContext:
    """What a stage run sees. `config` is the pipeline's config (`tasks.config.PipelineConfig`):
    one `Section` per stage, named as the stage, and the engine's `execution` section."""

    workdir: Workdir
    config: Any
    source: str | None = None
    progress: Callable[[int, int], None] | None = None
    run_id: str | None = None  # names this run in the stage leases other runs see

    def stage_path(self, stage: str, *parts: str) -> str:
        return self.workdir.path(stage, *parts)


class Stage:
    """Base class of a DAG stage. Subclasses set the class attributes and implement the hooks."""

    name: str
    code_version: str  # bump when the stage's output for the same input changes
    inputs: tuple[str, ...] = ()
    output: TableSchema
    side_outputs: tuple[TableSchema, ...] = ()
    # For item-level reuse: the column of each output table (and failures' item_id) naming the item a
    # row came from. With it, an item already processed under the same recipe in any earlier shard
    # is copied instead of recomputed, so a source that gained 5 videos costs about 5 videos of work.
    item_columns: dict[str, str] = {}

    def settings(self, ctx: StageContext) -> dict[str, Any]:
        """What of the config this stage's output depends on (hashed into fingerprints)."""
        return self.section(ctx).output_settings()

    def section(self, ctx: StageContext) -> Section:
        """This stage's own config section."""
        return getattr(ctx.config, self.name)

    def shard_settings(self, ctx: StageContext) -> dict[str, Any]:
        """What of the settings a shard's result depends on (hashed into shard keys). Narrower than
        `settings` for stages whose `finalize` uses settings the shards do not: changing only those
        reruns the stage but reuses every shard."""
        return self.settings(ctx)

    def shard_size(self, ctx: StageContext) -> int:
        return int(getattr(self.section(ctx), "shard_size", 1))

    def input_fingerprints(self, ctx: StageContext) -> dict[str, str]:
        fps = {}
        for upstream in self.inputs:
            manifest = read_manifest(ctx.workdir, upstream)
            if manifest is None:
                raise StageError(
                    f"stage {self.name!r} needs the output of {upstream!r}, which is missing or incomplete in "
                    f"{ctx.workdir.uri(upstream)}; run with --from {upstream} (or an earlier stage)"
                )
            fps[upstream] = output_identity(manifest)
        return fps

    def list_items(self, ctx: StageContext) -> list[WorkItem]:
        raise NotImplementedError

    def process_shard(self, ctx: StageContext, items: list[WorkItem]) -> ShardResult:
        raise NotImplementedError

    def finalize(
        self, ctx: StageContext, tables: dict[str, pa.Table], failures: list[Failure]
    ) -> tuple[dict[str, pa.Table], list[Failure]]:
        """Whole-stage post-processing over all shards' rows (e.g. cross-shard de-duplication)."""
        return tables, failures

    def report_markdown(self, ctx: StageContext, manifest: dict[str, Any]) -> str | None:
        """Stage-specific findings (tables, chart links) appended to the stage's Prefect artifact."""
        return None

    def report_table(self, ctx: StageContext, manifest: dict[str, Any]) -> list[dict[str, Any]] | None:
        """Rows for a Prefect table artifact of the stage's results (e.g. accuracy per category)."""
        return None

    def table_dir(self, ctx: StageContext, schema: TableSchema) -> str:
        if schema.name == self.output.name:
            return ctx.stage_path(self.name)
        return ctx.stage_path(self.name, f"_{schema.name}")

    def publish_table(self, ctx: StageContext, schema: TableSchema, table: pa.Table) -> list[str]:
        """Write one of the stage's final tables where readers look for it; returns the files.

        Default: part files in `table_dir`. A stage whose folder also holds other outputs (a
        training stage's `model/`, which Arrow's dataset discovery would try to read) writes a
        single named file instead.
        """
        return write_dataset(ctx.workdir.fs, self.table_dir(ctx, schema), table, schema)

    @property
    def all_outputs(self) -> tuple[TableSchema, ...]:
        return (self.output, *self.side_outputs)



@dataclass(frozen=True)
class StageReport:
    stage: str
    status: str  # "done" or "cached"
    manifest: dict[str, Any]

    @property
    def rows(self) -> int:
        return int(self.manifest.get("rows", 0))

    @property
    def failures(self) -> int:
        return int(self.manifest.get("failures", 0))



def is_environment_fault(exc: BaseException) -> bool:
    """A fault of the machine, not of the item (a full disk, a failed download, no memory): it fails
    the shard, which Prefect retries and a rerun redoes, instead of becoming a failure row. A file
    deleted since the listing is the item's own: the next listing will not have it either."""
    return isinstance(exc, (OSError, MemoryError)) and not isinstance(exc, FileNotFoundError)


def read_stage_table(workdir: Workdir, stage: str, schema: TableSchema, table_dir: str | None = None) -> pa.Table:
    """An upstream stage's table, validated against the schema this reader expects."""
    return read_dataset(workdir.fs, workdir.path(stage, table_dir or ""), schema)


def class_path(obj: object) -> str:
    """`module:Class` of an object's class: how another process names it (`load_class`)."""
    cls = type(obj)
    return f"{cls.__module__}:{cls.__qualname__}"


def load_class(path: str) -> Any:
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


def load_stage(path: str) -> Stage:
    """A fresh stage from its `module:Class` path."""
    stage = load_class(path)()
    if not isinstance(stage, Stage):
        raise TypeError(f"{path} is not a Stage")
    return stage
