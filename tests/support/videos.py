"""Small real videos for tests, made with ffmpeg's lavfi sources."""

from __future__ import annotations

import subprocess
from pathlib import Path


def make_video(
    path: Path, seconds: float, *, fps: int = 25, gop: int | None = None, size: str = "160x120",
    audio: bool = True, source: str = "testsrc2",
) -> Path:
    """A small real H.264 video made with ffmpeg's lavfi sources (argv, never a shell)."""
    argv = ["ffmpeg", "-nostdin", "-y", "-loglevel", "error", "-f", "lavfi", "-i", f"{source}=size={size}:rate={fps}:duration={seconds}"]
    if audio:
        argv += ["-f", "lavfi", "-i", f"sine=frequency=440:sample_rate=16000:duration={seconds}"]
    argv += ["-c:v", "libx264", "-preset", "ultrafast", "-pix_fmt", "yuv420p"]
    if gop:
        argv += ["-g", str(gop), "-keyint_min", str(gop), "-sc_threshold", "0"]
    if audio:
        argv += ["-c:a", "aac", "-shortest"]
    argv += [str(path)]
    path.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(argv, check=True)
    return path
