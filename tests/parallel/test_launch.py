"""The torchrun launch helper: argv, streamed logs, and the failing worker's traceback."""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path

import pytest

from parallel.launch import LaunchSpec, WorkerFailed, launch, torchrun_argv

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
