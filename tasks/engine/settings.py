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
