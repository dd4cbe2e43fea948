"""Shared fixtures. Everything is real: ffmpeg, Parquet, Prefect's ephemeral API, tiny local models."""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import pytest

# Before anything imports Prefect: no telemetry, a private Prefect home, our loggers in Prefect's.
_SESSION_HOME = Path(os.environ.get("LVR_TEST_HOME") or tempfile.mkdtemp(prefix="lvr-tests-"))
(_SESSION_HOME / "prefect").mkdir(parents=True, exist_ok=True)
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ.setdefault("PREFECT_HOME", str(_SESSION_HOME / "prefect"))
os.environ.setdefault("LVR_CACHE_DIR", str(_SESSION_HOME / "cache"))
# The tiny profile captions with `tiny-captioner`, whose pretraining takes minutes: tests get one of
# zero steps (the random `tiny` weights, cached under their own recipe key), built in a second.
os.environ.setdefault("LVR_TINY_CAPTIONER_STEPS", "0")
os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "lvr")
os.environ.setdefault("PREFECT_UI_ENABLED", "false")
# Each xdist worker starts Prefect's ephemeral API at its first flow, beside the other worker's load
# (on 2 cores: a Ray head coming up, torchrun ranks): Prefect's default 20 s to answer /health was
# exceeded there on a slow day (tests/e2e/test_ray.py, with the whole suite at 17 minutes).
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")

from tests.support.videos import make_video  # noqa: E402  (after the environment above is set)


@pytest.fixture
def video_factory(tmp_path):
    def factory(name: str, seconds: float, **kw) -> Path:
        return make_video(tmp_path / "videos" / name, seconds, **kw)

    return factory


def pytest_sessionfinish(session, exitstatus):
    """Stop Prefect's ephemeral server while pytest's streams are still open (its atexit hook logs
    to a closed stream otherwise)."""
    server_module = sys.modules.get("prefect.server.api.server")
    if server_module is not None:
        for server in list(server_module.SubprocessASGIServer._instances.values()):
            server.stop()


def pytest_configure(config):
    """xdist hands out test files in the order `slow_files_first` leaves them (its own reorder, files
    with the most tests first, left the few-test end-to-end files for last: one worker ran them alone
    while the other had finished)."""
    if hasattr(config.option, "loadscopereorder"):
        config.option.loadscopereorder = False


def slow_files_first(items: list[pytest.Item]) -> list[pytest.Item]:
    """Files with `slow` tests (whole pipelines, minutes each) first, then files with more tests before
    files with fewer; each file's tests stay together and in order. On 2 workers the run ends when
    its longest files do, so they start at once: a minute less of a 14-minute run on 2 cores (the
    schedule replayed on measured durations: 824 s with xdist's order, 762 s with this one)."""
    files: dict[str, list[pytest.Item]] = {}
    for item in items:
        files.setdefault(item.nodeid.split("::")[0], []).append(item)
    ordered = sorted(files.values(), key=lambda tests: (not any("slow" in t.keywords for t in tests), -len(tests)))
    return [item for tests in ordered for item in tests]


def pytest_collection_modifyitems(config, items):
    """`images` tests (a Docker engine and the built images) run only when asked for with `-m images`
    (`make test-images`); `gpu` tests need CUDA: on CPU machines they are reported as skipped, never
    as passed. Slow files first (`slow_files_first`)."""
    import torch

    if "images" not in (config.getoption("markexpr") or ""):
        images = [item for item in items if "images" in item.keywords]
        if images:
            config.hook.pytest_deselected(items=images)
            items[:] = [item for item in items if "images" not in item.keywords]
    items[:] = slow_files_first(items)
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
