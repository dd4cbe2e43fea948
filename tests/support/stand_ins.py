"""Stand-ins for upstream stages, for tests and benchmarks that start in the middle of the DAG."""

from __future__ import annotations

from data_schemas import TableSchema
from tasks.engine.stage import ShardResult, Stage, WorkItem
from tasks.engine.store import stable_hash


class Published(Stage):
    """Stands in for an upstream stage: run with `run_stage`, it publishes `rows` as the complete
    output of stage `name` (e.g. a `caption/` for the qa stage to read)."""

    code_version = "test"

    def __init__(self, name: str, schema: TableSchema, rows: list[dict]) -> None:
        self.name, self.output, self.rows = name, schema, rows

    def settings(self, ctx):
        return {"rows": stable_hash(self.rows)}

    def list_items(self, ctx):
        return [WorkItem("all", stable_hash(self.rows))]

    def process_shard(self, ctx, items):
        return ShardResult({self.output.name: self.output.from_rows(self.rows)}, [])
