"""Keyframes of MP4/MOV videos come from the demuxer's index instead of a read of every packet, and
the probe is the same as the full read gives: B-frames, edit lists, start offsets, variable rate. Any
file the index cannot vouch for (other containers, truncated or fragmented files, codecs a parser
reads), or whose keyframes are too dense for a seek to each to pay, is still read in full."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tasks.media import ffmpeg
from tasks.media.ffmpeg import MediaError, probe_video

TESTSRC = ["-f", "lavfi", "-i", "testsrc2=size=160x120:rate=25:duration=12"]
SINE = ["-f", "lavfi", "-i", "sine=frequency=440:duration=12"]
GOP = ["-g", "25", "-keyint_min", "25", "-sc_threshold", "0"]
X264_BFRAMES = ["-c:v", "libx264", "-preset", "veryfast", *GOP]  # B-frames, hence an edit list in MP4

# name -> ffmpeg arguments making it (after the inputs), or the name of a file to derive it from.
INDEXED = {
    "no_bframes.mp4": [*TESTSRC, *SINE, "-c:v", "libx264", "-preset", "ultrafast", *GOP, "-c:a", "aac", "-shortest"],
    "bframes.mp4": [*TESTSRC, *SINE, *X264_BFRAMES, "-c:a", "aac", "-shortest"],
    "bframes_no_audio.mov": [*TESTSRC, *X264_BFRAMES, "-f", "mov"],
    "open_gop.mp4": [*TESTSRC, "-c:v", "libx264", "-preset", "veryfast", "-x264-params", "open-gop=1:keyint=25:min-keyint=25:scenecut=0"],
    "hevc.mp4": [*TESTSRC, "-c:v", "libx265", "-preset", "ultrafast", "-x265-params", "keyint=25:min-keyint=25:log-level=error"],
    "start_offset.mp4": [*TESTSRC, *X264_BFRAMES, "-output_ts_offset", "5"],
    "variable_rate.mp4": ["-f", "lavfi", "-i", "testsrc2=size=160x120:rate=30:duration=6", "-vf", "select='not(eq(mod(n,3),2))'",
                          "-fps_mode", "vfr", "-c:v", "libx264", "-preset", "ultrafast", "-g", "30"],
    "faststart.mp4": ("bframes.mp4", ["-c", "copy", "-movflags", "+faststart"]),
    "from_mpegts.mp4": ("mpegts.ts", ["-c", "copy"]),
}
READ_IN_FULL = {
    "h264_opus.mkv": [*TESTSRC, *SINE, *X264_BFRAMES, "-c:a", "libopus", "-shortest"],
    "vp9_opus.webm": [*TESTSRC, *SINE, "-c:v", "libvpx-vp9", "-deadline", "realtime", "-cpu-used", "8", "-g", "25", "-b:v", "200k",
                      "-c:a", "libopus", "-shortest"],
    "mpegts.ts": [*TESTSRC, *SINE, *X264_BFRAMES, "-c:a", "aac", "-shortest", "-f", "mpegts"],
    "mpeg4.mp4": [*TESTSRC, "-c:v", "mpeg4", "-g", "25"],
    "all_intra.mp4": [*TESTSRC, "-c:v", "libx264", "-preset", "ultrafast", "-g", "1"],  # a seek per frame: slower than reading them
    "fragmented.mp4": ("bframes.mp4", ["-c", "copy", "-movflags", "+frag_keyframe+empty_moov"]),
}


def _make(root: Path, name: str, recipe) -> Path:
    path = root / name
    if isinstance(recipe, tuple):
        base, args = recipe
        argv = ["-i", str(_make(root, base, {**INDEXED, **READ_IN_FULL}[base])), *args]
    else:
        argv = recipe
    if not path.exists():
        subprocess.run(["ffmpeg", "-hide_banner", "-nostdin", "-v", "error", "-y", *argv, str(path)], check=True)
    return path


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("videos")
    for name, recipe in {**INDEXED, **READ_IN_FULL}.items():
        _make(root, name, recipe)
    whole = (root / "faststart.mp4").read_bytes()  # index first: the samples it lists can be cut off
    (root / "truncated_faststart.mp4").write_bytes(whole[: len(whole) * 3 // 10])
    (root / "last_samples_missing.mp4").write_bytes(whole[:-2000])  # within the truncation tolerance
    return root


def _full_read_probe(path: Path, monkeypatch) -> ffmpeg.VideoProbe | MediaError:
    """The probe as it was before the index was used: every packet read."""
    with monkeypatch.context() as patch:
        patch.setattr(ffmpeg, "_keyframes_from_index", lambda *args, **kwargs: None)
        try:
            return probe_video(path)
        except MediaError as exc:
            return exc


def _uses_index(path: Path) -> bool:
    info = ffmpeg._ffprobe_container(path, None)
    video = ffmpeg._first_video_stream(path, info["streams"])
    start_s = float(info["format"].get("start_time", 0.0))
    return ffmpeg._keyframes_from_index(path, info["format"], video, start_s, path.stat().st_size, None) is not None


@pytest.mark.parametrize("name", sorted(INDEXED))
def test_mp4_keyframes_come_from_the_index_and_match_a_full_read(videos, name, monkeypatch):
    path = videos / name
    expected = _full_read_probe(path, monkeypatch)
    assert isinstance(expected, ffmpeg.VideoProbe) and len(expected.keyframe_times) >= 2

    def no_full_read(*args, **kwargs):
        raise AssertionError("the index should have given the keyframes")

    monkeypatch.setattr(ffmpeg, "_read_video_packets", no_full_read)
    assert probe_video(path) == expected


@pytest.mark.parametrize("name", sorted(READ_IN_FULL) + ["truncated_faststart.mp4", "last_samples_missing.mp4"])
def test_files_the_index_cannot_vouch_for_are_read_in_full(videos, name, monkeypatch):
    path = videos / name
    assert not _uses_index(path)
    expected = _full_read_probe(path, monkeypatch)
    try:
        probed = probe_video(path)
    except MediaError as exc:
        assert isinstance(expected, MediaError) and (exc.kind, exc.message) == (expected.kind, expected.message)
        assert name == "truncated_faststart.mp4" and "truncated" in exc.message
    else:
        assert probed == expected


def test_b_frame_keyframes_are_presentation_times_not_decode_times(videos):
    """Under B-frames the index's decode times run ahead of the presentation times cuts use."""
    import av

    path = videos / "bframes.mp4"
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        decode_times = [float(e.timestamp * stream.time_base) for e in stream.index_entries if e.is_keyframe]
    keyframes = probe_video(path).keyframe_times
    assert keyframes == pytest.approx([i * 1.0 for i in range(12)])
    assert decode_times != pytest.approx(list(keyframes))
