"""Tests of tasks.media against real ffmpeg/ffprobe on tiny generated videos."""

from __future__ import annotations

import hashlib
import os
import pickle
import random
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tasks.media.ffmpeg import (
    ClipFile,
    CutPlan,
    MediaError,
    VideoProbe,
    _rotation_cw,
    content_id,
    cut_video,
    measure_clip,
    plan_cuts,
    probe_video,
    run_tool,
)
from tests.support.processes import trainer_pids

REPO_ROOT = Path(__file__).resolve().parents[2]
GOP250_KEYFRAMES = (0.0, 250 / 30, 500 / 30, 750 / 30, 1000 / 30)


def make_video(
    path: Path,
    *,
    seconds: float,
    rate: str = "30",
    gop: int = 250,
    audio: bool = True,
    size: str = "160x120",
) -> Path:
    """A testsrc2 video with a fixed GOP, B-frames (veryfast) and optionally a sine track."""
    argv = ["ffmpeg", "-hide_banner", "-nostdin", "-v", "error", "-y",
            "-f", "lavfi", "-i", f"testsrc2=size={size}:rate={rate}:duration={seconds}"]
    if audio:
        argv += ["-f", "lavfi", "-i", f"sine=frequency=440:duration={seconds}", "-c:a", "aac"]
    argv += ["-c:v", "libx264", "-preset", "veryfast", "-pix_fmt", "yuv420p",
             "-g", str(gop), "-keyint_min", str(gop), "-sc_threshold", "0", str(path)]
    subprocess.run(argv, check=True)
    return path


def ffmpeg_ok(*args: str) -> None:
    subprocess.run(["ffmpeg", "-hide_banner", "-nostdin", "-v", "error", "-y", *args], check=True)


def gray_frame(path: Path, *extra_input_args: str) -> np.ndarray:
    """First frame of a video as a 2-D uint8 array, as ffmpeg decodes it."""
    size = subprocess.run(
        ["ffmpeg", "-v", "error", *extra_input_args, "-i", str(path), "-frames:v", "1",
         "-f", "image2pipe", "-c:v", "pgm", "-"],
        check=True, capture_output=True,
    ).stdout
    header, width, height, maxval, pixels = size.split(maxsplit=4)
    assert header == b"P5" and maxval == b"255"
    return np.frombuffer(pixels, dtype=np.uint8).reshape(int(height), int(width))


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """35 s, 30 fps, keyframes every 250 frames (8.333 s), with audio."""
    return make_video(tmp_path_factory.mktemp("source") / "source.mp4", seconds=35)


@pytest.fixture(scope="module")
def source_probe(source: Path) -> VideoProbe:
    return probe_video(source)


# ---------------------------------------------------------------- probe_video


def test_probe_reports_stream_facts(source: Path, source_probe: VideoProbe) -> None:
    p = source_probe
    assert p.duration_s == pytest.approx(35.0, abs=1e-3)
    assert p.fps == pytest.approx(30.0)
    assert (p.width, p.height) == (160, 120)
    assert (p.video_codec, p.pix_fmt, p.rotation) == ("h264", "yuv420p", 0)
    assert p.has_audio and p.audio_codec == "aac"
    assert "mp4" in p.container.split(",")
    assert p.size_bytes == source.stat().st_size
    assert p.bit_rate is not None and p.bit_rate > 0
    assert p.n_frames == 35 * 30
    assert p.keyframe_times == pytest.approx(GOP250_KEYFRAMES, abs=1e-5)


def test_probe_without_audio(tmp_path: Path) -> None:
    p = probe_video(make_video(tmp_path / "silent.mp4", seconds=4, rate="25", gop=50, audio=False))
    assert not p.has_audio and p.audio_codec is None
    assert p.n_frames == 100
    assert p.keyframe_times == pytest.approx((0.0, 2.0), abs=1e-5)


def test_probe_rotation_matches_how_ffmpeg_displays_it(tmp_path: Path, source: Path) -> None:
    stored = make_video(tmp_path / "stored.mp4", seconds=1, audio=False)
    rotated = tmp_path / "rotated.mp4"
    # ffmpeg 5.1 turns the legacy rotate tag into a display matrix when stream copying.
    ffmpeg_ok("-i", str(stored), "-c", "copy", "-metadata:s:v:0", "rotate=90", str(rotated))

    p = probe_video(rotated)

    assert (p.width, p.height) == (160, 120)  # stored size, not displayed size
    assert p.rotation in (90, 270)
    picture = gray_frame(rotated, "-noautorotate")
    displayed = gray_frame(rotated)  # ffmpeg applies the display matrix by default
    turned = np.rot90(picture, k=-(p.rotation // 90))  # rot90 turns counter-clockwise for positive k
    assert turned.shape == displayed.shape
    assert np.abs(turned.astype(int) - displayed.astype(int)).mean() < 1.0


def test_rotation_from_legacy_tag_and_matrix_conventions() -> None:
    assert _rotation_cw({"tags": {"rotate": "90"}}) == 90
    assert _rotation_cw({"side_data_list": [{"side_data_type": "Display Matrix", "rotation": -90}]}) == 90
    assert _rotation_cw({"side_data_list": [{"side_data_type": "Display Matrix", "rotation": 180}]}) == 180
    assert _rotation_cw({}) == 0


def expect_media_error(path: Path, kind: str) -> MediaError:
    with pytest.raises(MediaError) as caught:
        probe_video(path)
    assert caught.value.kind == kind, caught.value.message
    assert str(path) in caught.value.message
    return caught.value


def test_missing_file(tmp_path: Path) -> None:
    expect_media_error(tmp_path / "nope.mp4", "missing")


def test_directory_is_unreadable(tmp_path: Path) -> None:
    error = expect_media_error(tmp_path, "unreadable")
    assert "directory" in error.message


def test_permission_denied_is_unreadable(tmp_path: Path, source: Path) -> None:
    locked = tmp_path / "locked.mp4"
    locked.write_bytes(source.read_bytes())
    locked.chmod(0)
    script = (
        "import sys\n"
        "from tasks.media.ffmpeg import MediaError, probe_video, content_id\n"
        "for check in (probe_video, content_id):\n"
        "    try:\n"
        "        check(sys.argv[1])\n"
        "    except MediaError as error:\n"
        "        print(error.kind)\n"
    )
    argv = [sys.executable, "-c", script, str(locked)]
    if os.geteuid() == 0:
        # Root reads files whatever their mode; without the DAC capabilities it cannot.
        argv = ["setpriv", "--bounding-set", "-dac_override,-dac_read_search", "--", *argv]
    result = subprocess.run(
        argv, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["unreadable", "unreadable"]


def test_empty_file(tmp_path: Path) -> None:
    empty = tmp_path / "empty.mp4"
    empty.touch()
    expect_media_error(empty, "empty_file")


@pytest.mark.parametrize("name", ["notes.txt", "notes.mp4", "notes"])
def test_text_file_is_not_a_video(tmp_path: Path, name: str) -> None:
    # ffprobe reads .txt as ANSI-art "video" and blames a missing moov atom for .mp4;
    # neither may pass as a video, nor count as a broken one.
    text = tmp_path / name
    text.write_text("this is a shopping list, not a video\n" * 20)
    expect_media_error(text, "not_a_video")


def test_still_image_is_not_a_video(tmp_path: Path) -> None:
    image = tmp_path / "frame.png"
    ffmpeg_ok("-f", "lavfi", "-i", "testsrc2=size=64x48", "-frames:v", "1", str(image))
    error = expect_media_error(image, "not_a_video")
    assert "still image" in error.message


def test_garbage_bytes_are_not_a_video(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.bin"
    garbage.write_bytes(random.Random(7).randbytes(50_000))
    expect_media_error(garbage, "not_a_video")


def test_audio_only_file_has_no_video_stream(tmp_path: Path) -> None:
    audio = tmp_path / "tone.m4a"
    ffmpeg_ok("-f", "lavfi", "-i", "sine=duration=2", "-c:a", "aac", str(audio))
    error = expect_media_error(audio, "no_video_stream")
    assert "audio" in error.message


def test_truncated_mp4_is_corrupt(tmp_path: Path, source: Path) -> None:
    # ffmpeg writes the moov index last, so the first 30% has no index at all.
    truncated = tmp_path / "truncated.mp4"
    data = source.read_bytes()
    truncated.write_bytes(data[: len(data) * 3 // 10])
    error = expect_media_error(truncated, "corrupt")
    assert "moov atom not found" in error.message


def test_truncated_faststart_mp4_is_corrupt(tmp_path: Path, source: Path) -> None:
    # With the index first, ffprobe opens it fine and believes the declared 35 s.
    faststart = tmp_path / "faststart.mp4"
    ffmpeg_ok("-i", str(source), "-c", "copy", "-movflags", "+faststart", str(faststart))
    truncated = tmp_path / "truncated_faststart.mp4"
    data = faststart.read_bytes()
    truncated.write_bytes(data[: len(data) * 3 // 10])
    error = expect_media_error(truncated, "corrupt")
    assert "truncated" in error.message


def test_media_error_survives_pickling() -> None:
    error = pickle.loads(pickle.dumps(MediaError("corrupt", "x.mp4: broken")))
    assert (error.kind, error.message) == ("corrupt", "x.mp4: broken")
    assert str(error) == "[corrupt] x.mp4: broken"


def test_media_error_rejects_unknown_kind() -> None:
    with pytest.raises(ValueError, match="unknown MediaError kind"):
        MediaError("weird", "?")  # type: ignore[arg-type]


# ---------------------------------------------------------------- content_id


def test_content_id_follows_bytes_not_paths(tmp_path: Path) -> None:
    # Larger than one 1 MiB read so the chunked hashing is exercised.
    data = random.Random(1).randbytes(2_500_000)
    first, second = tmp_path / "a.bin", tmp_path / "sub" / "b.mp4"
    second.parent.mkdir()
    first.write_bytes(data)
    second.write_bytes(data)
    changed = tmp_path / "c.bin"
    changed.write_bytes(data[:1_500_000] + bytes([data[1_500_000] ^ 1]) + data[1_500_001:])

    assert content_id(first) == content_id(second) == hashlib.sha256(data).hexdigest()[:16]
    assert content_id(changed) != content_id(first)
    assert len(content_id(first)) == 16


def test_content_id_of_missing_file(tmp_path: Path) -> None:
    with pytest.raises(MediaError) as caught:
        content_id(tmp_path / "gone.mp4")
    assert caught.value.kind == "missing"


# ---------------------------------------------------------------- plan_cuts


def test_exact_plan_cuts_at_marks() -> None:
    plan = plan_cuts(35.0, [], seconds=10, min_seconds=3, max_deviation_s=2, mode="exact")
    assert plan == CutPlan(cut_points=(10.0, 20.0, 30.0), mode="exact", max_snap_deviation_s=0.0)


def test_short_tail_joins_previous_clip() -> None:
    assert plan_cuts(32.0, [], 10, 3, 2, "exact").cut_points == (10.0, 20.0)
    assert plan_cuts(33.0, [], 10, 3, 2, "exact").cut_points == (10.0, 20.0, 30.0)
    # A mark exactly at the end is not strictly inside the video.
    assert plan_cuts(30.0, [], 10, 0, 2, "exact").cut_points == (10.0, 20.0)


def test_short_video_is_one_clip() -> None:
    for duration in (5.0, 12.9):
        for mode in ("copy", "exact"):
            plan = plan_cuts(duration, [0.0, 2.0, 4.0, 6.0, 8.0, 10.0, 12.0], 10, 3, 2, mode)
            assert plan.cut_points == ()
            assert plan.mode == mode
    assert plan_cuts(13.0, [0.0], 10, 3, 20, "exact").cut_points == (10.0,)


def test_copy_snaps_to_nearest_keyframe() -> None:
    keyframes = [0.0, 9.5, 10.4, 19.0, 21.2, 30.1, 34.0]
    plan = plan_cuts(40.0, keyframes, 10, 3, 2, "copy")
    assert plan.mode == "copy"
    assert plan.cut_points == (10.4, 19.0, 30.1)
    assert plan.max_snap_deviation_s == pytest.approx(1.0)


def test_copy_tie_goes_to_earlier_keyframe() -> None:
    assert plan_cuts(22.0, [0.0, 9.0, 11.0], 10, 3, 2, "copy").cut_points == (9.0,)


def test_copy_unsorted_keyframes_are_accepted() -> None:
    assert plan_cuts(22.0, [11.0, 0.0, 9.0], 10, 3, 2, "copy").cut_points == (9.0,)


def test_copy_drops_duplicates_and_short_clips() -> None:
    # Marks every 4 s. 4 and 8 both snap to 6 (one cut); 16 snaps to 14, 1 s after
    # the cut at 13 (too short); 28 snaps to 28.5, leaving a 1.5 s tail.
    keyframes = [0.0, 6.0, 13.0, 14.0, 20.0, 24.5, 28.5]
    plan = plan_cuts(30.0, keyframes, seconds=4, min_seconds=2, max_deviation_s=2, mode="copy")
    assert plan.mode == "copy"
    assert plan.cut_points == (6.0, 13.0, 20.0, 24.5)
    assert plan.max_snap_deviation_s == pytest.approx(2.0)


def test_copy_falls_back_to_exact_when_snapping_is_too_far() -> None:
    plan = plan_cuts(40.0, [0.0, 7.0, 20.0, 30.0], 10, 3, 2, "copy")
    assert plan == CutPlan(cut_points=(10.0, 20.0, 30.0), mode="exact", max_snap_deviation_s=0.0)


def test_copy_without_keyframes_falls_back_to_exact() -> None:
    assert plan_cuts(40.0, [], 10, 3, 2, "copy").mode == "exact"


def test_gop250_at_30fps_needs_more_than_2s_deviation() -> None:
    duration = 150.0
    keyframes = [k * 250 / 30 for k in range(18)]
    assert plan_cuts(duration, keyframes, 10, 3, 2, "copy").mode == "exact"
    plan = plan_cuts(duration, keyframes, 10, 3, 5, "copy")
    assert plan.mode == "copy"
    assert set(plan.cut_points) <= set(keyframes)
    assert 2 < plan.max_snap_deviation_s <= 5
    assert all(b - a >= 3 for a, b in zip((0.0, *plan.cut_points), (*plan.cut_points, duration)))


@pytest.mark.parametrize(
    "kwargs",
    [
        {"mode": "fast"},
        {"seconds": 0},
        {"min_seconds": 11},
        {"min_seconds": -1},
        {"max_deviation_s": -0.5},
        {"duration_s": 0},
    ],
)
def test_plan_rejects_bad_arguments(kwargs: dict) -> None:
    args = {"duration_s": 30.0, "keyframe_times": [0.0], "seconds": 10, "min_seconds": 3,
            "max_deviation_s": 2, "mode": "copy", **kwargs}
    with pytest.raises(ValueError):
        plan_cuts(**args)


# ---------------------------------------------------------------- cut_video


def check_clips(
    clips: list[ClipFile], plan: CutPlan, source: VideoProbe, out_dir: Path, stem: str
) -> None:
    frame = 1 / source.fps
    assert [c.index for c in clips] == list(range(len(plan.cut_points) + 1))
    assert [Path(c.path) for c in clips] == [out_dir / f"{stem}-{i:05d}.mp4" for i in range(len(clips))]
    # Only the final clips: no temp dir, segment list or partial file left behind.
    assert sorted(out_dir.iterdir()) == [Path(c.path) for c in clips]
    assert all(c.mode == plan.mode for c in clips)
    assert clips[0].start_s == pytest.approx(0.0, abs=frame)
    assert [c.start_s for c in clips[1:]] == pytest.approx(plan.cut_points, abs=frame)
    for before, after in zip(clips, clips[1:]):
        assert after.start_s == pytest.approx(before.end_s, abs=frame)
    assert clips[-1].end_s == pytest.approx(source.duration_s, abs=frame)
    for clip in clips:
        duration, n_frames = measure_clip(clip.path)
        assert (n_frames, clip.end_s - clip.start_s) == (clip.n_frames, pytest.approx(duration))
        assert clip.n_frames == pytest.approx(duration * source.fps, abs=1)
        clip_probe = probe_video(clip.path)
        assert clip_probe.keyframe_times[0] == pytest.approx(0.0, abs=frame)
        assert clip_probe.has_audio == source.has_audio


def test_measure_clip_counts_frames(source: Path) -> None:
    assert measure_clip(source) == (pytest.approx(35.0), 1050)


def test_cut_copy_mode_cuts_on_snapped_keyframes(
    tmp_path: Path, source: Path, source_probe: VideoProbe
) -> None:
    plan = plan_cuts(source_probe.duration_s, source_probe.keyframe_times, 10, 3, 5, "copy")
    assert plan.mode == "copy" and plan.cut_points == pytest.approx(GOP250_KEYFRAMES[1:3], abs=1e-5)

    clips = cut_video(source, tmp_path, plan, stem="src")

    check_clips(clips, plan, source_probe, tmp_path, "src")
    # Stream copy moves whole packets: not one frame may be lost or duplicated.
    assert sum(c.n_frames for c in clips) == source_probe.n_frames
    assert [c.n_frames for c in clips] == [250, 250, 550]


def test_cut_exact_mode_cuts_at_marks(tmp_path: Path, source: Path, source_probe: VideoProbe) -> None:
    plan = plan_cuts(source_probe.duration_s, source_probe.keyframe_times, 10, 3, 2, "exact")
    assert plan.cut_points == (10.0, 20.0, 30.0)

    clips = cut_video(source, tmp_path, plan, stem="src", preset="ultrafast")

    check_clips(clips, plan, source_probe, tmp_path, "src")
    assert abs(sum(c.n_frames for c in clips) - source_probe.n_frames) <= len(plan.cut_points)
    assert probe_video(clips[0].path).audio_codec == "aac"


def test_cut_exact_mode_with_ntsc_rate_marks_between_frames(tmp_path: Path) -> None:
    # At 29.97 fps no frame starts exactly at 10 s; the cut must land within a frame of it.
    ntsc = make_video(tmp_path / "ntsc.mp4", seconds=21, rate="30000/1001", audio=False)
    probe = probe_video(ntsc)
    plan = plan_cuts(probe.duration_s, probe.keyframe_times, 10, 0.5, 2, "exact")
    out = tmp_path / "clips"

    clips = cut_video(ntsc, out, plan, stem="ntsc", preset="ultrafast")

    check_clips(clips, plan, probe, out, "ntsc")
    assert abs(sum(c.n_frames for c in clips) - probe.n_frames) <= len(plan.cut_points)


def test_cut_exact_mode_keeps_variable_frame_rate_frames(tmp_path: Path) -> None:
    # Every third frame of a 30 fps pattern is dropped, leaving 33/67 ms gaps that a
    # constant-rate re-encode would fill with duplicated frames.
    vfr = tmp_path / "vfr.mp4"
    ffmpeg_ok("-f", "lavfi", "-i", "testsrc2=size=160x120:rate=30:duration=12",
              "-vf", "select='not(eq(mod(n,3),2))'", "-fps_mode", "vfr",
              "-c:v", "libx264", "-preset", "ultrafast", "-g", "60", str(vfr))
    probe = probe_video(vfr)
    assert probe.n_frames == 240
    plan = plan_cuts(probe.duration_s, probe.keyframe_times, 5, 1, 1, "exact")
    out = tmp_path / "clips"

    clips = cut_video(vfr, out, plan, stem="vfr", preset="ultrafast")

    check_clips(clips, plan, probe, out, "vfr")
    assert sum(c.n_frames for c in clips) == probe.n_frames


def test_cut_plan_without_cuts_gives_one_whole_clip(
    tmp_path: Path, source: Path, source_probe: VideoProbe
) -> None:
    plan = CutPlan(cut_points=(), mode="copy", max_snap_deviation_s=0.0)
    clips = cut_video(source, tmp_path, plan, stem="whole")
    check_clips(clips, plan, source_probe, tmp_path, "whole")
    assert clips[0].n_frames == source_probe.n_frames


def test_cut_ffmpeg_failure_leaves_nothing(tmp_path: Path, source: Path) -> None:
    plan = CutPlan(cut_points=(10.0,), mode="exact", max_snap_deviation_s=0.0)
    with pytest.raises(MediaError) as caught:
        cut_video(source, tmp_path, plan, stem="bad", video_codec="no_such_encoder")
    assert caught.value.kind == "ffmpeg_failed"
    assert "no_such_encoder" in caught.value.message
    assert list(tmp_path.iterdir()) == []


def test_an_ffmpeg_run_over_its_time_limit_is_killed(tmp_path: Path) -> None:
    out = tmp_path / "endless.mkv"  # an hour of video: it would take minutes to encode
    argv = ["ffmpeg", "-nostdin", "-v", "error", "-f", "lavfi", "-i", "testsrc2=size=320x240:duration=3600", "-c:v", "ffv1", str(out)]
    started = time.monotonic()
    with pytest.raises(MediaError) as caught:
        run_tool(argv, timeout_s=1.0)
    assert 1.0 <= time.monotonic() - started < 10
    assert caught.value.kind == "timeout" and "limit of 1 s (clip.tool_timeout_s)" in caught.value.message
    assert not trainer_pids(out, "ffmpeg")  # killed and reaped, not left encoding


def test_probe_and_cut_pass_the_time_limit_to_each_tool_run(tmp_path: Path, source: Path, source_probe: VideoProbe) -> None:
    with pytest.raises(MediaError) as caught:
        probe_video(source, tool_timeout_s=0.001)  # no ffprobe starts and finishes within a millisecond
    assert caught.value.kind == "timeout" and "ffprobe" in caught.value.message
    plan = CutPlan(cut_points=(10.0,), mode="exact", max_snap_deviation_s=0.0)
    with pytest.raises(MediaError) as caught:
        cut_video(source, tmp_path, plan, stem="slow", source=source_probe, tool_timeout_s=0.001)
    assert caught.value.kind == "timeout" and "ffmpeg" in caught.value.message
    assert list(tmp_path.iterdir()) == []  # the partial folder went with the killed run
    assert cut_video(source, tmp_path, plan, stem="ok", source=source_probe, tool_timeout_s=None)  # None: no limit


def test_the_tool_time_limit_is_a_runtime_key() -> None:
    from tasks.config import ClipConfig

    assert ClipConfig(tool_timeout_s=5).output_settings() == ClipConfig().output_settings()
    assert ClipConfig().tool_timeout_s == 3600


def test_cut_rejects_stem_with_directory(tmp_path: Path, source: Path) -> None:
    plan = CutPlan(cut_points=(), mode="copy", max_snap_deviation_s=0.0)
    with pytest.raises(ValueError, match="stem"):
        cut_video(source, tmp_path, plan, stem="../escape")


def test_cut_unusable_source_raises_media_error(tmp_path: Path) -> None:
    plan = CutPlan(cut_points=(), mode="copy", max_snap_deviation_s=0.0)
    with pytest.raises(MediaError) as caught:
        cut_video(tmp_path / "absent.mp4", tmp_path / "out", plan, stem="x")
    assert caught.value.kind == "missing"


def test_content_id_of_large_files_samples_their_bytes(tmp_path):
    from tasks.media import ffmpeg as media

    size = media._FULL_HASH_MAX_BYTES + 3 * media._MIB
    data = bytearray(os.urandom(size))
    a = tmp_path / "a.bin"
    a.write_bytes(data)
    b = tmp_path / "b.bin"
    b.write_bytes(data)
    original = media.content_id(a)
    assert media.content_id(b) == original
    # The sampling arithmetic: block k of the evenly spaced samples starts at size * k // (samples + 1).
    middle_block = size * (media._HASH_SAMPLES // 2) // (media._HASH_SAMPLES + 1)
    next_block = size * (media._HASH_SAMPLES // 2 + 1) // (media._HASH_SAMPLES + 1)
    in_middle_block = middle_block + media._SAMPLE_BYTES // 2
    between_blocks = middle_block + media._SAMPLE_BYTES + 10
    assert between_blocks < next_block and media._MIB < middle_block and next_block < size - media._MIB

    def with_flipped(position: int) -> str:
        flipped = bytearray(data)
        flipped[position] ^= 0xFF
        b.write_bytes(flipped)
        return media.content_id(b)

    assert with_flipped(in_middle_block) != original  # inside a sampled block
    assert with_flipped(size - 1) != original  # inside the last MiB, always sampled
    assert with_flipped(10) != original  # inside the first MiB, always sampled
    assert with_flipped(between_blocks) == original  # not sampled: large files are not read whole
    b.write_bytes(bytes(data) + b"x")
    assert media.content_id(b) != original
