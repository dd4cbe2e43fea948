"""Caption stage on real clips with the tiny model through the real `from_pretrained` and `generate`."""

from __future__ import annotations

import json
import shutil

import pandas as pd
import pyarrow.parquet as pq
import pytest

from models.captioners import CaptionResult
from models.vlm import HFVideoLM, ModelLoadError
from tasks.caption.stage import CaptionStage, caption_problem
from tasks.clip.stage import ClipStage
from tasks.config import load_config
from tasks.engine.run import run_stage
from tasks.engine.stage import StageContext
from tasks.engine.store import Workdir
from tests.support.videos import make_video


@pytest.fixture(scope="module")
def clipped(tmp_path_factory):
    """A workdir whose clip stage is complete: two videos, five clips."""
    root = tmp_path_factory.mktemp("caption")
    make_video(root / "src" / "a.mp4", 20, fps=25, gop=25)
    make_video(root / "src" / "b.mp4", 14, fps=25, gop=25, source="smptebars")
    wd = root / "wd"
    run_stage(ClipStage(), StageContext(Workdir(str(wd)), load_config("tiny"), source=str(root / "src")))
    return wd


def _caption(workdir, *overrides):
    ctx = StageContext(Workdir(str(workdir)), load_config("tiny", list(overrides)))
    return run_stage(CaptionStage(), ctx)


def test_hf_captions_every_clip(clipped, tmp_path):
    wd = tmp_path / "wd"
    shutil.copytree(clipped, wd)
    stage = CaptionStage()
    report = run_stage(stage, StageContext(Workdir(str(wd)), load_config("tiny", ["caption.shard_size=2"])))
    assert stage._captioner is None  # the model and its frame workers went with the stage's last shard
    captions = pd.read_parquet(wd / "caption")
    clips = pd.read_parquet(wd / "clip")
    assert report.status == "done" and report.failures == 0
    assert sorted(captions["clip_id"]) == sorted(clips["clip_id"])
    merged = captions.merge(clips, on="clip_id", suffixes=("", "_clip"))
    assert (merged["start_s"] == merged["start_s_clip"]).all() and (merged["video_id"] == merged["video_id_clip"]).all()
    assert (captions["caption"].str.len() > 0).all()
    assert (captions["frames_used"] == 8).all() and (captions["tokens_out"] > 0).all() and (captions["tokens_in"] > 100).all()
    assert set(captions["backend"]) == {"hf"} and set(captions["model"]) == {"tiny-captioner"}
    assert captions["prompt_hash"].nunique() == 1 and (captions["latency_s"] > 0).all()
    # Seeded sampling: a second workdir gives the same captions.
    wd2 = tmp_path / "wd2"
    shutil.copytree(clipped, wd2)
    _caption(wd2, "caption.shard_size=2")
    again = pd.read_parquet(wd2 / "caption")
    assert again.sort_values("clip_id")["caption"].tolist() == captions.sort_values("clip_id")["caption"].tolist()


def test_degenerate_captions_become_failures(clipped, tmp_path):
    """Greedy decoding of a random-weight model repeats one token: those are failures, not data."""
    wd = tmp_path / "wd"
    shutil.copytree(clipped, wd)
    report = _caption(wd, "caption.temperature=0", "caption.max_new_tokens=8")
    failures = pq.read_table(wd / "caption" / "_failures.parquet").to_pandas()
    assert report.rows == 0 and report.failures == len(pd.read_parquet(wd / "clip"))
    assert len(failures) == report.failures and set(failures["error_kind"]) <= {"degenerate_caption", "empty_caption"}
    assert failures["message"].str.len().min() > 10


def test_caption_problem_rules():
    base = dict(clip_id="c", frames_used=8, tokens_in=10, tokens_out=5, latency_s=0.1)
    assert caption_problem(CaptionResult(caption="A red ball rolls.", distinct_tokens=5, **base)) is None
    assert caption_problem(CaptionResult(caption="  ", distinct_tokens=0, **base))[0] == "empty_caption"
    assert caption_problem(CaptionResult(caption="the the the the", distinct_tokens=None, **base))[0] == "degenerate_caption"
    assert caption_problem(CaptionResult(caption="aaaa", distinct_tokens=1, **base))[0] == "degenerate_caption"
    failed = CaptionResult(caption="", distinct_tokens=None, error_kind="unreadable_clip", error="boom", **base)
    assert caption_problem(failed) == ("unreadable_clip", "boom")


def test_changing_caption_settings_reruns_caption_not_clip(clipped, tmp_path):
    wd = tmp_path / "wd"
    shutil.copytree(clipped, wd)
    clip_manifest = (wd / "clip" / "_manifest.json").read_text()
    first = _caption(wd)
    second = _caption(wd, "caption.max_new_tokens=12")
    assert first.manifest["fingerprint"] != second.manifest["fingerprint"] and second.status == "done"
    assert (wd / "clip" / "_manifest.json").read_text() == clip_manifest
    assert _caption(wd, "caption.max_new_tokens=12", "caption.shard_size=1").status == "cached"


def test_remote_code_checkpoints_need_explicit_opt_in(tmp_path):
    from models.tiny import ensure_tiny_model

    model = tmp_path / "remote-code-model"
    shutil.copytree(ensure_tiny_model(), model)
    config = json.loads((model / "config.json").read_text())
    config["auto_map"] = {"AutoModel": "modeling_nvila.NVILAForCausalLM"}
    (model / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match="trust_remote_code: true"):
        HFVideoLM(str(model))


@pytest.mark.slow
def test_sigkill_mid_caption_then_rerun_matches_clean_run(clipped, tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    from tests.support.paths import REPO, run_cli

    args = ["--from", "caption", "--to", "caption", "--set", "caption.shard_size=1", "--set", "caption.batch_size=1",
            "--set", "caption.max_new_tokens=8", "--set", "caption.num_frames=4"]
    wd = tmp_path / "killed"
    shutil.copytree(clipped, wd)
    proc = subprocess.Popen(
        [sys.executable, "-m", "flows.cli", "run", "--workdir", str(wd), *args, "--engine", "local"], cwd=REPO, env=os.environ.copy(),
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    shards = wd / "caption" / "_work" / "shards"
    deadline = time.time() + 300
    while time.time() < deadline and not list(shards.glob("*/_done.json")):
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done_before = len(list(shards.glob("*/_done.json")))
    n_clips = len(pd.read_parquet(wd / "clip"))
    assert 1 <= done_before < n_clips and not (wd / "caption" / "_manifest.json").exists()

    rerun = run_cli("run", "--workdir", str(wd), *args, "--engine", "local")
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    manifest = json.loads((wd / "caption" / "_manifest.json").read_text())
    assert manifest["shards"] == {"total": n_clips, "reused": done_before}

    clean = tmp_path / "clean"
    shutil.copytree(clipped, clean)
    assert run_cli("run", "--workdir", str(clean), *args, "--engine", "local").returncode == 0
    cols = ["clip_id", "caption", "tokens_in", "tokens_out", "frames_used"]
    killed_rows = pd.read_parquet(wd / "caption")[cols].sort_values("clip_id").reset_index(drop=True)
    clean_rows = pd.read_parquet(clean / "caption")[cols].sort_values("clip_id").reset_index(drop=True)
    pd.testing.assert_frame_equal(killed_rows, clean_rows)


def test_clean_caption_drops_control_characters_and_reasoning_tags():
    from tasks.caption.stage import clean_caption

    assert clean_caption("a red\x07 ball </think> rolls<answer>\n") == "a red ball   rolls"
    assert clean_caption("line one\nline two\ttab") == "line one\nline two\ttab"
