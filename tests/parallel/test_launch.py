"""The torchrun launch helper: argv, streamed logs, the failing worker's traceback, and torchrun
ending with the process that launched it (killed or out of time)."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from parallel.launch import (
    LaunchSpec,
    LaunchTimeout,
    WorkerFailed,
    launch,
    torchrun_argv,
)
from tests.support.processes import trainer_pids, wait_for

BOOM_WORKER = '''
import logging, os, time
from pathlib import Path
from parallel.launch import configure_worker_logging, run_worker

def main():
    configure_worker_logging("boom")
    logging.getLogger("boom").info("hello from pid %d", os.getpid())
    said_hello = Path(os.environ["BOOM_DIR"]) / "rank0-said-hello"
    if os.environ["RANK"] == "0":
        said_hello.touch()
        time.sleep(120)  # would wait forever: torchrun must stop it
    deadline = time.monotonic() + 30
    while not said_hello.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    raise ValueError("boom from rank 1")

if __name__ == "__main__":
    run_worker(main)
'''


def boom_spec(directory: Path) -> LaunchSpec:
    """Two workers; rank 1 raises, rank 0 hangs."""
    (directory / "boom_worker.py").write_text(BOOM_WORKER)
    path = os.pathsep.join([str(directory), *filter(None, [os.environ.get("PYTHONPATH")])])
    return LaunchSpec(module="boom_worker", nproc_per_node=2, env={"PYTHONPATH": path, "BOOM_DIR": str(directory)})


class Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def test_a_failing_worker_raises_its_traceback_and_stops_the_others(tmp_path):
    log = logging.getLogger("lvr.test.launch")
    log.setLevel(logging.INFO)
    sink = Lines()
    log.addHandler(sink)
    started = time.monotonic()
    with pytest.raises(WorkerFailed) as info:
        launch(boom_spec(tmp_path), log, tmp_path / "errors")
    assert time.monotonic() - started < 60
    failure = info.value
    assert failure.rank == 1 and failure.returncode != 0
    assert "ValueError: boom from rank 1" in failure.worker_traceback and "boom_worker.py" in failure.worker_traceback
    assert "worker rank 1 failed" in str(failure)
    assert any("[rank 0] INFO boom: hello" in line for line in sink.lines)  # streamed, attributed
    assert any("[rank 1] INFO boom: hello" in line for line in sink.lines)


def test_torchrun_argv():
    single = torchrun_argv(LaunchSpec("tasks.sft.trainer", ("job.json",), nproc_per_node=4))
    assert single[:3] == [sys.executable, "-m", "torch.distributed.run"] and "--standalone" in single
    assert single[-3:] == ["-m", "tasks.sft.trainer", "job.json"] and "--nproc-per-node=4" in single
    spec = LaunchSpec("m", nproc_per_node=8, nnodes=2, master_addr="10.0.0.1", master_port=29600)
    node1 = torchrun_argv(spec, node_rank=1)
    assert {"--nnodes=2", "--node-rank=1", "--master-addr=10.0.0.1", "--master-port=29600"} <= set(node1)
    assert "--standalone" not in node1
    with pytest.raises(ValueError, match="master_addr"):
        LaunchSpec("m", nnodes=2)


SLEEP_WORKER = """
import os, time
from pathlib import Path
from parallel.launch import run_worker

def main():
    (Path(os.environ["SLEEP_DIR"]) / f"rank{os.environ['RANK']}-started").touch()
    time.sleep(300)

if __name__ == "__main__":
    run_worker(main, orphan_check_s=60)  # slower than the test waits: torchrun itself must stop them
"""


def sleep_spec(directory: Path) -> LaunchSpec:
    """Two workers that sleep for minutes; the job argument makes their command lines findable."""
    (directory / "sleep_worker.py").write_text(SLEEP_WORKER)
    path = os.pathsep.join([str(directory), *filter(None, [os.environ.get("PYTHONPATH")])])
    return LaunchSpec(
        module="sleep_worker", args=(str(directory / "job"),), nproc_per_node=2,
        env={"PYTHONPATH": path, "SLEEP_DIR": str(directory)},
    )


def test_sigkill_of_the_launching_process_alone_stops_torchrun_and_its_workers(tmp_path):
    job, spec = tmp_path / "job", sleep_spec(tmp_path)
    script = textwrap.dedent(f"""
        import logging
        from parallel.launch import LaunchSpec, launch
        spec = LaunchSpec({spec.module!r}, {spec.args!r}, nproc_per_node={spec.nproc_per_node}, env={dict(spec.env)!r})
        launch(spec, logging.getLogger("lvr.test"), {str(tmp_path / "errors")!r})
    """)
    # Not in a group of its own: only this one process is killed, as when an OOM killer or
    # `kill -9 <pid>` ends the pipeline.
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for(lambda: len(list(tmp_path.glob("rank*-started"))) == 2, 60, "both workers to start", proc)
        assert len(trainer_pids(job, "sleep_worker")) == 3  # torchrun and its two workers name the job
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    try:
        wait_for(lambda: not trainer_pids(job, "sleep_worker"), 10, "torchrun and its workers to exit")
    finally:
        for pid in trainer_pids(job, "sleep_worker"):
            os.kill(pid, signal.SIGKILL)  # leave nothing behind when the test fails


def test_a_run_over_its_time_limit_is_stopped_with_its_workers(tmp_path):
    job = tmp_path / "job"
    started = time.monotonic()
    with pytest.raises(LaunchTimeout) as info:
        launch(sleep_spec(tmp_path), logging.getLogger("lvr.test.launch"), tmp_path / "errors", timeout_s=4)
    try:
        assert 4 <= time.monotonic() - started < 30
        assert info.value.timeout_s == 4 and "did not finish within 4 s" in str(info.value)
        assert not trainer_pids(job, "sleep_worker")  # torchrun returned only once its workers were gone
    finally:
        for pid in trainer_pids(job, "sleep_worker"):
            os.kill(pid, signal.SIGKILL)
