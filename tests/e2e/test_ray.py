"""Shard tasks on a real Ray cluster (`execution.task_runner: ray`), started the way a head node is.

The cluster is `ray start --head --block` in its own session, as a Ray head pod runs it, on ports
picked free here (Ray's fixed defaults, 6379, 10001, 8265 and 52365, may be taken by another Ray on
a shared machine). It is stopped by signalling that process only: `ray stop` would also stop every
other Ray cluster of this user on the machine.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import psutil
import pytest

from flows.pipeline import lvr_pipeline
from parallel.local import free_port
from tests.support.videos import make_video

pytestmark = pytest.mark.slow

pytest.importorskip("ray", reason="needs the `ray` extra: pip install -c constraints.txt '.[ray]'")
pytest.importorskip("prefect_ray")

RAY_CLI = Path(sys.executable).with_name("ray")  # the venv's, so the cluster runs this interpreter
CLIP_COLUMNS = ["clip_id", "video_id", "start_s", "end_s", "n_frames"]


class RayHead:
    """A one-node Ray cluster in a subprocess: 2 CPUs, a 100 MB object store, a private temp dir."""

    def __init__(self, root: Path) -> None:
        self.root = root
        # Short: Ray's Unix sockets live under it, and a socket path may not exceed 107 bytes.
        self.temp_dir = Path(tempfile.mkdtemp(prefix="lvr-ray-"))
        self.log = root / "ray-start.log"
        argv = [
            str(RAY_CLI), "start", "--head", "--block", "--disable-usage-stats",
            "--num-cpus=2", f"--object-store-memory={100 * 1024 * 1024}", f"--temp-dir={self.temp_dir}",
            f"--port={free_port()}", f"--ray-client-server-port={free_port()}",
            # The dashboard serves Ray's state API (which tasks ran in which worker process).
            "--include-dashboard=true", f"--dashboard-port={free_port()}", f"--dashboard-agent-listen-port={free_port()}",
        ]
        # A stopping node would wait up to 30 s for work to drain; a test cluster has none left.
        env = {**os.environ, "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"}
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(argv, cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def address(self, timeout_s: float = 180) -> str:
        """The GCS address `ray start` writes once the node is up (what `ray.init(address=...)` takes)."""
        path = self.temp_dir / "ray_current_cluster"
        deadline = time.monotonic() + timeout_s
        while not path.exists() or not path.read_text().strip():
            if self.proc.poll() is not None:
                raise RuntimeError(f"ray start exited with {self.proc.returncode}:\n{self.tail()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"ray start did not come up in {timeout_s} s:\n{self.tail()}")
            time.sleep(0.2)
        return path.read_text().strip()

    def processes(self) -> list[psutil.Process]:
        """`ray start` and everything it started: its descendants, and its session's daemons."""
        procs = {self.proc.pid: psutil.Process(self.proc.pid)} if self.proc.poll() is None else {}
        with contextlib.suppress(psutil.NoSuchProcess):
            procs.update({p.pid: p for p in psutil.Process(self.proc.pid).children(recursive=True)})
        for p in psutil.process_iter():
            with contextlib.suppress(psutil.Error, ProcessLookupError, PermissionError):
                if os.getpgid(p.pid) == self.proc.pid:
                    procs.setdefault(p.pid, p)
        return list(procs.values())

    def stop(self, timeout_s: float = 60) -> list[psutil.Process]:
        """SIGTERM `ray start --block`, which stops its node's processes; SIGKILL what outlives that.

        Returns the processes that were still alive after the SIGTERM (empty when Ray cleaned up)."""
        started = self.processes()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout_s)
        _, alive = psutil.wait_procs(started, timeout=10)
        alive = [p for p in alive if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
        for p in alive:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.kill()
        psutil.wait_procs(alive, timeout=10)
        shutil.rmtree(self.temp_dir, ignore_errors=True)
        return alive

    def tail(self, chars: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-chars:] if self.log.exists() else ""


def shard_tasks(address: str, expected: int, timeout_s: float = 30, grace_s: float = 5) -> list:
    """Ray's record of the `shard` tasks. Task events reach the state API asynchronously, the
    submitter's (state) and the executing worker's (pid, log files) separately, and a worker's
    last ones can be lost when the job's driver disconnects: once every task has ended, wait
    `grace_s` more for the worker details, then take what arrived."""
    from ray.util.state import list_tasks

    deadline = time.monotonic() + timeout_s
    settled_by = None
    while True:
        tasks = list_tasks(address=address, filters=[("name", "=", "shard")], detail=True, raise_on_missing_output=False)
        ended = len(tasks) >= expected and all(t.state in ("FINISHED", "FAILED") for t in tasks)
        if ended and settled_by is None:
            settled_by = time.monotonic() + grace_s
        if ended and (all(t.worker_pid for t in tasks) or time.monotonic() > settled_by):
            return tasks
        if time.monotonic() > deadline:
            return tasks
        time.sleep(0.5)


def prefect_shard_runs(pipeline_run_id: str) -> dict[str, str]:
    """Task run name -> state type, for the shard tasks of the pipeline run's stage subflows."""
    import asyncio

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterParentFlowRunId,
        TaskRunFilter,
        TaskRunFilterFlowRunId,
    )

    async def read() -> dict[str, str]:
        async with get_client() as client:
            subflows = await client.read_flow_runs(
                flow_run_filter=FlowRunFilter(parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[pipeline_run_id]))
            )
            runs = await client.read_task_runs(
                task_run_filter=TaskRunFilter(flow_run_id=TaskRunFilterFlowRunId(any_=[r.id for r in subflows]))
            )
            return {r.name: r.state_type.value for r in runs if r.name.startswith("clip-shard-")}

    return asyncio.run(read())


def test_shards_run_on_a_ray_cluster_and_give_the_same_rows(tmp_path):
    """Three shards of the clip stage on a running Ray cluster give the rows of a threads run; the
    shards ran in Ray's worker processes and reported to the flow's Prefect server; Ray stops clean."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    head = RayHead(tmp_path)  # comes up while the videos are made and the threads run goes
    try:
        src = tmp_path / "src"
        make_video(src / "a.mp4", 12, fps=25, gop=25)
        make_video(src / "b.mp4", 11, fps=25, gop=25, source="smptebars")
        make_video(src / "c.mp4", 7, fps=25, gop=25, audio=False)
        common = ["clip.shard_size=1"]
        threads = lvr_pipeline(source=str(src), workdir=str(tmp_path / "threads"), to_stage="clip", overrides=common)

        address = head.address()
        from prefect.client.orchestration import get_client

        with get_client(sync_client=True) as client:
            api_url = str(client.api_url)
        # Ray workers are other processes: they reach the flow's Prefect server through the settings
        # Prefect ships with each task, so the URL must be a setting (production sets
        # PREFECT_API_URL); with the ephemeral API each worker would start a temporary server of its own.
        with temporary_settings(updates={PREFECT_API_URL: api_url}):
            on_ray = lvr_pipeline(
                source=str(src), workdir=str(tmp_path / "ray"), to_stage="clip",
                overrides=[*common, "execution.task_runner=ray", f"execution.ray_address={address}", "execution.shard_workers=2"],
            )
        assert on_ray["results"]["clip"]["status"] == "done"
        assert on_ray["results"]["clip"]["rows"] == threads["results"]["clip"]["rows"] > 0
        ray_rows = pd.read_parquet(tmp_path / "ray" / "clip")[CLIP_COLUMNS].sort_values("clip_id", ignore_index=True)
        thread_rows = pd.read_parquet(tmp_path / "threads" / "clip")[CLIP_COLUMNS].sort_values("clip_id", ignore_index=True)
        pd.testing.assert_frame_equal(ray_rows, thread_rows)

        # Each shard was a task of this Ray cluster, run by one of its worker processes (their logs
        # in the cluster's temp dir), never by this process; and each reported its run to Prefect.
        tasks = shard_tasks(address, expected=3)
        assert len(tasks) == 3 and "FAILED" not in {t.state for t in tasks}, tasks
        pids = {t.worker_pid for t in tasks if t.worker_pid}
        assert pids and os.getpid() not in pids, tasks
        logs = [t.task_log_info["stdout_file"] for t in tasks if t.task_log_info]
        assert logs and all(log.startswith(f"{head.temp_dir}/") for log in logs), tasks
        assert prefect_shard_runs(on_ray["run_id"]) == {f"clip-shard-{i}": "COMPLETED" for i in range(3)}
        names = {p.name() for p in head.processes()}
        assert {"gcs_server", "raylet"} <= names, names  # what the leak check below must see end
    finally:
        leftovers = head.stop()
    assert not leftovers, f"processes outlived `ray start`'s SIGTERM: {[(p.pid, p.name()) for p in leftovers]}"
    # Nothing anywhere on the machine still runs in this cluster's session (the daemons name it
    # in their command lines), even a process that left the session's process group.
    assert not using(head.temp_dir), using(head.temp_dir)


def using(directory: Path) -> list[tuple[int, str]]:
    """Live processes whose command line names `directory`."""
    found = []
    for p in psutil.process_iter(["pid", "cmdline", "status"]):
        cmdline = " ".join(p.info["cmdline"] or [])
        if str(directory) in cmdline and p.info["status"] != psutil.STATUS_ZOMBIE:
            found.append((p.info["pid"], cmdline[:200]))
    return found
