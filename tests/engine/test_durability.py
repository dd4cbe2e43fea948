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
