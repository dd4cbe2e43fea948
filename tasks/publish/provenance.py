"""What produced an artifact, as the stage manifests record it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tasks.engine.manifest import read_manifest
from tasks.engine.store import Workdir
from tasks.stages import STAGE_NAMES


class PublishError(RuntimeError):
    """The workdir cannot be published as it is (a stage missing or incomplete, tables that disagree
    with their manifests); the message says what to run."""


@dataclass(frozen=True)
class StageProvenance:
    """One stage's entry of a card: its fingerprint, code and lvr versions, and the settings that
    made its output (the manifest's `config`: the section without runtime keys)."""

    stage: str
    fingerprint: str
    code_version: str
    lvr_version: str
    config: dict[str, Any]
    rows: int

    @classmethod
    def from_manifest(cls, manifest: dict[str, Any]) -> StageProvenance:
        return cls(
            stage=manifest["stage"], fingerprint=manifest["fingerprint"], code_version=str(manifest["code_version"]),
            lvr_version=str(manifest.get("lvr_version", "unknown")), config=dict(manifest.get("config") or {}),
            rows=int(manifest.get("rows", 0)),
        )


def required_manifest(workdir: Workdir, stage: str) -> dict[str, Any]:
    manifest = read_manifest(workdir, stage)
    if manifest is None:
        raise PublishError(
            f"{workdir.uri(stage)} has no complete manifest: run the pipeline through {stage} first "
            f"(lvr run --workdir {workdir.url} --to {stage})"
        )
    return manifest


def provenance_through(workdir: Workdir, last_stage: str) -> list[StageProvenance]:
    """Every stage up to and including `last_stage`, in pipeline order, that has a complete manifest
    (a workdir may start in the middle of the DAG, e.g. `lvr synth` writes only filter/)."""
    names = STAGE_NAMES[: STAGE_NAMES.index(last_stage) + 1]
    return [StageProvenance.from_manifest(m) for m in (read_manifest(workdir, s) for s in names) if m is not None]
