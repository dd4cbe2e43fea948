"""Clip stage cost against its floors, measured side by side in one run.

- copy mode: the stage's own work time (from its manifest) over one `ffmpeg -c copy` remux of the file;
- exact mode: the stage's work time over one re-encode pass with the same codec settings.
Goals: copy <= 1.5x, exact <= 1.2x. The last line is machine-readable.

    python benchmarks/clip.py [--minutes 10] [--size 1280x720]
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tasks.clip.stage import ClipStage
from tasks.config import load_config
from tasks.engine.run import run_stage
from tasks.engine.stage import StageContext
from tasks.engine.store import Workdir

OUT = Path(__file__).resolve().parent / "out"


def make_long_video(path: Path, minutes: float, size: str, fps: int = 30, gop_s: float = 2.0) -> Path:
    if path.exists():
        return path
    seconds = minutes * 60
    tmp = path.with_suffix(".tmp.mp4")
    argv = [
        "ffmpeg", "-nostdin", "-y", "-loglevel", "error",
        "-f", "lavfi", "-i", f"testsrc2=size={size}:rate={fps}:duration={seconds}",
        "-f", "lavfi", "-i", f"sine=frequency=330:sample_rate=44100:duration={seconds}",
        "-c:v", "libx264", "-preset", "ultrafast", "-pix_fmt", "yuv420p",
        "-g", str(int(fps * gop_s)), "-keyint_min", str(int(fps * gop_s)), "-sc_threshold", "0",
        "-c:a", "aac", "-shortest", str(tmp),
    ]
    subprocess.run(argv, check=True)
    tmp.rename(path)
    return path


def timed(argv: list[str]) -> float:
    started = time.perf_counter()
    subprocess.run(argv, check=True)
    return time.perf_counter() - started


def stage_work_time(video: Path, mode: str, scratch: Path) -> tuple[float, dict]:
    workdir = scratch / f"wd-{mode}"
    shutil.rmtree(workdir, ignore_errors=True)
    cfg = load_config("tiny", [f"clip.mode={mode}"])
    ctx = StageContext(workdir=Workdir(str(workdir)), config=cfg, source=str(video))
    report = run_stage(ClipStage(), ctx)
    return float(report.manifest["work_time_s"]), report.manifest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--size", default="1280x720")
    args = parser.parse_args()

    OUT.mkdir(parents=True, exist_ok=True)
    video = make_long_video(OUT / f"long-{args.minutes:g}min-{args.size}.mp4", args.minutes, args.size)
    cfg = load_config("tiny")
    with tempfile.TemporaryDirectory(prefix="lvr-bench-clip-") as tmp:
        scratch = Path(tmp)
        remux_s = timed(["ffmpeg", "-nostdin", "-y", "-loglevel", "error", "-i", str(video), "-map", "0", "-c", "copy", str(scratch / "remux.mp4")])
        copy_s, copy_manifest = stage_work_time(video, "copy", scratch)
        reencode_s = timed([
            "ffmpeg", "-nostdin", "-y", "-loglevel", "error", "-i", str(video), "-map", "0:v:0", "-map", "0:a?",
            "-c:v", cfg.clip.video_codec, "-preset", cfg.clip.preset, "-crf", str(cfg.clip.crf), "-c:a", "aac",
            str(scratch / "reencode.mp4"),
        ])
        exact_s, exact_manifest = stage_work_time(video, "exact", scratch)

    print(f"video: {video.name} ({video.stat().st_size / 1e6:.1f} MB)")
    print(f"copy remux floor      {remux_s:8.2f} s | clip stage copy  {copy_s:8.2f} s ({copy_manifest['rows']} clips)")
    print(f"re-encode floor       {reencode_s:8.2f} s | clip stage exact {exact_s:8.2f} s ({exact_manifest['rows']} clips)")
    print(f"clip_copy_vs_floor={copy_s / remux_s:.2f} clip_exact_vs_reencode={exact_s / reencode_s:.2f}")


if __name__ == "__main__":
    main()
