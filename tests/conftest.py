"""Shared fixtures. Everything is real: ffmpeg, Parquet, Prefect's ephemeral API, tiny local models."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

# Before anything imports Prefect: no telemetry, a private Prefect home, our loggers in Prefect's.
_SESSION_HOME = Path(os.environ.get("LVR_TEST_HOME") or tempfile.mkdtemp(prefix="lvr-tests-"))
(_SESSION_HOME / "prefect").mkdir(parents=True, exist_ok=True)
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ.setdefault("PREFECT_HOME", str(_SESSION_HOME / "prefect"))
os.environ.setdefault("LVR_CACHE_DIR", str(_SESSION_HOME / "cache"))
os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "lvr")
os.environ.setdefault("PREFECT_UI_ENABLED", "false")

REPO = Path(__file__).resolve().parent.parent


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


@pytest.fixture
def video_factory(tmp_path):
    def factory(name: str, seconds: float, **kw) -> Path:
        return make_video(tmp_path / "videos" / name, seconds, **kw)

    return factory


def run_cli(*args: str, env: dict | None = None, timeout: float = 600, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """The real `lvr` entry point in a subprocess, as a user runs it."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "flows.cli", *args], cwd=cwd or REPO, env=full_env,
        capture_output=True, text=True, timeout=timeout,
    )


def trainer_pids(job_file: Path, module: str = "tasks.sft.trainer") -> list[int]:
    """Live processes whose command line names this job and trainer module (the torchrun workers)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if str(job_file).encode() in cmdline and module.encode() in cmdline:
                pids.append(int(entry.name))
    return pids


def wait_for(predicate, timeout_s: float, what: str, proc: subprocess.Popen | None = None):
    """The predicate's first truthy value; fails when `proc` (a stage run) exits first or time runs out."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the stage process exited ({proc.returncode}) before {what}:\n{proc.stdout.read()}")
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def pytest_sessionfinish(session, exitstatus):
    """Stop Prefect's ephemeral server while pytest's streams are still open (its atexit hook logs
    to a closed stream otherwise)."""
    server_module = sys.modules.get("prefect.server.api.server")
    if server_module is not None:
        for server in list(server_module.SubprocessASGIServer._instances.values()):
            server.stop()


def pytest_collection_modifyitems(config, items):
    """`gpu` tests need CUDA: on CPU machines they are reported as skipped, never as passed."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
