"""Stage leases: one writer per stage of a workdir, on local disks and on S3."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time

import pytest

from data_schemas import FAILURES
from tasks.config import load_config
from tasks.engine.lease import (
    LOCK_FILE,
    Holder,
    StageBusy,
    StageLease,
    create_exclusive,
    is_stale,
)
from tasks.engine.run import run_stage
from tasks.engine.stage import ShardResult, Stage, StageContext, WorkItem
from tasks.engine.store import Workdir
from tests.support.s3_server import s3_bucket, s3_server  # noqa: F401  (pytest fixtures)


def holder(**kw) -> Holder:
    now = time.time()
    base = dict(token="t", owner="other-run", host=socket.gethostname(), pid=os.getpid(), acquired_at=now, heartbeat_at=now)
    return Holder(**{**base, **kw})


def plant(workdir: Workdir, stage: str, h: Holder) -> None:
    workdir.makedirs(stage)
    (workdir.fs.pipe_file(workdir.path(stage, LOCK_FILE), json.dumps(h.__dict__).encode()))


def test_a_second_run_that_will_not_wait_is_told_who_holds_the_stage(tmp_path):
    wd = Workdir(str(tmp_path / "wd"))
    with StageLease(wd, "clip", "run-a"):
        assert json.loads((tmp_path / "wd" / "clip" / LOCK_FILE).read_text())["owner"] == "run-a"
        with pytest.raises(StageBusy, match=r"clip: .* is being written by run run-a \(host .*, pid \d+"):
            StageLease(wd, "clip", "run-b", wait=False).acquire()
    assert not (tmp_path / "wd" / "clip" / LOCK_FILE).exists()  # given back
    with StageLease(wd, "clip", "run-b", wait=False):  # free again
        pass


def test_a_waiting_run_logs_the_owner_and_gets_the_stage_when_it_is_given_back(tmp_path, caplog):
    wd = Workdir(str(tmp_path / "wd"))
    first = StageLease(wd, "caption", "run-a")
    first.acquire()
    got = []

    def second():
        with StageLease(wd, "caption", "run-b", poll_s=0.05):
            got.append(time.monotonic())

    caplog.set_level(logging.INFO, logger="lvr.lease")
    thread = threading.Thread(target=second)
    thread.start()
    time.sleep(0.5)
    assert not got  # still waiting
    released = time.monotonic()
    first.release()
    thread.join(5)
    assert got and got[0] >= released
    assert "caption: waiting for run run-a" in caplog.text


def test_a_lease_without_heartbeat_or_of_a_dead_process_is_taken_over(tmp_path, caplog):
    wd = Workdir(str(tmp_path / "wd"))
    plant(wd, "qa", holder(heartbeat_at=time.time() - 1000))
    caplog.set_level(logging.WARNING, logger="lvr.lease")
    with StageLease(wd, "qa", "run-b", wait=False, stale_s=60) as lease:
        assert lease.holder.owner == "run-b"
    assert "taking over the lease of run other-run" in caplog.text

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    plant(wd, "qa", holder(pid=dead.pid))  # fresh heartbeat, but its process is gone
    with StageLease(wd, "qa", "run-c", wait=False, stale_s=3600) as lease:
        assert lease.holder.owner == "run-c"


def test_staleness_rule():
    now = time.time()
    assert not is_stale(holder(heartbeat_at=now - 10), stale_s=60, now=now)
    assert is_stale(holder(heartbeat_at=now - 61), stale_s=60, now=now)
    assert not is_stale(holder(host="elsewhere", pid=1, heartbeat_at=now), stale_s=60, now=now)  # can't see its processes


def test_the_holder_renews_its_heartbeat_so_others_wait(tmp_path):
    wd = Workdir(str(tmp_path / "wd"))
    with StageLease(wd, "sft", "run-a", stale_s=0.4):
        first = json.loads((tmp_path / "wd" / "sft" / LOCK_FILE).read_text())["heartbeat_at"]
        time.sleep(1.0)  # 2.5 stale periods: without renewals a waiter would take it over
        later = json.loads((tmp_path / "wd" / "sft" / LOCK_FILE).read_text())["heartbeat_at"]
        assert later > first
        with pytest.raises(StageBusy):
            StageLease(wd, "sft", "run-b", wait=False, stale_s=0.4).acquire()


def test_exclusive_create_on_s3(s3_bucket):  # noqa: F811
    wd = Workdir(f"{s3_bucket}/wd")
    path = wd.path("clip", LOCK_FILE)
    assert create_exclusive(wd.fs, path, b"one")
    assert not create_exclusive(wd.fs, path, b"two")
    assert wd.fs.cat_file(path) == b"one"
    with pytest.raises(StageBusy, match="being written by run"):
        plant(wd, "caption", holder(host="elsewhere"))
        StageLease(wd, "caption", "run-b", wait=False).acquire()


class SlowStage(Stage):
    """Two items, each taking `delay` seconds: long enough for another run to arrive meanwhile."""

    name = "clip"
    code_version = "1"

    output = FAILURES  # any schema: the rows are not what this test looks at

    def __init__(self, delay: float, seen: list[str]):
        self.delay, self.seen = delay, seen

    def list_items(self, ctx):
        return [WorkItem(str(i), key=str(i)) for i in range(2)]

    def process_shard(self, ctx, items):
        self.seen.append(f"start {ctx.run_id}")
        time.sleep(self.delay)
        self.seen.append(f"end {ctx.run_id}")
        return ShardResult({}, [])


def test_two_runs_of_one_stage_never_overlap(tmp_path):
    """The second run starts only after the first has published, then finds the stage cached."""
    wd = Workdir(str(tmp_path / "wd"))
    seen: list[str] = []
    reports = {}

    config = load_config("tiny", ["clip.shard_size=2"])  # one shard; loaded before the threads, whose start order is the test's

    def run(run_id: str):
        ctx = StageContext(wd, config, run_id=run_id)
        reports[run_id] = run_stage(SlowStage(0.3, seen), ctx)

    threads = [threading.Thread(target=run, args=(r,)) for r in ("a", "b")]
    for t in threads:
        t.start()
        time.sleep(0.1)
    for t in threads:
        t.join(30)
    assert seen == ["start a", "end a"]  # b did no work: it waited, then found it cached
    assert reports["a"].status == "done" and reports["b"].status == "cached"
