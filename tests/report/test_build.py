"""The run report: built from a real workdir (clip, filter, sft metrics, eval with the tiny model),
rendered by headless Chromium from a file URL, and checked as a person would read it."""

from __future__ import annotations

import logging
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest
from PIL import Image

from data_schemas import CAPTIONS, CLIPS, FILTER
from tasks.config import load_config
from tasks.engine.run import run_stage
from tasks.engine.runs import RunRecord
from tasks.engine.stage import StageContext, read_stage_table
from tasks.engine.store import Workdir
from tasks.media.timecode import time_range
from tasks.report import build_report, update_report
from tasks.stages import STAGE_NAMES
from tests.support.eval_workdir import eval_workdir
from tests.support.stand_ins import Published

CHROMIUM_FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
    "--disable-sync", "--no-first-run",
)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    return eval_workdir(tmp_path_factory)


def chromium(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    binary = shutil.which("chromium")
    if binary is None:
        pytest.fail("Debian's chromium is needed to render the report: `apt-get install -y chromium` (make system-deps)")
    return subprocess.run(
        [binary, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'chromium-profile'}", *args],
        capture_output=True, text=True, timeout=120, check=True,
    )


class _Text(HTMLParser):
    """The text a reader sees: tag contents, without markup, styles or data URIs."""

    def __init__(self) -> None:
        super().__init__()
        self.parts: list[str] = []
        self._skip = 0

    def handle_starttag(self, tag, attrs):
        self._skip += tag in ("style", "script")

    def handle_endtag(self, tag):
        self._skip -= tag in ("style", "script")

    def handle_data(self, data):
        if not self._skip:
            self.parts.append(data)


def visible_text(dom: str) -> str:
    parser = _Text()
    parser.feed(dom)
    return " ".join(" ".join(parser.parts).split())


def test_report_renders_in_chromium_with_every_stage_failures_and_samples(built, tmp_path):
    wd = Workdir(str(built.root))
    RunRecord(
        "run-report-test", wd.url, list(STAGE_NAMES), status="failed",
        results={"clip": {"status": "cached"}, "grpo": {"status": "failed", "message": "RuntimeError: rollout worker died"}},
    ).save(wd)
    index = Path(build_report(str(built.root)))
    assert index == built.root / "report" / "index.html"

    dom = chromium(tmp_path, "--dump-dom", index.as_uri()).stdout
    text = visible_text(dom)
    for stage in STAGE_NAMES:
        assert f"<td><b>{stage}</b></td>" in dom  # a row per stage, run or not
    assert "clip cached" in text and "grpo failed" in text and "RuntimeError: rollout worker died" in text
    assert "caption missing" in text and "eval done" in text
    assert "clip: 1 failure (corrupt: 1)" in text
    assert "eval: 4 failures (bad_item: 2, unreadable_video: 2)" in text and "base::00002::x-gone" in text
    assert built.filter_rows[0]["question"] in text and "the blue car" in text  # a sample question and its options
    assert "At 00:01 the red car enters" in text  # its reference reasoning
    assert "sft: skipped" in text and "Overall" in text
    for title in ("Accuracy per category and model", "Accuracy versus frames", "SFT loss", "Difficulty per category"):
        assert title in text
    assert dom.count("data:image/png;base64,") == 4 and "data:image/jpeg;base64," in dom  # charts and clip thumbnails inline
    for png in ("eval_accuracy.png", "eval_frames.png", "sft_loss.png", "filter_difficulty.png"):
        assert (built.root / "report" / png).stat().st_size > 2000
    assert list((built.root / "report" / "thumbs").glob("*.jpg"))

    shot = tmp_path / "report.png"
    chromium(tmp_path, f"--screenshot={shot}", "--window-size=1280,2000", index.as_uri())
    with Image.open(shot) as image:
        low, high = image.convert("L").getextrema()
        assert image.size == (1280, 2000) and low < high  # not one flat colour: something was drawn


def test_rebuilding_reuses_charts_and_thumbnails(built):
    build_report(str(built.root))
    report = built.root / "report"
    files = [*report.glob("*.png"), *report.glob("thumbs/*.jpg")]
    assert {p.suffix for p in files} == {".png", ".jpg"}  # charts and thumbnails both there: the comparison is not vacuous
    before = {p: p.stat().st_mtime_ns for p in files}
    build_report(str(built.root))
    assert {p: p.stat().st_mtime_ns for p in files} == before


def test_update_report_degrades_and_never_raises(tmp_path, built, caplog):
    empty = tmp_path / "empty"
    text = visible_text(Path(update_report(str(empty))).read_text())
    assert all(f"{stage} missing" in text for stage in STAGE_NAMES) and "No questions yet" in text

    ctx = StageContext(Workdir(str(tmp_path / "wd")), load_config("tiny"))
    run_stage(Published("filter", FILTER, built.filter_rows), ctx)
    (tmp_path / "wd" / "filter" / "part-00000.parquet").write_bytes(b"not parquet")
    with caplog.at_level(logging.WARNING, logger="lvr.report"):
        assert update_report(str(tmp_path / "wd")) is None
    assert "could not update the run report" in caplog.text


def test_sample_thumbnails_show_their_clips_time_and_caption(built, tmp_path):
    root = tmp_path / "wd"
    shutil.copytree(built.root, root)
    wd = Workdir(str(root))
    clips = read_stage_table(wd, "clip", CLIPS).to_pylist()
    captions = [
        {
            "clip_id": c["clip_id"], "video_id": c["video_id"], "start_s": c["start_s"], "end_s": c["end_s"],
            "caption": f"The video shows scene {i} of {c['video_id'][:6]}.", "model": "tiny-captioner", "backend": "hf",
            "prompt_hash": "p", "frames_used": 4, "tokens_in": 10, "tokens_out": 8, "latency_s": 0.1,
        }
        for i, c in enumerate(clips)
    ]
    run_stage(Published("caption", CAPTIONS, captions), StageContext(wd, built.ctx.config))
    text = visible_text(Path(build_report(str(root))).read_text())
    shown = [c for c in captions if c["caption"] in text]
    assert shown  # the thumbnails of sample questions carry their clips' captions...
    for c in shown:  # ...each right after its clip's time range
        assert f"{time_range(c['start_s'], c['end_s'])} {c['caption']}" in text
