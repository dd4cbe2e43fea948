"""Manifests and fingerprints: what makes a stage's output trusted and what downstream stages build on."""

from __future__ import annotations

from typing import Any

from tasks.engine.store import MANIFEST, Workdir, read_json, stable_hash

# lvr's distribution (pyproject.toml's project name), whose version manifests record.
DISTRIBUTION = "longvideo-reasoning"


def stage_fingerprint(stage: str, settings: dict[str, Any], input_fingerprints: dict[str, str], code_version: str) -> str:
    return stable_hash({"stage": stage, "settings": settings, "inputs": input_fingerprints, "code": code_version})


def output_identity(manifest: dict[str, Any]) -> str:
    """What a downstream stage builds on: the stage's fingerprint, and which items failed.

    The fingerprint alone names the output only while a run is a pure function of it; a retry of
    the failed items (`execution.retry_failures`) can turn failures into rows under the same
    fingerprint, and what was built on the old output must then be rebuilt.
    """
    failed = manifest.get("failed_items")
    return manifest["fingerprint"] if not failed else stable_hash({"fingerprint": manifest["fingerprint"], "failed": failed})


def read_manifest(workdir: Workdir, stage: str) -> dict[str, Any] | None:
    manifest = read_json(workdir.fs, workdir.path(stage, MANIFEST))
    if manifest is None or manifest.get("status") != "complete":
        return None
    return manifest



def lvr_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(DISTRIBUTION)
    except PackageNotFoundError:
        return "0+unknown"
