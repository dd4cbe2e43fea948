"""The Prefect API of an `lvr run` made without PREFECT_API_URL: started first, used, then stopped.

Without an API URL, Prefect starts its local (ephemeral) API server at a run's first API call and
waits for it: a Python process that imports the server and migrates its database, ~3.5 s on 2
cores, after the CLI's own imports and checks. `lvr run` starts the same server as its first step
instead, before it even imports Prefect, so that its imports, config and preflight happen
meanwhile, and points the run at it through PREFECT_API_URL (the server is the one Prefect would
start: same app, same database under PREFECT_HOME, services of an ephemeral server only; its
settings come from the same environment and profile as the CLI's). When Prefect's settings then
name an API after all (a profile's PREFECT_API_URL), the server is stopped before it has done
anything but import.

Flow-run heartbeats are off against this server. They let a server's services notice a run that
crashed; this server lives and dies with the run's own process, so nothing could act on a missed
heartbeat, and each flow run's exit waited up to a second for its heartbeat thread.
"""

from __future__ import annotations

import importlib.util
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

# Nothing of Prefect (nor httpx) is imported at the top: the server starts before the ~1.3 s of
# importing Prefect here.

# uvicorn's exit status when it cannot bind its port (taken since we picked it): try another.
PORT_TAKEN_EXIT = 3
PORT_TRIES = 5


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class LocalApi:
    """Prefect's API server in a child process on 127.0.0.1."""

    def __init__(self) -> None:
        spec = importlib.util.find_spec("prefect")
        assert spec is not None and spec.origin is not None, "prefect is not installed"
        self._app_dir = str(Path(spec.origin).resolve().parent.parent)
        self.port = _free_port()
        self.process: subprocess.Popen[bytes] | None = self._spawn()
        self._ready = False

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api"

    def _spawn(self) -> subprocess.Popen[bytes]:
        argv = [
            sys.executable, "-m", "uvicorn", "--app-dir", self._app_dir, "--factory", "prefect.server.api.server:create_app",
            "--host", "127.0.0.1", "--port", str(self.port), "--log-level", "error", "--lifespan", "on",
        ]
        # What Prefect sets for its own ephemeral server: no UI, services of an ephemeral server only.
        env = {**os.environ, "PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1"}
        return subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL)

    def wait_until_ready(self) -> None:
        """Block until the server answers /health; a clear error when it cannot start."""
        if self._ready:
            return
        import httpx
        from prefect.settings import get_current_settings

        startup_timeout_s = float(get_current_settings().server.ephemeral.startup_timeout_seconds)
        deadline = time.monotonic() + startup_timeout_s
        tries = 1
        with httpx.Client() as client:
            while time.monotonic() < deadline:
                assert self.process is not None, "the local Prefect API was stopped"
                code = self.process.poll()
                if code == PORT_TAKEN_EXIT and tries < PORT_TRIES:
                    self.port, tries = _free_port(), tries + 1
                    self.process = self._spawn()
                    deadline = time.monotonic() + startup_timeout_s
                    continue
                if code is not None:
                    raise RuntimeError(f"the local Prefect API server exited with status {code} before it was ready (its errors are above)")
                try:
                    if client.get(f"{self.url}/health", timeout=2.0).status_code == 200:
                        self._ready = True
                        return
                except httpx.TransportError:
                    pass
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(
            f"the local Prefect API server did not answer within {startup_timeout_s:g} s "
            "(server.ephemeral.startup_timeout_seconds); set PREFECT_API_URL to use a running Prefect server"
        )

    def stop(self) -> None:
        if self.process is None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.process = None


def needs_local_api() -> bool:
    """No PREFECT_API_URL (environment or profile): a run needs a Prefect API of its own."""
    from prefect.settings import get_current_settings

    settings = get_current_settings()
    return settings.api.url is None and settings.server.ephemeral.enabled


@contextmanager
def local_api_started(wanted: bool = True) -> Iterator[LocalApi | None]:
    """The local API server, started now when `wanted` and no API URL is set, stopped on exit."""
    api = LocalApi() if wanted and not os.environ.get("PREFECT_API_URL") else None
    if api is not None and not needs_local_api():  # a profile names an API
        api.stop()
        api = None
    try:
        yield api
    finally:
        if api is not None:
            api.stop()


@contextmanager
def using(api: LocalApi | None) -> Iterator[None]:
    """Prefect calls inside go to `api` (once it answers); with none, to the configured API."""
    if api is None:
        yield
        return
    from prefect.settings import PREFECT_API_URL, PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings

    api.wait_until_ready()
    with temporary_settings(updates={PREFECT_API_URL: api.url, PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}):
        try:
            yield
        finally:
            _deliver_queued_logs_and_events()


def _deliver_queued_logs_and_events(timeout_s: float = 10.0) -> None:
    """Prefect sends logs and events from background queues; what is still queued goes now, while
    the server is up (at interpreter exit it would be gone: "Error logging to API")."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    APILogWorker.drain_all(timeout=timeout_s)
    EventsWorker.drain_all(timeout=timeout_s)
