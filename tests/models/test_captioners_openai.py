"""The `openai` caption backend against a real HTTP server on 127.0.0.1 speaking chat completions."""

from __future__ import annotations

import base64
import io
import json
import shutil

import pandas as pd
import pyarrow.parquet as pq
import pytest
from PIL import Image

from models.openai_client import ChatRequestError
from tasks.caption.stage import CaptionStage
from tasks.clip.stage import ClipStage
from tasks.config import load_config
from tasks.engine.run import run_stage
from tasks.engine.stage import StageContext, StageError
from tasks.engine.store import Workdir
from tests.support.openai_server import Fault, OpenAITestServer, Reply
from tests.support.videos import make_video

KEY_ENV = "LVR_TEST_CAPTION_KEY"
SECRET = "sk-caption-secret-7f3a9c"


@pytest.fixture(scope="module")
def clipped(tmp_path_factory):
    root = tmp_path_factory.mktemp("caption-openai")
    # Distinct pictures: identical clips would send identical requests and blur the fault script.
    for i, pattern in enumerate(("testsrc2", "smptebars", "rgbtestsrc")):
        make_video(root / "src" / f"v{i}.mp4", 21, fps=25, gop=25, size="192x144", source=pattern)
    wd = root / "wd"
    run_stage(ClipStage(), StageContext(Workdir(str(wd)), load_config("tiny"), source=str(root / "src")))
    return wd


def _describe(info) -> Reply:
    images = [p for m in info.messages for p in (m["content"] if isinstance(m["content"], list) else []) if p["type"] == "image_url"]
    return Reply(f"A test pattern seen in {len(images)} frames, with moving colour bars and a counter.")


def _stage(wd, server, monkeypatch, *overrides):
    monkeypatch.setenv(KEY_ENV, SECRET)
    cfg = load_config("tiny", [
        "caption.backend=openai", f"caption.base_url={server.base_url}", "caption.model=test-vlm",
        f"caption.api_key_env={KEY_ENV}", "caption.concurrency=3", "caption.max_retries=2", "caption.num_frames=4", *overrides,
    ])
    return run_stage(CaptionStage(), StageContext(Workdir(str(wd)), cfg))


def test_frames_arrive_as_jpeg_images_under_the_concurrency_limit(clipped, tmp_path, monkeypatch, caplog):
    wd = tmp_path / "wd"
    shutil.copytree(clipped, wd)
    n_clips = len(pd.read_parquet(wd / "clip"))
    with OpenAITestServer(_describe, latency_s=0.15, api_key=SECRET) as server:
        report = _stage(wd, server, monkeypatch)
        requests = list(server.requests)
        max_in_flight = server.max_in_flight
    assert report.rows == n_clips == len(requests) and report.failures == 0
    assert 1 < max_in_flight <= 3
    for info in requests:
        assert info.headers["authorization"] == f"Bearer {SECRET}"
        parts = info.messages[0]["content"]
        images = [p for p in parts if p["type"] == "image_url"]
        assert len(images) == 4 and parts[-1] == {"type": "text", "text": load_config("tiny").caption.prompt}
        header, data = images[0]["image_url"]["url"].split(",", 1)
        assert header == "data:image/jpeg;base64"
        assert Image.open(io.BytesIO(base64.b64decode(data))).size == (192, 144)
    captions = pd.read_parquet(wd / "caption")
    assert captions["caption"].str.contains("4 frames").all() and set(captions["backend"]) == {"openai"}
    assert (captions["tokens_in"] > 0).all() and (captions["tokens_out"] > 0).all()
    for path in wd.rglob("*"):
        if path.is_file() and path.suffix in (".parquet", ".json"):
            assert SECRET.encode() not in path.read_bytes(), path
    assert SECRET not in caplog.text


def test_retries_429_and_500_and_a_refused_clip_is_a_failures_row(clipped, tmp_path, monkeypatch):
    wd = tmp_path / "wd"
    shutil.copytree(clipped, wd)
    n_clips = len(pd.read_parquet(wd / "clip"))
    order: dict[str, int] = {}

    def faults(info):
        rank = order.setdefault(json.dumps(info.messages, sort_keys=True), len(order))
        if rank == 0 and info.attempt == 0:
            return Fault.rate_limited(0.3)
        if rank == 1 and info.attempt == 0:
            return Fault.server_error(500)
        if rank == 2:
            return Fault(status=400, message="this clip's content was refused")  # the request's own fault
        return None

    with OpenAITestServer(_describe, faults=faults, api_key=SECRET) as server:
        report = _stage(wd, server, monkeypatch)
        statuses = server.statuses()
    assert statuses[429] == 1 and statuses[500] == 1 and statuses[400] == 1  # a 400 is not retried
    assert report.rows == n_clips - 1 and report.failures == 1
    failure = pq.read_table(wd / "caption" / "_failures.parquet").to_pylist()[0]
    assert failure["error_kind"] == "request_failed_http_400" and "refused" in failure["message"]
    assert failure["failure_class"] == "request"


def test_an_endpoint_that_stays_down_fails_the_stage_and_a_rerun_captions_everything(clipped, tmp_path, monkeypatch):
    """An outage is no verdict on the clips: no failure rows to reuse, so the next run does them
    without --retry-failures, and shards finished before the outage are kept."""
    wd = tmp_path / "wd"
    shutil.copytree(clipped, wd)
    n_clips = len(pd.read_parquet(wd / "clip"))
    answered: list = []
    outage = {"on": True}

    def down_after_two(info):
        if outage["on"] and len(answered) >= 2:
            return Fault.server_error(503)
        answered.append(info)
        return None

    with OpenAITestServer(_describe, faults=down_after_two, api_key=SECRET) as server:
        with pytest.raises(ChatRequestError, match="503"):
            _stage(wd, server, monkeypatch, "caption.shard_size=1", "caption.concurrency=1")
        assert not (wd / "caption" / "_manifest.json").exists()
        done = list((wd / "caption" / "_work" / "shards").glob("*/_done.json"))
        assert len(done) == 2  # the clips captioned before the outage
        outage["on"] = False  # the endpoint is back
        before = len(answered)
        report = _stage(wd, server, monkeypatch, "caption.shard_size=1", "caption.concurrency=1")
        sent = len(answered) - before
    assert report.rows == n_clips and report.failures == 0
    assert sent == n_clips - 2  # only what the outage interrupted


def test_a_run_where_every_clip_fails_publishes_nothing(clipped, tmp_path, monkeypatch):
    wd = tmp_path / "wd"
    shutil.copytree(clipped, wd)
    with OpenAITestServer(_describe, faults=lambda info: Fault(status=400, message="refused"), api_key=SECRET) as server:
        with pytest.raises(StageError, match=r"caption: every one of the \d+ clips failed \(first: request_failed_http_400"):
            _stage(wd, server, monkeypatch)
    assert not (wd / "caption" / "_manifest.json").exists()


def test_wrong_key_stops_the_stage(clipped, tmp_path, monkeypatch):
    wd = tmp_path / "wd"
    shutil.copytree(clipped, wd)
    from models.openai_client import ChatRequestError

    with OpenAITestServer(_describe, api_key="another-key") as server:
        with pytest.raises(ChatRequestError) as err:
            _stage(wd, server, monkeypatch)
    assert err.value.status == 401 and SECRET not in str(err.value)
    assert not (wd / "caption" / "_manifest.json").exists()


def test_video_url_mode_sends_the_clip(clipped, tmp_path, monkeypatch):
    wd = tmp_path / "wd"
    shutil.copytree(clipped, wd)
    with OpenAITestServer(lambda info: Reply("A clip."), api_key=SECRET) as server:
        report = _stage(wd, server, monkeypatch, "caption.send_video_url=true")
        first = server.requests[0]
    part = first.messages[0]["content"][0]
    assert part["type"] == "video_url" and part["video_url"]["url"].startswith("data:video/mp4;base64,")
    assert report.failures == 0
