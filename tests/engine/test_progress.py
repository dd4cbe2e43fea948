"""Progress reporting: the terminal bar, plain log lines off a terminal, and the engine's callback."""

from __future__ import annotations

import io
import logging

from data_schemas import TRAIN_METRICS
from tasks.config import load_config
from tasks.engine.progress import FanOut, TerminalProgress, engine_progress
from tasks.engine.run import run_stage
from tasks.engine.stage import ShardResult, Stage, StageContext, WorkItem
from tasks.engine.store import Workdir, stable_hash


class FakeTTY(io.StringIO):
    def isatty(self) -> bool:
        return True


class Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def start(self, stage, total, unit="shards"):
        self.calls.append(("start", stage, total, unit))

    def advance(self, n=1):
        self.calls.append(("advance", n))

    def finish(self):
        self.calls.append(("finish",))


def test_terminal_bar_is_redrawn_in_place_and_ends_its_line():
    stream = FakeTTY()
    bar = TerminalProgress(stream, width=10)
    bar.start("eval", 4, "items")
    bar.advance(2)
    assert stream.getvalue().rsplit("\r", 1)[-1].startswith("eval     [#####.....] 2/4 items")
    bar.advance(2)
    bar.finish()
    out = stream.getvalue()
    assert out.count("\r") == 4 and "[##########] 4/4 items" in out and out.endswith("\n")


def test_off_a_terminal_progress_is_a_log_line_per_tenth(caplog):
    stream = io.StringIO()
    progress = TerminalProgress(stream)
    with caplog.at_level(logging.INFO, logger="lvr.progress"):
        progress.start("filter", 40)
        for _ in range(40):
            progress.advance()
        progress.finish()
    lines = [r.getMessage() for r in caplog.records if r.name == "lvr.progress"]
    assert len(lines) == 11 and lines[0].startswith("filter: 0/40 shards") and lines[-1].startswith("filter: 40/40 shards")
    assert stream.getvalue() == ""


class Counting(Stage):
    name = "counting"
    code_version = "1"
    output = TRAIN_METRICS

    def settings(self, ctx):
        return {}

    def shard_size(self, ctx):
        return 2

    def list_items(self, ctx):
        return [WorkItem(f"i{k}", stable_hash(k)) for k in range(5)]

    def process_shard(self, ctx, items):
        return ShardResult({}, [])


def test_the_engine_callback_starts_advances_and_finishes_once(tmp_path):
    first, second = Recorder(), Recorder()
    ctx = StageContext(Workdir(str(tmp_path / "wd")), load_config("tiny"))
    ctx.progress = engine_progress(FanOut([first, second]), "counting")
    run_stage(Counting(), ctx)
    assert first.calls == second.calls == [("start", "counting", 3, "shards"), ("advance", 1), ("advance", 1), ("advance", 1), ("finish",)]

    # An engine that announces the total first, `(0, total)`, starts the bar before any shard is done.
    early = Recorder()
    callback = engine_progress(early, "eval")
    for done in range(3):
        callback(done, 2)
    assert early.calls == [("start", "eval", 2, "shards"), ("advance", 1), ("advance", 1), ("finish",)]
