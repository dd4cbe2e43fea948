"""The local Prefect API that `lvr run` starts first when no PREFECT_API_URL is set: a real server
process on 127.0.0.1, its port, its readiness, the run's settings against it, and its stop."""

from __future__ import annotations

import socket

import httpx
import pytest
from prefect import flow, get_client
from prefect.settings import PREFECT_API_URL, get_current_settings, temporary_settings

from flows import local_api
from flows.local_api import local_api_started, using

pytestmark = pytest.mark.slow


@flow(name="lvr-local-api-probe")
def _probe() -> str:
    return "ran"


def test_server_on_a_taken_port_moves_on_serves_the_run_and_stops(monkeypatch):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        first = taken.getsockname()[1]
        ports = iter([first])
        free_port = local_api._free_port
        monkeypatch.setattr(local_api, "_free_port", lambda: next(ports, None) or free_port())
        with local_api_started() as api:
            assert api is not None and api.port == first
            with using(api):
                assert api.port != first  # uvicorn could not bind: started again on another port
                settings = get_current_settings()
                assert settings.api.url == api.url and settings.flows.heartbeat_frequency is None
                with get_client(sync_client=True) as client:
                    assert str(client.api_url).rstrip("/") == api.url
                    assert client.api_healthcheck() is None  # None: healthy
                assert _probe() == "ran"
                with get_client(sync_client=True) as client:
                    runs = client.read_flow_runs()
                assert any(run.name and run.state and run.state.is_completed() for run in runs)
            assert get_current_settings().api.url is None  # the run's settings end with it
            url = api.url
        assert api.process is None
        with pytest.raises(httpx.TransportError):
            httpx.get(f"{url}/health", timeout=2.0)


def test_no_local_server_when_an_api_url_is_set():
    with temporary_settings(updates={PREFECT_API_URL: "http://127.0.0.1:9/api"}):
        with local_api_started() as api:
            assert api is None
            with using(api):
                assert get_current_settings().api.url == "http://127.0.0.1:9/api"
