"""Multi-node training on one machine: two "nodes" of one gloo process each on 127.0.0.1.

Node 0 runs the SFT stage through the real engine; node 1 is `lvr train-node sft --node-rank 1`
in its own process, started first, as a Kubernetes pod may be. It finds node 0's job by itself,
and the two torchruns meet in a real static rendezvous: one run of world size 2.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time

import pytest

from data_schemas import FILTER
from flows.cli import main
from parallel.local import free_port
from tasks.config import load_config
from tasks.engine.run import run_stage
from tasks.engine.stage import StageContext, StageError
from tasks.engine.store import Workdir
from tasks.sft.stage import SFTStage
from tasks.training.nodes import launch_pending, node_job, run_training_node
from tests.sft.test_stage import filter_rows, videos  # noqa: F401  (`videos` is a fixture)
from tests.support.paths import REPO
from tests.support.stand_ins import Published

pytestmark = pytest.mark.slow


def two_node_overrides(port: int) -> dict:
    return {
        "sft.nnodes": 2, "sft.nproc_per_node": 1, "sft.sp_degree": 2, "sft.master_addr": "127.0.0.1", "sft.master_port": port,
        "sft.max_steps": 2, "sft.save_every": 100, "sft.num_frames": 4, "sft.zero_stage": 2,
    }


def filtered_workdir(root, videos, overrides: dict) -> StageContext:
    ctx = StageContext(workdir=Workdir(str(root)), config=load_config("tiny", overrides))
    run_stage(Published("filter", FILTER, filter_rows(videos)), ctx)
    return ctx


def test_node_one_joins_node_zeros_run(tmp_path, videos, caplog, capsys):  # noqa: F811
    overrides = two_node_overrides(free_port())
    ctx = filtered_workdir(tmp_path / "wd", videos, overrides)
    job = node_job("sft", ctx)
    assert job is not None and not launch_pending(job.job_file)
    sets = [arg for key, value in overrides.items() for arg in ("--set", f"{key}={value}")]
    node1 = subprocess.Popen(
        [sys.executable, "-m", "flows.cli", "train-node", "sft", "--node-rank", "1", "--workdir", str(ctx.workdir.url),
         "--config", "tiny", *sets, "--wait-timeout", "300"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )
    try:
        with caplog.at_level(logging.INFO, logger="lvr.sft"):
            report = run_stage(SFTStage(), ctx)  # node 0
        output, _ = node1.communicate(timeout=120)
    finally:
        node1.kill()
    assert report.status == "done", output
    assert node1.returncode == 0, output
    result = json.loads(job.job_file.with_name("result.json").read_text())
    assert result["world_size"] == 2 and result["sp_degree"] == 2 and result["steps"] == 2

    # Node 1 ran exactly the command node 0 told node 1 to run.
    marker = "which runs: "
    (told,) = [r.getMessage().split(marker, 1)[1] for r in caplog.records if r.getMessage().startswith("sft: node 1 joins with `lvr train-node sft --node-rank 1`")]
    assert f"launching: {told}" in output, output
    assert "--node-rank=1" in told and "--nnodes=2" in told and f"--master-port={overrides['sft.master_port']}" in told

    # The run is complete: a node started again finds nothing to join, at once.
    assert node_job("sft", ctx) is None
    started = time.monotonic()
    again = ["train-node", "sft", "--workdir", str(ctx.workdir.url), "--config", "tiny", *sets]
    assert main([*again, "--node-rank", "1", "--wait-timeout", "5"]) == 0
    assert "node 1 had nothing to run" in capsys.readouterr().out
    assert time.monotonic() - started < 5


def test_a_worker_node_waits_for_node_zero_then_gives_up(tmp_path, videos):  # noqa: F811
    ctx = filtered_workdir(tmp_path / "wd", videos, two_node_overrides(free_port()))
    started = time.monotonic()
    with pytest.raises(TimeoutError, match="node 0 wrote no job"):
        run_training_node("sft", ctx, 1, timeout_s=1.5, poll_s=0.2)
    assert 1.5 <= time.monotonic() - started < 10
    with pytest.raises(StageError, match="not a worker node"):
        run_training_node("sft", ctx, 2)
    with pytest.raises(StageError, match="not a training stage"):
        run_training_node("filter", ctx, 1)


def test_a_launch_is_pending_while_the_job_is_newer_than_the_result(tmp_path):
    job, result = tmp_path / "job.json", tmp_path / "result.json"
    assert not launch_pending(job)
    job.write_text("{}")
    assert launch_pending(job)  # written, not finished
    result.write_text("{}")
    os.utime(job, ns=(1_000_000_000, 1_000_000_000))
    os.utime(result, ns=(2_000_000_000, 2_000_000_000))
    assert not launch_pending(job)  # that launch finished
    os.utime(job, ns=(3_000_000_000, 3_000_000_000))  # node 0 launches the same run again (a retry)
    assert launch_pending(job)
