"""The cut measures each clip once, as soon as ffmpeg has finished it and while it cuts the next ones,
and starts writing it back to disk then (for a caller that flushes later); the tool runner that makes
this possible keeps its limits."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest

from tasks.media import ffmpeg
from tasks.media.ffmpeg import CutPlan, MediaError, cut_video, probe_video, run_tool
from tests.support.processes import trainer_pids


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    """24 s with a keyframe every second: re-encoding it into 4 clips takes a while at this size."""
    path = tmp_path_factory.mktemp("source") / "source.mp4"
    subprocess.run(
        ["ffmpeg", "-hide_banner", "-nostdin", "-v", "error", "-y", "-f", "lavfi", "-i", "testsrc2=size=320x240:rate=25:duration=24",
         "-c:v", "libx264", "-preset", "ultrafast", "-g", "25", str(path)],
        check=True,
    )
    return path


@pytest.fixture
def recorded(monkeypatch):
    """Each clip measured and each write-back started, and whether ffmpeg was still cutting then."""
    events: list[tuple[str, str, bool]] = []
    cutting = [False]
    real_run_tool, real_measure, real_writeback = ffmpeg.run_tool, ffmpeg.measure_clip, ffmpeg.start_writeback

    def run_tool(argv, **kwargs):
        cutting[0] = Path(argv[0]).name == "ffmpeg"
        try:
            return real_run_tool(argv, **kwargs)
        finally:
            cutting[0] = False

    def measure_clip(path):
        events.append(("measure", Path(path).name, cutting[0]))
        return real_measure(path)

    def start_writeback(path):
        events.append(("writeback", Path(path).name, cutting[0]))
        return real_writeback(path)

    monkeypatch.setattr(ffmpeg, "run_tool", run_tool)
    monkeypatch.setattr(ffmpeg, "measure_clip", measure_clip)
    monkeypatch.setattr(ffmpeg, "start_writeback", start_writeback)
    monkeypatch.setattr(ffmpeg, "_TOOL_POLL_S", 0.002)
    return events


def test_clips_are_measured_once_each_while_ffmpeg_cuts_the_next(tmp_path, source, recorded):
    probe = probe_video(source)
    plan = CutPlan(cut_points=(6.0, 12.0, 18.0), mode="exact", max_snap_deviation_s=0.0)
    clips = cut_video(source, tmp_path, plan, stem="s", source=probe, preset="ultrafast", flush="later")

    measured = [name for kind, name, _ in recorded if kind == "measure"]
    assert sorted(measured) == [Path(c.path).name for c in clips]  # each clip once, none twice
    during = [name for kind, name, cutting in recorded if kind == "measure" and cutting]
    assert during and Path(clips[-1].path).name not in during  # the last one only once ffmpeg is done
    # Write-back starts for each clip measured during the cut, right after it is measured.
    assert [name for kind, name, _ in recorded if kind == "writeback"] == during
    assert [c.start_s for c in clips] == pytest.approx([0.0, 6.0, 12.0, 18.0], abs=0.05)


def test_scratch_clips_are_not_written_back(tmp_path, source, recorded):
    plan = CutPlan(cut_points=(6.0, 12.0, 18.0), mode="exact", max_snap_deviation_s=0.0)
    clips = cut_video(source, tmp_path, plan, stem="s", preset="ultrafast", flush="never")
    assert len(clips) == 4 and not [e for e in recorded if e[0] == "writeback"]


def test_cut_rejects_an_unknown_flush(tmp_path, source):
    with pytest.raises(ValueError, match="flush"):
        cut_video(source, tmp_path, CutPlan(cut_points=(), mode="copy", max_snap_deviation_s=0.0), stem="s", flush="sometimes")


def test_listed_segments_skip_a_line_still_being_written(tmp_path):
    (tmp_path / "segments.csv").write_text("a-00000.mp4,0.000000,6.000000\nb-00001.mp4,6.000000,12.0")
    assert ffmpeg._listed_segments(tmp_path) == ["a-00000.mp4"]
    assert ffmpeg._listed_segments(tmp_path / "absent") == []


def _endless(out: Path) -> list[str]:
    return ["ffmpeg", "-nostdin", "-v", "error", "-f", "lavfi", "-i", "testsrc2=size=320x240:duration=3600", "-c:v", "ffv1", str(out)]


def test_work_beside_a_tool_runs_until_it_exits(tmp_path):
    calls: list[float] = []
    result = run_tool(["ffmpeg", "-v", "error", "-re", "-f", "lavfi", "-i", "testsrc2=duration=0.4", "-f", "null", "-"],
                      while_running=lambda: calls.append(time.monotonic()))
    assert result.returncode == 0 and len(calls) >= 5


def test_a_failure_beside_a_tool_kills_it(tmp_path):
    out = tmp_path / "endless.mkv"

    def fail():
        raise RuntimeError("measuring failed")

    with pytest.raises(RuntimeError, match="measuring failed"):
        run_tool(_endless(out), while_running=fail)
    assert not trainer_pids(out, "ffmpeg")  # killed and reaped, not left encoding


def test_the_time_limit_holds_with_work_beside_the_tool(tmp_path):
    out = tmp_path / "endless.mkv"
    started = time.monotonic()
    with pytest.raises(MediaError) as caught:
        run_tool(_endless(out), timeout_s=1.0, while_running=lambda: None)
    assert 1.0 <= time.monotonic() - started < 10 and caught.value.kind == "timeout"
    assert not trainer_pids(out, "ffmpeg")


def test_a_tool_that_prints_much_does_not_stall(tmp_path):
    """Output goes to files, not pipes nobody reads while the tool runs (a pipe holds 64 KiB)."""
    argv = ["ffmpeg", "-v", "error", "-f", "lavfi", "-i", "testsrc2=size=16x16:rate=100:duration=60", "-f", "framemd5", "-"]
    result = run_tool(argv, timeout_s=120, while_running=lambda: None)
    assert result.returncode == 0 and len(result.stdout) > 4 << 16


def test_a_clip_is_measured_from_its_header_without_decoding(source, monkeypatch):
    """Opening a file decodes a frame of each stream unless told not to; measuring needs none."""
    import av

    with av.open(str(source)) as container:  # opened the default way: decoders probe the streams
        stream = container.streams.video[0]
        expected = (float(stream.duration * stream.time_base), stream.frames)
    options: list[dict] = []
    real_open = av.open

    def recording_open(file, *args, **kwargs):
        options.append(kwargs.get("container_options") or {})
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(av, "open", recording_open)
    assert ffmpeg.measure_clip(source) == expected
    assert options == [{"codec_whitelist": "none"}]  # no decoder may open
