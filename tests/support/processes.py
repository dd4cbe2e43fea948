"""Watching the processes a test starts: trainer workers by command line, and waiting on a condition."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path


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
