"""Tests of tasks.samples.videos: real renders of the sample videos with ffmpeg."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

import tasks.samples.videos as sample_videos
from tasks.media.ffmpeg import MediaError, VideoProbe, plan_cuts, probe_video
from tasks.samples.videos import (
    SAMPLE_SPECS,
    SCENES_FILE,
    SampleSpec,
    built_in_sample,
    find_font,
    scenes_of,
    write_sample_video,
    write_sample_videos,
)

TINY_SPEC = SampleSpec(
    name="tiny",
    seconds=2,
    fps=10,
    gop=10,
    width=160,
    height=120,
    scenes=(("solid red", "color=c=red"), ("solid blue", "color=c=blue")),
)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def samples() -> list[Path]:
    """The videos `lvr run` clips by default, in the suite's cache: rendered once per test session, here
    or by whichever other test's run needs them first."""
    return sorted(built_in_sample().glob("*.mp4"))


@pytest.fixture(scope="module")
def probes(samples: list[Path]) -> list[VideoProbe]:
    return [probe_video(path) for path in samples]


def rgb_frame(path: Path, at_s: float, width: int, height: int) -> np.ndarray:
    raw = subprocess.run(
        ["ffmpeg", "-v", "error", "-ss", str(at_s), "-i", str(path), "-frames:v", "1",
         "-f", "rawvideo", "-pix_fmt", "rgb24", "-"],
        check=True, capture_output=True,
    ).stdout
    return np.frombuffer(raw, dtype=np.uint8).reshape(height, width, 3)


def dominant_tone_hz(path: Path, at_s: float) -> float:
    rate = sample_videos.AUDIO_SAMPLE_RATE
    raw = subprocess.run(
        ["ffmpeg", "-v", "error", "-ss", str(at_s), "-t", "1", "-i", str(path), "-vn",
         "-f", "f32le", "-ac", "1", "-ar", str(rate), "-"],
        check=True, capture_output=True,
    ).stdout
    samples = np.frombuffer(raw, dtype=np.float32)
    spectrum = np.abs(np.fft.rfft(samples))
    return float(np.fft.rfftfreq(len(samples), 1 / rate)[spectrum.argmax()])


def test_specs_describe_six_long_videos() -> None:
    assert len(SAMPLE_SPECS) == 6
    assert len({spec.name for spec in SAMPLE_SPECS}) == 6
    for spec in SAMPLE_SPECS:
        assert 60 <= spec.seconds <= 180
        assert 10 <= spec.scene_seconds <= 25
        assert len({source for _, source in spec.scenes}) == len(spec.scenes)


def test_videos_match_their_specs(samples: list[Path], probes: list[VideoProbe]) -> None:
    assert [path.name for path in samples] == [f"{spec.name}.mp4" for spec in SAMPLE_SPECS]
    for spec, probe in zip(SAMPLE_SPECS, probes):
        assert probe.duration_s == pytest.approx(spec.seconds, abs=0.05)
        assert probe.fps == pytest.approx(spec.fps)
        assert probe.n_frames == spec.seconds * spec.fps
        assert (probe.width, probe.height) == (spec.width, spec.height)
        assert (probe.video_codec, probe.audio_codec) == ("h264", "aac")


def test_keyframes_follow_the_fixed_gop(probes: list[VideoProbe]) -> None:
    for spec, probe in zip(SAMPLE_SPECS, probes):
        assert spec.gop is not None
        spacing = spec.gop / spec.fps
        expected = [k * spacing for k in range(int(np.ceil(spec.seconds / spacing)))]
        assert probe.keyframe_times == pytest.approx(expected, abs=1e-5), spec.name
    assert SAMPLE_SPECS[0].gop / SAMPLE_SPECS[0].fps == pytest.approx(8.3333, abs=1e-4)


def test_gop250_sample_needs_exact_mode_and_others_copy(probes: list[VideoProbe]) -> None:
    modes = [plan_cuts(p.duration_s, p.keyframe_times, 10, 3, 2, "copy").mode for p in probes]
    assert modes == ["exact", *["copy"] * (len(SAMPLE_SPECS) - 1)]


def test_scenes_json_matches_the_videos(samples: list[Path], probes: list[VideoProbe]) -> None:
    document = json.loads((samples[0].parent / SCENES_FILE).read_text())
    assert [video["file"] for video in document["videos"]] == [path.name for path in samples]
    for spec, probe, video in zip(SAMPLE_SPECS, probes, document["videos"]):
        scenes = video["scenes"]
        assert [scene["label"] for scene in scenes] == [label for label, _ in spec.scenes]
        assert scenes[0]["start_s"] == 0.0
        assert all(a["end_s"] == b["start_s"] for a, b in zip(scenes, scenes[1:]))
        assert scenes[-1]["end_s"] == pytest.approx(probe.duration_s, abs=0.05)
        assert video["duration_s"] == pytest.approx(probe.duration_s, abs=0.05)
        assert len({scene["tone_hz"] for scene in scenes}) == len(scenes)


def test_scene_label_is_burned_in(samples: list[Path]) -> None:
    spec = SAMPLE_SPECS[0]
    scene = scenes_of(spec)[-1]
    assert scene.source == "color=c=red"
    frame = rgb_frame(samples[0], (scene.start_s + scene.end_s) / 2, spec.width, spec.height).astype(int)
    top, bottom = frame[: spec.height // 2], frame[-spec.height // 6 :]
    assert np.abs(top - [255, 0, 0]).max() < 40  # plain red where no text is drawn
    white = (bottom > 200).all(axis=-1)  # glyphs are white, the red background is not
    assert white.sum() > 50


def test_each_scene_has_its_own_tone(samples: list[Path]) -> None:
    for scene in scenes_of(SAMPLE_SPECS[2])[:2]:
        assert dominant_tone_hz(samples[2], scene.start_s + 5) == pytest.approx(scene.tone_hz, abs=3)


@pytest.mark.parametrize("index", range(len(SAMPLE_SPECS)))
def test_rendering_is_deterministic(tmp_path: Path, index: int) -> None:
    # Every spec's scenes rendered twice: seeded random sources (life, cellauto) included, and the geq
    # scene that replaced ffmpeg's `gradients` source (other pixels on every run, from the first frame).
    # Two seconds a scene: rendering the whole sample again cost a minute of ffmpeg per test run.
    spec = dataclasses.replace(SAMPLE_SPECS[index], seconds=2 * len(SAMPLE_SPECS[index].scenes))
    first = write_sample_video(spec, tmp_path / "first.mp4", font=find_font())
    again = write_sample_video(spec, tmp_path / "again.mp4", font=find_font())
    assert probe_video(first).n_frames == spec.seconds * spec.fps
    assert sha256(again) == sha256(first)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["again.mp4", "first.mp4"]


def test_two_writers_of_one_sample_folder_both_end_with_whole_videos(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two runs on a fresh machine fill the shared sample cache at once: both render the missing video,
    each into its own temporary (one fixed name had both ffmpegs write one file, the second rename fail)."""
    monkeypatch.setattr(sample_videos, "SAMPLE_SPECS", (dataclasses.replace(TINY_SPEC, seconds=10),))
    with ThreadPoolExecutor(max_workers=2) as pool:
        written = list(pool.map(write_sample_videos, [tmp_path, tmp_path]))
    assert written == [[tmp_path / "tiny.mp4"]] * 2
    assert probe_video(tmp_path / "tiny.mp4").n_frames == 100
    assert sorted(p.name for p in tmp_path.iterdir()) == [SCENES_FILE, "tiny.mp4"]  # no temporary left


def test_existing_videos_are_kept_unless_overwrite(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(sample_videos, "SAMPLE_SPECS", (TINY_SPEC,))
    with caplog.at_level("INFO", logger="lvr.samples"):
        [path] = write_sample_videos(tmp_path)
    first = path.stat()
    assert probe_video(path).n_frames == 20
    assert caplog.messages == [f"writing the built-in sample: 1 video (0:02 in all) into {tmp_path}"]  # the wait is announced

    caplog.clear()
    with caplog.at_level("INFO", logger="lvr.samples"):
        write_sample_videos(tmp_path)
    assert caplog.messages == []  # nothing to write: nothing said
    assert (path.stat().st_ino, path.stat().st_mtime_ns) == (first.st_ino, first.st_mtime_ns)

    path.write_bytes(b"stale")
    write_sample_videos(tmp_path, overwrite=True)
    assert probe_video(path).n_frames == 20
    assert sorted(p.name for p in tmp_path.iterdir()) == [SCENES_FILE, "tiny.mp4"]


def test_render_failure_leaves_no_file(tmp_path: Path) -> None:
    broken = SampleSpec("broken", 2, (("nothing", "no_such_source"),), fps=10, gop=10, width=160, height=120)
    with pytest.raises(MediaError) as caught:
        write_sample_video(broken, tmp_path / "broken.mp4", font=find_font())
    assert caught.value.kind == "ffmpeg_failed"
    assert "no_such_source" in caught.value.message
    assert list(tmp_path.iterdir()) == []


def test_missing_font_names_the_debian_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sample_videos, "FONT_PATH", tmp_path / "absent.ttf")
    with pytest.raises(FileNotFoundError, match="fonts-dejavu-core"):
        write_sample_videos(tmp_path / "out")


@pytest.mark.parametrize(
    "changes, problem",
    [
        ({"seconds": 3}, "whole seconds"),
        ({"scenes": ()}, "whole seconds"),
        ({"scenes": (("it's 100%", "color"),)}, "label"),
        ({"name": "../up"}, "name"),
    ],
)
def test_spec_validation(changes: dict, problem: str) -> None:
    fields = {**TINY_SPEC.__dict__, **changes}
    with pytest.raises(ValueError, match=problem):
        SampleSpec(**fields)
