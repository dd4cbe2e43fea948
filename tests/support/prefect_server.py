"""A real Prefect server, process work pool and worker on 127.0.0.1, driven the way the UI drives them.

    with PrefectServer(home) as server:
        server.cli("work-pool", "create", "lvr-test", "--type", "process")
        with server.worker("lvr-test"):
            run = server.create_flow_run(deployment_id, parameters={...})
            server.wait(run["id"])

Everything talks to the server over its REST API with the bodies the UI sends (plain JSON, no
client-side models), and every process started here is stopped on exit, its children included.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

from parallel.local import free_port

TERMINAL_STATES = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}
PREFECT = [sys.executable, "-m", "prefect"]


def _stop(proc: subprocess.Popen, timeout: float = 20) -> None:
    """SIGTERM the process group (the worker's flow-run children too), then SIGKILL what is left."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)


class PrefectServer:
    def __init__(self, home: Path, env: dict[str, str] | None = None, startup_timeout_s: float = 120) -> None:
        self.home = Path(home)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.api = f"{self.url}/api"
        self.env = {
            **os.environ,
            "PREFECT_HOME": str(self.home),
            "PREFECT_API_URL": self.api,
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_UI_ENABLED": "true",
            "PREFECT_WORKER_QUERY_SECONDS": "1",
            "PREFECT_WORKER_HEARTBEAT_SECONDS": "5",
            "PREFECT_API_LOG_RETRYABLE_ERRORS": "true",
            "PYTHONUNBUFFERED": "1",
            **(env or {}),
        }
        self.startup_timeout_s = startup_timeout_s
        self.processes: list[subprocess.Popen] = []
        self.logs: list[Path] = []
        self.http = httpx.Client(base_url=self.api, timeout=30)

    # ---- processes --------------------------------------------------------------------------
    def _spawn(self, name: str, argv: list[str], cwd: Path | None = None) -> subprocess.Popen:
        log = self.home / f"{name}.log"
        self.logs.append(log)
        handle = log.open("ab")
        proc = subprocess.Popen(argv, env=self.env, cwd=cwd, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True)
        handle.close()
        self.processes.append(proc)
        return proc

    def __enter__(self) -> "PrefectServer":
        self.home.mkdir(parents=True, exist_ok=True)
        proc = self._spawn("server", [*PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(self.port)])
        deadline = time.monotonic() + self.startup_timeout_s
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"prefect server exited with {proc.returncode}:\n{self.tail('server')}")
            with contextlib.suppress(httpx.HTTPError):
                if self.http.get("/health").status_code == 200:
                    return self
            time.sleep(0.5)
        self.close()
        raise TimeoutError(f"prefect server did not answer within {self.startup_timeout_s} s:\n{self.tail('server')}")

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        for proc in reversed(self.processes):
            _stop(proc)
        self.http.close()

    def alive(self) -> list[int]:
        return [p.pid for p in self.processes if p.poll() is None]

    @contextlib.contextmanager
    def worker(self, pool: str, cwd: Path | None = None, kind: str = "process") -> Iterator[subprocess.Popen]:
        """A worker of `pool`; `kind` docker needs prefect-docker (lvr's `docker` extra)."""
        proc = self._spawn(f"worker-{pool}", [*PREFECT, "worker", "start", "--pool", pool, "--type", kind], cwd=cwd)
        try:
            yield proc
        finally:
            _stop(proc)

    def cli(self, *args: str, cwd: Path | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
        result = subprocess.run([*PREFECT, *args], env=self.env, cwd=cwd, capture_output=True, text=True, timeout=timeout)
        if result.returncode != 0:
            raise RuntimeError(f"prefect {' '.join(args)} failed ({result.returncode}):\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}")
        return result

    def tail(self, name: str, chars: int = 6000) -> str:
        path = self.home / f"{name}.log"
        return path.read_text(errors="replace")[-chars:] if path.exists() else ""

    # ---- REST, as the UI calls it -----------------------------------------------------------
    def request(self, method: str, path: str, **kw: Any) -> Any:
        # A read (GET, or a POST to a /filter query) may be sent again: on a loaded 2-core machine the
        # server's SQLite has stalled one past the client's 30 s (CI: a GET /flow_runs/<id> poll).
        rereadable = method == "GET" or path.endswith("/filter")
        for attempt in range(20):
            try:
                response = self.http.request(method, path, **kw)
            except httpx.TimeoutException:
                if not rereadable or attempt == 19:
                    raise
                continue
            # 503 is the server's "retry me" (SQLite busy under load); Prefect's own client retries it too.
            if response.status_code != 503:
                break
            time.sleep(min(0.25 * 2**attempt, 3))
        if response.status_code >= 400:
            raise RuntimeError(f"{method} {path}: {response.status_code} {response.text[:2000]}")
        return response.json() if response.content else None

    def deployments(self) -> dict[str, dict[str, Any]]:
        """`flow/deployment` -> deployment."""
        flows = {f["id"]: f["name"] for f in self.request("POST", "/flows/filter", json={"limit": 200})}
        return {f"{flows[d['flow_id']]}/{d['name']}": d for d in self.request("POST", "/deployments/filter", json={"limit": 200})}

    def create_flow_run(self, deployment_id: str, parameters: dict[str, Any] | None = None) -> dict[str, Any]:
        """What the UI's "Run > Custom run" form posts."""
        body: dict[str, Any] = {"state": {"type": "SCHEDULED", "message": "Run from the test"}}
        if parameters is not None:
            body["parameters"] = parameters
        return self.request("POST", f"/deployments/{deployment_id}/create_flow_run", json=body)

    def retry(self, flow_run_id: str) -> dict[str, Any]:
        """What the UI's "Retry" button posts for a failed flow run."""
        return self.request(
            "POST",
            f"/flow_runs/{flow_run_id}/set_state",
            json={"state": {"type": "SCHEDULED", "name": "AwaitingRetry", "message": "Retry from the UI"}, "force": True},
        )

    def wait_for_scheduled_runs(self, deployment_id: str, timeout_s: float = 90) -> list[str]:
        """Expected start times (UTC, ISO) of the runs the server's scheduler created for a deployment."""
        body = {"flow_runs": {"deployment_id": {"any_": [deployment_id]}, "state": {"type": {"any_": ["SCHEDULED"]}}}, "limit": 200}
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            runs = self.request("POST", "/flow_runs/filter", json=body)
            if runs:
                return sorted(r["expected_start_time"].replace("+00:00", "Z") for r in runs)
            time.sleep(1)
        raise TimeoutError(f"the scheduler created no run for deployment {deployment_id} in {timeout_s} s:\n{self.tail('server')}")

    def pause_schedules(self, deployment_id: str) -> None:
        """Pause a deployment's schedules and drop the runs they already created."""
        for schedule in self.request("GET", f"/deployments/{deployment_id}")["schedules"]:
            self.request("PATCH", f"/deployments/{deployment_id}/schedules/{schedule['id']}", json={"active": False})
        body = {"flow_runs": {"deployment_id": {"any_": [deployment_id]}, "state": {"type": {"any_": ["SCHEDULED"]}}}, "limit": 200}
        for run in self.request("POST", "/flow_runs/filter", json=body):
            self.request("DELETE", f"/flow_runs/{run['id']}")

    def flow_run(self, flow_run_id: str) -> dict[str, Any]:
        return self.request("GET", f"/flow_runs/{flow_run_id}")

    def wait(self, flow_run_id: str, timeout_s: float = 300, after_run_count: int = 0) -> dict[str, Any]:
        """The flow run once it reaches a terminal state (on its `after_run_count`+1-th run)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            run = self.flow_run(flow_run_id)
            if run["state_type"] in TERMINAL_STATES and run["run_count"] > after_run_count:
                return run
            for proc in self.processes:
                if proc.poll() is not None and proc.returncode not in (0, -signal.SIGTERM):
                    raise RuntimeError(f"a Prefect process exited with {proc.returncode}:\n{self.tail('server')}")
            time.sleep(0.5)
        raise TimeoutError(f"flow run {flow_run_id} not finished after {timeout_s} s (state {run['state_type']}):\n{self.worker_logs()}")

    def worker_logs(self) -> str:
        return "\n".join(self.tail(p.stem) for p in self.logs if p.stem.startswith("worker"))

    def subflow_runs(self, parent_flow_run_id: str) -> list[dict[str, Any]]:
        """Flow runs started by a flow run: its subflows and, with `execution: deployments`, its stages' runs."""
        body = {"flow_runs": {"parent_flow_run_id": {"operator": "and_", "any_": [parent_flow_run_id]}}, "limit": 200}
        return self.request("POST", "/flow_runs/filter", json=body)

    def artifacts(self, flow_run_ids: list[str]) -> list[dict[str, Any]]:
        body = {"artifacts": {"flow_run_id": {"any_": flow_run_ids}}, "limit": 200}
        return self.request("POST", "/artifacts/filter", json=body)

    def logs_of(self, flow_run_id: str) -> str:
        body = {"logs": {"flow_run_id": {"any_": [flow_run_id]}}, "limit": 200, "sort": "TIMESTAMP_ASC"}
        return "\n".join(entry["message"] for entry in self.request("POST", "/logs/filter", json=body))
