"""With `execution: deployments` the pipeline never waits forever on a stage's flow run: a run that
stays unfinished past `execution.stage_timeout_s` is cancelled and fails the pipeline naming the
stage, the run and the limit; a pipeline killed while waiting cancels the stage's run.

A real `prefect server`; the stage's deployment has no worker, so its runs stay Scheduled, as
when a pool's workers or a run's infrastructure are gone.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import time

import pytest

from tests.support.prefect_server import PrefectServer
from tests.support.processes import wait_for

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with PrefectServer(tmp_path_factory.mktemp("prefect")) as srv:
        flow = srv.request("POST", "/flows/", json={"name": "lvr-clip"})
        deployment = srv.request("POST", "/deployments/", json={"name": "lvr-clip", "flow_id": flow["id"]})
        srv.deployment_id = deployment["id"]
        yield srv


def start_pipeline(server: PrefectServer, tmp_path, *overrides: str) -> subprocess.Popen:
    """The pipeline flow, clip only, in a process of its own (as a worker would run it)."""
    (tmp_path / "videos").mkdir(exist_ok=True)
    script = textwrap.dedent(f"""
        from flows.pipeline import lvr_pipeline
        lvr_pipeline(source={str(tmp_path / "videos")!r}, workdir={str(tmp_path / "work")!r}, from_stage="clip", to_stage="clip",
                     execution="deployments", overrides={["execution.deployment_poll_s=0.5", *overrides]!r})
    """)
    return subprocess.Popen([sys.executable, "-c", script], env={**server.env, "OMP_NUM_THREADS": "1"},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def stage_runs(server: PrefectServer) -> dict[str, dict]:
    body = {"flow_runs": {"deployment_id": {"any_": [server.deployment_id]}}, "limit": 200}
    return {run["id"]: run for run in server.request("POST", "/flow_runs/filter", json=body)}


def test_a_stage_run_past_its_time_limit_is_cancelled_and_fails_the_pipeline(server, tmp_path):
    before = set(stage_runs(server))
    started = time.monotonic()
    proc = start_pipeline(server, tmp_path, "execution.stage_timeout_s=3")
    try:
        output, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()  # a pipeline still waiting: the limit did not act
            proc.wait()
    (child,) = [run for run_id, run in stage_runs(server).items() if run_id not in before]
    assert proc.returncode != 0 and time.monotonic() - started < 60
    assert f"clip: flow run {child['name']!r}" in output and "did not finish within execution.stage_timeout_s=3 s" in output
    assert "it was cancelled" in output
    assert child["state_type"] == "CANCELLED" and "stage_timeout_s" in child["state"]["message"]


def test_a_pipeline_killed_while_waiting_cancels_the_stage_run(server, tmp_path):
    before = set(stage_runs(server))
    proc = start_pipeline(server, tmp_path)  # the default limit: a day
    try:
        child_id = wait_for(lambda: next(iter(set(stage_runs(server)) - before), None), 90, "the stage's flow run", proc)
        time.sleep(1)  # into the wait
        proc.send_signal(signal.SIGTERM)  # how a worker stops a cancelled flow run's process
        proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    child = wait_for(lambda: (run := server.flow_run(child_id))["state_type"] == "CANCELLED" and run, 15, "the stage run's cancellation")
    assert "the pipeline stopped waiting for it" in child["state"]["message"]
