"""Config sections as the engine sees them: validated pydantic models that declare which of their
keys only say how work runs (endpoints, concurrency, shard sizes), never what it produces.

A stage's settings (what its fingerprint hashes) are its section without those keys, so a new
endpoint or concurrency reuses a finished stage. The execution section is the engine's own.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    # Keys that change how work is scheduled, authenticated or where it is checkpointed, never a
    # row of output: left out of the stage's fingerprint.
    runtime_keys: ClassVar[tuple[str, ...]] = ()
    # An override of a key here also puts the keys it maps to back to their defaults, unless the same
    # overrides set them: the key the user names is the one that takes effect.
    override_replaces: ClassVar[dict[str, tuple[str, ...]]] = {}

    def output_settings(self) -> dict[str, Any]:
        """The section as plain JSON-able data, without its runtime keys: what a fingerprint hashes."""
        return {k: v for k, v in self.model_dump(mode="json").items() if k not in self.runtime_keys}


class ExecutionConfig(Section):
    task_runner: Literal["threads", "processes", "ray"] = Field(
        "threads", description="Where shard tasks run: threads of the flow's process, worker processes, or a Ray cluster."
    )
    ray_address: str | None = Field(
        None,
        description="Ray cluster: ray://head:10001 (Ray Client, from outside the cluster) or head:6379 (this process on a "
        "Ray node); empty starts a local Ray.",
    )
    shard_workers: int = Field(1, ge=1, description="Shards of one stage processed concurrently.")
    task_target_s: float | None = Field(
        5.0, gt=0,
        description="Work per Prefect task: once a shard's time is known, each task runs as many shards as take about this "
        "long (each still written and reused on its own), so quick shards do not pay a task run each; none: one task per shard.",
    )
    shard_retries: int = Field(2, ge=0, description="Prefect retries per shard task.")
    shard_retry_delay_s: float = Field(5.0, ge=0)
    retry_failures: bool = Field(
        False,
        description="Process again the items a stage recorded as failures (a flaky endpoint, a video missing for a while); "
        "finished items are kept.",
    )
    deployment_poll_s: float = Field(
        5.0, gt=0, description="With `execution: deployments`: how often the pipeline checks on a stage's flow run."
    )
    stage_timeout_s: float | None = Field(
        86400.0, gt=0,
        description="With `execution: deployments`: how long the pipeline waits for a stage's flow run before cancelling "
        "it and failing (its infrastructure may be gone); none: wait forever.",
    )
    shard_timeout_s: float | None = Field(
        None, gt=0,
        description="Fail a shard task that runs longer than this many seconds (Prefect retries it as any failure); "
        "none: no limit. A thread cannot be killed: the late shard's work only stops when it returns, so hung tools "
        "are stopped by clip.tool_timeout_s and <stage>.launch_timeout_s.",
    )
    wait_for_lock: bool = Field(
        True,
        description="A stage another run is writing in this workdir: wait for it (true) or fail at once naming its owner "
        "(false; `lvr run --no-wait`).",
    )
    lock_stale_s: float = Field(
        120.0, gt=0, description="A stage lock whose owner has not renewed it for this long is taken over (its owner died)."
    )
    history_retention_days: float | None = Field(
        14.0, gt=1 / 24,
        description="`lvr run` on Prefect's ephemeral API (no PREFECT_API_URL): after the run, delete from the local Prefect "
        "database the flow runs that ended more than this many days ago (over an hour: Prefect's minimum), with their task "
        "runs, logs, artifacts and events (Prefect's own vacuum; a Prefect server does this with its vacuum service). "
        "none: keep everything.",
    )
    allow_shrink: bool = Field(
        False,
        description="Accept a source that lists fewer videos than `clip.max_shrink` of the last complete clip run "
        "(`lvr run --allow-shrink`); by default that is an error, since an unmounted or half-written source would "
        "otherwise wipe the dataset.",
    )
