"""The clip stage end to end on real files: modes, fallback, bad inputs, sources, duplicates."""

from __future__ import annotations

import shutil

import pandas as pd
import pyarrow.parquet as pq
import pytest

from tasks.clip.stage import ClipStage
from tasks.config import load_config
from tasks.engine.run import run_stage
from tasks.engine.stage import StageContext
from tasks.engine.store import Workdir
from tests.support.videos import make_video


def _run(tmp_path, source, *overrides, workdir="wd"):
    cfg = load_config("tiny", list(overrides))
    ctx = StageContext(workdir=Workdir(str(tmp_path / workdir)), config=cfg, source=str(source))
    return run_stage(ClipStage(), ctx)


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("src")
    make_video(root / "good_gop2s.mp4", 32, fps=25, gop=50)
    make_video(root / "nested" / "gop250.mp4", 35, fps=30, gop=250, source="smptebars")
    (root / "empty.mp4").write_bytes(b"")
    (root / "notes.mp4").write_text("this is not a video\n" * 50)
    audio = root / "audio_only.mp4"
    import subprocess

    subprocess.run(
        ["ffmpeg", "-nostdin", "-y", "-loglevel", "error", "-f", "lavfi", "-i", "sine=frequency=220:duration=5", "-c:a", "aac", str(audio)],
        check=True,
    )
    whole = make_video(root / "_tmp_whole.mp4", 12, fps=25, gop=25)
    (root / "truncated.mp4").write_bytes(whole.read_bytes()[: whole.stat().st_size // 3])
    whole.unlink()
    (root / "README.txt").write_text("ignored: not a video extension")
    return root


def test_clip_stage_on_mixed_directory(tmp_path, sources):
    report = _run(tmp_path, sources)
    stage_dir = tmp_path / "wd" / "clip"
    clips = pd.read_parquet(stage_dir)
    videos = pd.read_parquet(stage_dir / "_videos")
    failures = pq.read_table(stage_dir / "_failures.parquet").to_pandas()

    assert sorted(videos["uri"].map(lambda u: u.rsplit("/", 1)[-1])) == ["good_gop2s.mp4", "gop250.mp4"]
    modes = dict(zip(videos["uri"].map(lambda u: u.rsplit("/", 1)[-1]), videos["clip_mode"]))
    # Keyframes every 2 s snap within the 2 s limit; a 250-frame GOP at 30 fps (8.33 s) cannot.
    assert modes == {"good_gop2s.mp4": "copy", "gop250.mp4": "exact"}

    assert set(failures["failure_class"]) == {"input"}  # bad videos: no retry would help
    kinds = dict(zip(failures["item_id"].map(lambda u: u.rsplit("/", 1)[-1]), failures["error_kind"]))
    assert kinds == {
        "empty.mp4": "empty_file",
        "notes.mp4": "not_a_video",
        "audio_only.mp4": "no_video_stream",
        "truncated.mp4": "corrupt",
    }
    assert (failures["stage"] == "clip").all() and failures["message"].str.len().min() > 5

    for video_id, group in clips.groupby("video_id"):
        group = group.sort_values("clip_index")
        video = videos.set_index("video_id").loc[video_id]
        assert group["clip_index"].tolist() == list(range(len(group))) == list(range(video["n_clips"]))
        assert group["start_s"].iloc[0] == pytest.approx(0.0, abs=0.05)
        assert group["end_s"].iloc[-1] == pytest.approx(video["duration_s"], abs=0.1)
        frame = 1.0 / video["fps"]
        # Contiguous: each clip starts where the previous one ended (true, measured boundaries).
        gaps = group["start_s"].iloc[1:].to_numpy() - group["end_s"].iloc[:-1].to_numpy()
        assert abs(gaps).max() <= frame + 1e-6
        assert (group["duration_s"] >= 3.0 - frame).all()
        assert group["n_frames"].sum() == pytest.approx(video["n_frames"], abs=len(group))
        assert group["clip_id"].tolist() == [f"{video_id}-{i:05d}" for i in range(len(group))]
        for uri in group["clip_uri"]:
            assert uri.startswith(str(stage_dir / "_media")) and (tmp_path / uri).exists()

    exact = clips[clips["mode"] == "exact"].sort_values("clip_index")
    assert exact["start_s"].round(2).tolist()[:3] == [0.0, 10.0, 20.0]
    copy = clips[clips["mode"] == "copy"].sort_values("clip_index")
    assert copy["start_s"].round(2).tolist() == [0.0, 10.0, 20.0]  # keyframes at every 2 s hit the marks
    assert report.rows == len(clips) and report.failures == 4


def test_copy_mode_snaps_when_deviation_allowed(tmp_path, sources):
    _run(tmp_path, sources / "nested", "clip.max_deviation_s=5")
    clips = pd.read_parquet(tmp_path / "wd" / "clip").sort_values("clip_index")
    assert set(clips["mode"]) == {"copy"}
    # Snapped to the keyframes nearest 10 s and 20 s: 8.33 s and 16.67 s (or 25 s); never mid-GOP.
    starts = clips["start_s"].tolist()
    assert all(abs(s / (250 / 30) - round(s / (250 / 30))) < 0.01 for s in starts)
    assert starts[1] == pytest.approx(250 / 30, abs=0.01)


def test_video_id_is_content_derived_and_duplicates_reported(tmp_path, sources):
    src = tmp_path / "dups"
    src.mkdir()
    shutil.copy(sources / "good_gop2s.mp4", src / "a.mp4")
    shutil.copy(sources / "good_gop2s.mp4", src / "b.mp4")
    _run(tmp_path, src, "clip.shard_size=1")
    videos = pd.read_parquet(tmp_path / "wd" / "clip" / "_videos")
    failures = pq.read_table(tmp_path / "wd" / "clip" / "_failures.parquet").to_pandas()
    assert videos["uri"].str.endswith("a.mp4").tolist() == [True]
    assert failures["error_kind"].tolist() == ["duplicate"] and failures["item_id"].iloc[0].endswith("b.mp4")
    first = _run(tmp_path, sources / "good_gop2s.mp4", workdir="other")
    assert pd.read_parquet(tmp_path / "other" / "clip" / "_videos")["video_id"].tolist() == videos["video_id"].tolist()
    assert first.rows == len(pd.read_parquet(tmp_path / "wd" / "clip"))


def test_list_file_manifest_and_glob_sources(tmp_path, sources):
    listing = tmp_path / "videos.txt"
    listing.write_text(f"# two videos\n{sources / 'good_gop2s.mp4'}\nnested/gop250.mp4\n")
    shutil.copy(listing, sources / "list.txt")
    report = _run(tmp_path, sources / "list.txt", workdir="from_list")
    assert report.failures == 0 and len(pd.read_parquet(tmp_path / "from_list" / "clip" / "_videos")) == 2

    csv = sources / "manifest.csv"
    csv.write_text(f"uri,label\n{sources / 'good_gop2s.mp4'},a\nempty.mp4,b\n")
    report = _run(tmp_path, csv, workdir="from_csv")
    assert report.failures == 1 and len(pd.read_parquet(tmp_path / "from_csv" / "clip" / "_videos")) == 1

    report = _run(tmp_path, f"glob:{sources}/good_*.mp4", workdir="from_glob")
    assert report.failures == 0 and report.manifest["items"] == 1


def test_missing_source_is_a_clear_error(tmp_path):
    from tasks.engine.stage import StageError

    with pytest.raises(StageError, match="does not exist"):
        _run(tmp_path, tmp_path / "nowhere")


def test_source_that_gained_videos_only_processes_the_new_ones(tmp_path):
    src = tmp_path / "grow"
    for name, seconds in (("b.mp4", 12), ("d.mp4", 13), ("f.mp4", 14)):
        make_video(src / name, seconds, fps=25, gop=25)
    first = _run(tmp_path, src, "clip.shard_size=2")
    assert first.manifest["items_computed"] == 3
    # New videos sort between the old ones, so every shard's membership changes.
    for name, seconds in (("a.mp4", 15), ("c.mp4", 16)):
        make_video(src / name, seconds, fps=25, gop=25, source="smptebars")
    refresh = _run(tmp_path, src, "clip.shard_size=2")
    assert refresh.status == "done" and refresh.manifest["items_computed"] == 2
    clean = _run(tmp_path, src, "clip.shard_size=2", workdir="clean")
    cols = ["clip_id", "video_id", "start_s", "end_s", "n_frames", "source_uri"]
    assert pd.read_parquet(tmp_path / "wd" / "clip")[cols].equals(pd.read_parquet(tmp_path / "clean" / "clip")[cols])
    assert refresh.rows == clean.rows and len(pd.read_parquet(tmp_path / "wd" / "clip" / "_videos")) == 5
