"""Markers are durable only after what they vouch for: files flushed, then the rename's directory."""

from __future__ import annotations

import os

import pytest

from tasks.engine.store import LOCAL, write_json_atomic
from tasks.media.ffmpeg import CutPlan, cut_video
from tasks.training.checkpoints import fsync_tree
from tests.support.videos import make_video


@pytest.fixture
def flushed(monkeypatch):
    """The paths os.fsync is called on, in order (read back from the descriptor)."""
    calls: list[str] = []
    real = os.fsync

    def recording(fd):
        calls.append(os.readlink(f"/proc/self/fd/{fd}"))
        return real(fd)

    monkeypatch.setattr(os, "fsync", recording)
    return calls


def test_an_atomic_write_flushes_the_file_then_its_directory(tmp_path, flushed):
    target = tmp_path / "stage" / "_manifest.json"
    write_json_atomic(LOCAL, str(target), {"status": "complete"})
    assert flushed[-1] == str(tmp_path / "stage")  # the rename is made durable last
    assert any(p.startswith(str(tmp_path / "stage" / "._manifest.json.tmp-")) for p in flushed[:-1])  # the data before it


def test_clips_are_flushed_before_they_appear(tmp_path, flushed):
    video = make_video(tmp_path / "v.mp4", 6, gop=25, audio=False)
    clips = cut_video(video, tmp_path / "clips", CutPlan(cut_points=(3.0,), mode="copy", max_snap_deviation_s=0.0), stem="v")
    assert len(clips) == 2
    names = [os.path.basename(p) for p in flushed]
    assert all(os.path.basename(c.path) in names for c in clips)
    assert flushed[-1] == str(tmp_path / "clips")


def test_a_checkpoint_tree_is_flushed_whole(tmp_path, flushed):
    folder = tmp_path / ".tmp-step-2"
    (folder / "optimizer" / "state").mkdir(parents=True)
    for name in ("optimizer/state/mp_rank_00_model_states.pt", "rng-rank-00000.pt", "trainer_state.json"):
        (folder / name).write_bytes(b"x")
    fsync_tree(folder)
    assert set(flushed) == {str(p) for p in folder.rglob("*")} | {str(folder)}
    assert flushed[-1] == str(folder)


def test_a_clip_shard_is_synced_once_before_its_marker(tmp_path, flushed, monkeypatch):
    """The clip stage flushes a shard's clips with one filesystem sync instead of an fsync per clip;
    that sync must follow every clip's rename and precede the shard's marker."""
    import tasks.clip.stage as clip_stage
    from tasks.clip.stage import ClipStage
    from tasks.config import load_config
    from tasks.engine.run import SHARD_DONE, run_stage
    from tasks.engine.stage import StageContext
    from tasks.engine.store import Workdir

    make_video(tmp_path / "videos" / "a.mp4", 22, gop=25, audio=False)
    make_video(tmp_path / "videos" / "b.mp4", 12, gop=25, audio=False)
    real_sync = clip_stage.sync_filesystem
    clips_at_sync: list[int] = []

    def recording(path):
        flushed.append(f"syncfs:{path}")
        clips_at_sync.append(len(list((tmp_path / "wd").rglob("*-0000[0-9].mp4"))))
        return real_sync(path)

    monkeypatch.setattr(clip_stage, "sync_filesystem", recording)
    ctx = StageContext(workdir=Workdir(str(tmp_path / "wd")), config=load_config("tiny"), source=str(tmp_path / "videos"))
    report = run_stage(ClipStage(), ctx)

    events = ["sync" if p.startswith("syncfs:") else "marker" for p in flushed
              if p.startswith("syncfs:") or os.path.basename(p).startswith(f".{SHARD_DONE}.tmp-")]
    n_shards = events.count("marker")
    assert n_shards >= 1 and events == ["sync", "marker"] * n_shards  # each shard synced once, then marked
    assert clips_at_sync[-1] == report.manifest["rows"] == 3  # each sync follows its shard's renames
    assert not any(p.endswith(".mp4") for p in flushed)  # no fsync per clip any more
