"""`check_stage_manifest`: what `execution: deployments` trusts before starting the next stage."""

from __future__ import annotations

import json

import pytest

from tasks.config import load_config
from tasks.engine.run import run_stage
from tasks.engine.runs import check_stage_manifest
from tasks.engine.stage import StageContext, StageError
from tasks.engine.store import Workdir
from tasks.stages import get_stage
from tests.support.videos import make_video


@pytest.fixture(scope="module")
def clipped(tmp_path_factory):
    root = tmp_path_factory.mktemp("checks")
    make_video(root / "videos" / "a.mp4", 6, fps=10, gop=10)
    ctx = StageContext(Workdir(str(root / "work")), load_config("tiny"), source=str(root / "videos"))
    run_stage(get_stage("clip"), ctx)
    return ctx


def _write_manifest(ctx: StageContext, stage: str, manifest: dict) -> None:
    path = ctx.workdir.path(stage, "_manifest.json")
    ctx.workdir.makedirs(stage)
    with open(path, "w") as fh:
        json.dump(manifest, fh)


def _caption_manifest(ctx: StageContext, **changes) -> dict:
    """A complete caption manifest as the caption stage would write it for `ctx`."""
    stage = get_stage("caption")
    clip = json.loads(open(ctx.workdir.path("clip", "_manifest.json")).read())
    manifest = {
        "stage": "caption", "status": "complete", "fingerprint": "f", "code_version": stage.code_version,
        "config": json.loads(json.dumps(stage.settings(ctx), default=str)), "input_fingerprints": {"clip": clip["fingerprint"]},
        "rows": 0, "failures": 0,
    }
    return {**manifest, **changes}


def test_a_manifest_of_this_recipe_passes(clipped):
    manifest = check_stage_manifest(get_stage("clip"), clipped)
    assert manifest["stage"] == "clip" and manifest["rows"] >= 1


def test_other_settings_are_named(clipped):
    other = StageContext(clipped.workdir, load_config("tiny", {"clip.seconds": 4.0}), source=clipped.source)
    with pytest.raises(StageError, match=r"settings differ in seconds"):
        check_stage_manifest(get_stage("clip"), other)


def test_missing_manifest_says_the_worker_must_share_the_workdir(clipped, tmp_path):
    empty = StageContext(Workdir(str(tmp_path / "elsewhere")), clipped.config, source=clipped.source)
    with pytest.raises(StageError, match=r"missing or incomplete.*same workdir"):
        check_stage_manifest(get_stage("clip"), empty)


def test_stale_code_version_and_upstream_are_refused(clipped):
    _write_manifest(clipped, "caption", _caption_manifest(clipped))
    assert check_stage_manifest(get_stage("caption"), clipped)["input_fingerprints"]
    assert check_stage_manifest(get_stage("caption"), clipped) == _caption_manifest(clipped)  # accepted, and returned as written

    _write_manifest(clipped, "caption", _caption_manifest(clipped, code_version="0-old-image"))
    with pytest.raises(StageError, match=r"code version '0-old-image'"):
        check_stage_manifest(get_stage("caption"), clipped)

    _write_manifest(clipped, "caption", _caption_manifest(clipped, input_fingerprints={"clip": "an-older-clip-run"}))
    with pytest.raises(StageError, match=r"built on clip an-older-clip-run"):
        check_stage_manifest(get_stage("caption"), clipped)
