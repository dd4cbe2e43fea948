"""The whole pipeline with its source videos and its workdir in S3 (moto's server on 127.0.0.1).

One run, shared by the tests of this module, in the order a production run meets these events:
clip to filter in this process; SFT in another process, SIGKILLed once its first checkpoint is in
the bucket (the pod died); the machine's local staging deleted (a retry lands on a fresh one); the
pipeline rerun from SFT here, resuming from the checkpoint in the bucket; then, with the staging
deleted again, a full rerun that must find every stage cached. Everything goes through real
s3fs / botocore configured by environment variables, as a user would configure them.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest

from data_schemas import CLIPS, EVAL_ITEMS, FILTER, TRAIN_METRICS
from tasks.config import cache_dir, load_config
from tasks.engine.runs import RunRecord
from tasks.engine.store import Workdir
from tasks.pipeline import run_pipeline
from tasks.stages import STAGE_NAMES
from tasks.training.checkpoints import (
    STATE_FILE,
    TRAIN_INFO_FILE,
    TrainerState,
    checkpoints,
    step_dir,
    write_state,
)
from tasks.training.loop import CHECKPOINTS_DIR
from tasks.training.models import MODELS_DIR, local_model
from tasks.training.staging import (
    STAGING_DIR,
    CheckpointUploader,
    pull_newest_checkpoint,
    push_dir,
    staged_dir,
)
from tests.support.paths import REPO, run_cli
from tests.support.processes import trainer_pids, wait_for
from tests.support.s3_server import S3Server, s3_bucket, s3_server  # noqa: F401  (pytest fixtures)
from tests.support.videos import make_video

pytestmark = pytest.mark.slow

SFT_STEPS = 30  # enough steps for the kill to land mid-training even on a slow, shared machine
OVERRIDES = {
    "clip.seconds": 3, "clip.min_seconds": 1, "caption.max_new_tokens": 8, "qa.questions_per_request": 1, "filter.runs": 2,
    "sft.sp_degree": 1, "sft.nproc_per_node": 1, "sft.max_steps": SFT_STEPS, "sft.save_every": 2,
    "grpo.steps": 2, "grpo.save_every": 1, "grpo.max_new_tokens": 16, "eval.max_new_tokens": 16,
    # One GRPO process and small groups: what is checked here is where things land, not the update.
    "grpo.nproc_per_node": 1, "grpo.group_size": 4, "grpo.prompts_per_step": 2,
}
TRAINED = ("sft", "grpo")


@dataclass
class S3Run:
    server: S3Server
    bucket: str  # s3://<name>
    source: str
    workdir: str
    killed_at_step: int  # newest checkpoint in the bucket when the retry started
    resumed: RunRecord
    cached: RunRecord

    @property
    def fs(self):
        return self.server.filesystem

    def key(self, *parts: str) -> str:
        return "/".join([self.workdir.removeprefix("s3://"), *parts])

    def read_parquet(self, *parts: str) -> pd.DataFrame:
        return pd.read_parquet(self.key(*parts), filesystem=self.fs)

    def read_json(self, *parts: str) -> dict:
        return json.loads(self.fs.cat_file(self.key(*parts)))


def remote_checkpoint_steps(fs, workdir: str, stage: str) -> list[int]:
    """Steps of the complete checkpoints (marker present) in the bucket."""
    root = f"{workdir.removeprefix('s3://')}/{stage}/_checkpoints"
    if not fs.exists(root):
        return []
    return sorted(int(p.rsplit("-", 1)[1]) for p in fs.ls(root, detail=False) if fs.exists(f"{p}/{STATE_FILE}"))


def fresh_machine(workdir: Workdir) -> None:
    """What a retry on another machine starts from: no local staging, no cached S3 listings."""
    shutil.rmtree(staged_dir(workdir, "sft").local.parent, ignore_errors=True)
    workdir.fs.clear_instance_cache()
    workdir.fs.invalidate_cache()


@pytest.fixture(scope="module")
def s3_run(s3_server, tmp_path_factory) -> S3Run:  # noqa: F811  (the imported fixture)
    bucket = s3_server.create_bucket()
    try:
        yield _run(s3_server, bucket, tmp_path_factory.mktemp("s3-videos"))
    finally:
        s3_server.delete_bucket(bucket)


def _run(server: S3Server, bucket: str, local_videos: Path) -> S3Run:
    fs = server.filesystem
    for name, seconds, pattern in (("a.mp4", 8, "testsrc2"), ("b.mp4", 6, "smptebars")):
        fs.put_file(str(make_video(local_videos / name, seconds, gop=25, audio=False, source=pattern)), f"{bucket[5:]}/videos/{name}")
    source, url = f"{bucket}/videos", f"{bucket}/run"
    config = load_config("tiny", OVERRIDES)
    workdir = Workdir(url)
    run_pipeline(workdir, config, source=source, to_stage="filter")

    # SFT in its own process group, killed once a checkpoint is complete in the bucket.
    script = textwrap.dedent(f"""
        from tasks.engine.store import Workdir
        from tasks.config import load_config
        from tasks.pipeline import run_pipeline
        run_pipeline(Workdir({url!r}), load_config("tiny", {OVERRIDES!r}), source={source!r}, from_stage="sft", to_stage="sft")
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=REPO, start_new_session=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    staging = staged_dir(workdir, "sft")
    try:
        wait_for(lambda: remote_checkpoint_steps(fs, url, "sft"), 240, "a checkpoint in the bucket", proc)
        job_file = next(staging.local.glob("_work/train/*/job.json"))
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    wait_for(lambda: not trainer_pids(job_file), 15, "the orphaned workers to exit")
    assert not fs.exists(f"{url[5:]}/sft/_manifest.json"), "SFT finished before the kill: raise SFT_STEPS"
    killed_at = max(remote_checkpoint_steps(fs, url, "sft"))
    assert killed_at < SFT_STEPS

    fresh_machine(workdir)
    workdir = Workdir(url)
    resumed = run_pipeline(workdir, config, source=source, from_stage="sft")
    fresh_machine(workdir)
    cached = run_pipeline(Workdir(url), config, source=source)
    return S3Run(server, bucket, source, url, killed_at, resumed, cached)


def test_every_stage_is_published_in_the_bucket(s3_run):
    fs = s3_run.fs
    for stage in STAGE_NAMES:
        manifest = s3_run.read_json(stage, "_manifest.json")
        assert manifest["status"] == "complete" and manifest["rows"] > 0, stage
        for table in manifest["tables"].values():
            frame = pd.concat([s3_run.read_parquet(table["path"], name) for name in table["files"]])
            assert len(frame) == table["rows"], (stage, table)
        assert fs.exists(s3_run.key(stage, "_failures.parquet"))
    # Every pipeline table reads back with pandas straight from the bucket (whole stage folders).
    clips = s3_run.read_parquet("clip")
    assert list(clips.columns) == CLIPS.columns and len(clips) >= 4
    assert list(s3_run.read_parquet("filter").columns) == FILTER.columns
    assert len(s3_run.read_parquet("sft", "metrics.parquet").query("name == 'loss'")) == SFT_STEPS
    # Clip media are objects in the bucket, addressed by s3:// URIs.
    assert all(uri.startswith(f"{s3_run.workdir}/clip/") and fs.exists(uri) for uri in clips.clip_uri)
    assert set(s3_run.read_parquet("clip", "_videos").uri) == {f"{s3_run.source}/a.mp4", f"{s3_run.source}/b.mp4"}
    # The filter exports: datasets-ready files beside the stage, naming the source videos by URI.
    exported = s3_run.read_parquet("filter", "_exports", "trl", "sft.parquet")
    assert len(exported) > 0 and all(v[0].startswith(f"{s3_run.source}/") for v in exported.videos)
    assert len(json.loads(fs.cat_file(s3_run.key("filter", "_exports", "llava", "eval.json")))) > 0
    # Atomic writes leave nothing behind; nothing was staged in the bucket.
    leftovers = [p for p in fs.find(s3_run.workdir[5:]) if ".tmp-" in p or ".tmp" in p.rsplit("/", 1)[-1]]
    assert leftovers == []


def test_models_and_checkpoints_are_in_the_bucket_and_eval_scored_them(s3_run):
    fs = s3_run.fs
    for stage in TRAINED:
        info = s3_run.read_json(stage, "model", TRAIN_INFO_FILE)
        assert {"config.json", "model.safetensors", "tokenizer.json", "lvr_video_preprocessor.json"} <= {
            p.rsplit("/", 1)[-1] for p in fs.ls(s3_run.key(stage, "model"), detail=False)
        }
        steps = remote_checkpoint_steps(fs, s3_run.workdir, stage)
        # The run's newest checkpoints, pruned to keep_checkpoints in the bucket as on disk; no partial upload.
        assert steps and max(steps) < info["step"] and len(steps) <= 2, (stage, steps)
        assert len(fs.ls(s3_run.key(stage, "_checkpoints"), detail=False)) == len(steps)
        assert len(s3_run.read_parquet(stage, "metrics.parquet")) == s3_run.read_json(stage, "_manifest.json")["rows"]
    # GRPO started from the SFT model in the bucket, loaded from its copy in the local model cache.
    grpo_settings = s3_run.read_json("grpo", "_manifest.json")["config"]
    assert grpo_settings["init_model"]["path"] == f"{s3_run.workdir}/sft/model"
    assert Path(s3_run.read_json("grpo", "model", TRAIN_INFO_FILE)["base_model"]).is_relative_to(cache_dir() / MODELS_DIR)

    items = s3_run.read_parquet("eval")
    assert list(items.columns) == EVAL_ITEMS.columns
    assert set(items.model) == {"base", "sft", "grpo"}
    paths = items.drop_duplicates("model").set_index("model").model_path
    assert paths["sft"] == f"{s3_run.workdir}/sft/model" and paths["grpo"] == f"{s3_run.workdir}/grpo/model"
    assert set(s3_run.read_parquet("eval", "_summary").model) == {"base", "sft", "grpo"}


def test_a_retry_on_a_fresh_machine_resumes_from_the_checkpoint_in_the_bucket(s3_run):
    assert s3_run.resumed.status == "completed"
    assert [s3_run.resumed.results[s]["status"] for s in ("sft", "grpo", "eval")] == ["done"] * 3
    run_key = s3_run.read_json("sft", "model", TRAIN_INFO_FILE)["run_key"]
    result = s3_run.read_json("sft", "_work", "train", run_key, "result.json")
    assert result["resumed_from_step"] == s3_run.killed_at_step and result["steps"] == SFT_STEPS
    # Every step's metrics exactly once: the killed run's steps came back with the checkpoint.
    metrics = s3_run.read_parquet("sft", "metrics.parquet")
    assert list(metrics.columns) == TRAIN_METRICS.columns
    assert sorted(metrics.query("name == 'loss'").step) == list(range(1, SFT_STEPS + 1))


def test_a_rerun_without_local_staging_is_fully_cached(s3_run):
    assert s3_run.cached.status == "completed"
    assert {s: r["status"] for s, r in s3_run.cached.results.items()} == {s: "cached" for s in STAGE_NAMES}


def test_status_and_report_commands_on_the_bucket(s3_run):
    status = run_cli("status", s3_run.workdir, timeout=120)
    assert status.returncode == 0, status.stderr[-2000:]
    rows = {ln.split()[0]: ln.split()[1] for ln in status.stdout.splitlines() if ln.split() and ln.split()[0] in STAGE_NAMES}
    assert rows == {s: "cached" for s in STAGE_NAMES}

    s3_run.fs.rm(s3_run.key("report", "index.html"))
    report = run_cli("report", s3_run.workdir, timeout=120)
    assert report.returncode == 0, report.stderr[-2000:]
    assert report.stdout.strip() == f"{s3_run.workdir}/report/index.html"
    html = s3_run.fs.cat_file(s3_run.key("report", "index.html")).decode()
    assert "<img alt='clip of " in html and "data:image/jpeg;base64," in html  # thumbnails of the clips in the bucket
    for chart in ("SFT loss", "GRPO reward", "Accuracy per category and model"):  # drawn from the stages' tables
        assert f"<img alt='{chart}' src='data:image/png;base64," in html, chart


def test_local_staging_is_outside_the_bucket_and_per_workdir(s3_run, tmp_path):
    staging = staged_dir(Workdir(s3_run.workdir), "sft")
    assert staging.mirrored and staging.local.is_relative_to(cache_dir() / STAGING_DIR)
    assert staged_dir(Workdir(s3_run.workdir + "/"), "sft").local == staging.local
    assert staged_dir(Workdir(f"{s3_run.bucket}/other"), "sft").local != staging.local
    local = staged_dir(Workdir(str(tmp_path)), "sft")
    assert not local.mirrored and local.local == tmp_path / "sft"


# ------------------------------------------------------------------------------------------------
# The mirroring protocol on its own (no training): what the pipeline run above relies on
# ------------------------------------------------------------------------------------------------
def fake_checkpoint(root: Path, step: int, run_key: str) -> Path:
    """A complete checkpoint folder as the trainer leaves it (nested files, state written last)."""
    folder = step_dir(root, step)
    (folder / "optimizer" / "state").mkdir(parents=True)
    (folder / "optimizer" / "state" / "optim.pt").write_bytes(os.urandom(64))
    (folder / "metrics.parquet").write_bytes(b"rows up to %d" % step)
    write_state(folder, TrainerState(run_key, step, 10, float(step)))
    return folder


def test_checkpoints_upload_complete_prune_like_local_and_come_back(s3_bucket, s3_server, tmp_path, monkeypatch):  # noqa: F811
    monkeypatch.setenv("LVR_CACHE_DIR", str(tmp_path / "machine-1"))
    fs = s3_server.filesystem
    staged = staged_dir(Workdir(f"{s3_bucket}/run"), "sft")
    remote_root = staged.remote_path(CHECKPOINTS_DIR)
    # Left in the bucket by a machine that died: a partial upload and another configuration's checkpoint.
    fs.pipe_file(f"{remote_root}/step-9/metrics.parquet", b"partial")
    fs.pipe_file(f"{remote_root}/step-7/{STATE_FILE}", json.dumps(vars(TrainerState("other", 7, 10, 7.0))).encode())
    local_root = staged.local_path(CHECKPOINTS_DIR)

    uploader = CheckpointUploader(staged, "run-a", keep=2)
    fake_checkpoint(local_root, 2, "run-a")
    uploader.sync()
    assert remote_checkpoint_steps(fs, f"{s3_bucket}/run", "sft") == [2]
    assert sorted(fs.find(f"{remote_root}/step-2")) == sorted(
        f"{remote_root}/step-2/{rel}" for rel in ("optimizer/state/optim.pt", "metrics.parquet", STATE_FILE)
    )
    for step in (4, 6):
        fake_checkpoint(local_root, step, "run-a")
        uploader.sync()
    # The run's two newest stay, as on disk; the partial upload and the other run's are gone.
    assert sorted(p.rsplit("/", 1)[1] for p in fs.ls(remote_root, detail=False)) == ["step-4", "step-6"]
    assert fs.cat_file(f"{remote_root}/step-6/metrics.parquet") == b"rows up to 6"

    # A fresh machine downloads the newest checkpoint, whole and in place; one that is ahead keeps its own.
    monkeypatch.setenv("LVR_CACHE_DIR", str(tmp_path / "machine-2"))
    fresh = staged_dir(staged.workdir, "sft")
    assert fresh.local != staged.local
    assert pull_newest_checkpoint(fresh, "run-a") == 6
    pulled = step_dir(fresh.local_path(CHECKPOINTS_DIR), 6)
    assert (pulled / "metrics.parquet").read_bytes() == b"rows up to 6" and (pulled / "optimizer" / "state" / "optim.pt").is_file()
    assert [s.step for _, s in checkpoints(fresh.local_path(CHECKPOINTS_DIR), "run-a")] == [6]
    assert [p.name for p in fresh.local_path(CHECKPOINTS_DIR).iterdir()] == ["step-6"]  # no temporary left
    fake_checkpoint(fresh.local_path(CHECKPOINTS_DIR), 8, "run-a")
    assert pull_newest_checkpoint(fresh, "run-a") == 8
    assert pull_newest_checkpoint(fresh, "run-b") is None


def test_pushing_a_folder_replaces_it_and_withdraws_an_old_marker(s3_bucket, s3_server, tmp_path):  # noqa: F811
    fs = s3_server.filesystem
    remote = f"{s3_bucket[5:]}/model"
    local = tmp_path / "model"
    local.mkdir()
    (local / "weights.bin").write_bytes(b"new weights")
    (local / ".config.json.tmp-1234").write_text("being written")  # an atomic writer's temporary: not state
    fs.pipe_file(f"{remote}/stale.bin", b"old")
    fs.pipe_file(f"{remote}/{TRAIN_INFO_FILE}", b'{"run_key": "old"}')
    # The local folder has no marker (yet): the remote one no longer claims to be complete.
    push_dir(local, fs, remote, marker=TRAIN_INFO_FILE)
    assert sorted(fs.find(remote)) == [f"{remote}/weights.bin"]
    (local / TRAIN_INFO_FILE).write_text('{"run_key": "new"}')
    push_dir(local, fs, remote, marker=TRAIN_INFO_FILE)
    assert json.loads(fs.cat_file(f"{remote}/{TRAIN_INFO_FILE}")) == {"run_key": "new"}
    assert sorted(fs.find(remote)) == [f"{remote}/{TRAIN_INFO_FILE}", f"{remote}/weights.bin"]


def test_a_model_in_the_bucket_is_fetched_once_per_identity(s3_bucket, s3_server, tmp_path, monkeypatch):  # noqa: F811
    monkeypatch.setenv("LVR_CACHE_DIR", str(tmp_path / "cache"))
    fs = s3_server.filesystem
    uri = f"{s3_bucket}/run/sft/model"
    fs.pipe_file(f"{uri[5:]}/config.json", b"v1")
    first = local_model(uri, "fingerprint-1")
    assert Path(first).is_relative_to(tmp_path / "cache" / MODELS_DIR) and (Path(first) / "config.json").read_bytes() == b"v1"
    fs.pipe_file(f"{uri[5:]}/config.json", b"v2")
    assert local_model(uri, "fingerprint-1") == first and (Path(first) / "config.json").read_bytes() == b"v1"  # not fetched again
    second = local_model(uri, "fingerprint-2")  # the producing stage was rerun: a new copy
    assert second != first and (Path(second) / "config.json").read_bytes() == b"v2"
    assert local_model(str(tmp_path), "x") == str(tmp_path) and local_model("Qwen/Qwen2.5-VL-7B-Instruct", "x") == "Qwen/Qwen2.5-VL-7B-Instruct"
    with pytest.raises(FileNotFoundError):
        local_model(f"{s3_bucket}/run/grpo/model", "fingerprint-1")


def test_a_source_bucket_that_gains_a_video_is_listed_again(s3_bucket, s3_server, tmp_path):  # noqa: F811
    """A long-lived process (a Prefect worker) must see videos added since its last listing."""
    from tasks.media.sources import list_sources

    video = make_video(tmp_path / "a.mp4", 1, audio=False)
    fs = s3_server.filesystem
    fs.put_file(str(video), f"{s3_bucket[5:]}/videos/a.mp4")
    for source in (f"{s3_bucket}/videos", f"glob:{s3_bucket}/videos/*.mp4"):
        assert [v.uri for v in list_sources(source, [".mp4"])] == [f"{s3_bucket}/videos/a.mp4"]
    fs.put_file(str(video), f"{s3_bucket[5:]}/videos/b.mp4")
    for source in (f"{s3_bucket}/videos", f"glob:{s3_bucket}/videos/*.mp4"):
        listed = list_sources(source, [".mp4"])
        assert [v.uri for v in listed] == [f"{s3_bucket}/videos/a.mp4", f"{s3_bucket}/videos/b.mp4"], source
        assert all(v.size == video.stat().st_size and v.mtime for v in listed)


def test_eval_names_models_in_a_bucket_by_url_and_sees_them_rewritten(s3_bucket, s3_server):  # noqa: F811
    from tasks.eval.stage import resolve_models

    fs = s3_server.filesystem
    folder = f"{s3_bucket}/checkpoints/mine"
    fs.pipe_file(f"{folder[5:]}/model.safetensors", b"1")
    cfg = load_config("tiny", {"eval.models": [folder, "sft"]}).eval
    workdir = Workdir(f"{s3_bucket}/run")
    (model,), notes = resolve_models(workdir, cfg, "tiny")
    assert model.path == folder and notes == [f"sft: skipped, the sft stage has not produced {s3_bucket}/run/sft/model yet"]
    fs.pipe_file(f"{folder[5:]}/model.safetensors", b"22")
    assert resolve_models(workdir, cfg, "tiny")[0][0].identity != model.identity


def test_remote_media_is_downloaded_once_per_content_and_evicted_least_recent_first(s3_bucket, s3_server, tmp_path, monkeypatch):  # noqa: F811
    """SFT and GRPO read a video's frames every step: a remote video must not cost a download each time."""
    import time

    from tasks.media.cache import (
        MEDIA_CACHE_DIR,
        RECENTLY_USED_S,
        evict_media,
        local_copy,
    )

    monkeypatch.setenv("LVR_CACHE_DIR", str(tmp_path / "cache"))
    fs = s3_server.filesystem
    key = f"{s3_bucket[5:]}/videos/a.mp4"
    fs.pipe_file(key, b"first version")
    with local_copy(f"{s3_bucket}/videos/a.mp4") as first:
        assert first.is_relative_to(tmp_path / "cache" / MEDIA_CACHE_DIR) and first.read_bytes() == b"first version"
    inode = first.stat().st_ino
    with local_copy(f"{s3_bucket}/videos/a.mp4") as again:
        assert again == first and again.stat().st_ino == inode  # the same file: not downloaded again
    fs.pipe_file(key, b"second, longer version")  # rewritten in the bucket: a new copy
    with local_copy(f"{s3_bucket}/videos/a.mp4") as second:
        assert second != first and second.read_bytes() == b"second, longer version"
    assert first.exists() and not list((tmp_path / "cache" / MEDIA_CACHE_DIR).glob("*/.*tmp-*"))

    # Over the limit: the least recently used file goes first, recently used ones stay.
    monkeypatch.setenv("LVR_MEDIA_CACHE_GB", str(30 / 2**30))  # room for one of the two files
    old = time.time() - RECENTLY_USED_S - 60
    os.utime(first, (old, old))
    os.utime(second, (old + 1, old + 1))
    assert evict_media(tmp_path / "cache" / MEDIA_CACHE_DIR) == [first]
    assert second.exists()
    os.utime(second, None)  # just used
    monkeypatch.setenv("LVR_MEDIA_CACHE_GB", "0")
    assert evict_media(tmp_path / "cache" / MEDIA_CACHE_DIR) == [] and second.exists()
