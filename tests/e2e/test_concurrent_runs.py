"""Two `lvr run` on one workdir at once (a nightly refresh and a run from the UI): stage leases make
them take turns, and the tables are those of one run alone."""

from __future__ import annotations

import os
import subprocess
import sys

import pandas as pd
import pytest

from tests.support.paths import REPO
from tests.support.videos import make_video

pytestmark = pytest.mark.slow

SETTINGS = ["--set", "caption.max_new_tokens=8", "--set", "clip.shard_size=1", "--set", "caption.shard_size=1"]


def lvr_run(workdir, source, to_stage: str, *extra: str) -> subprocess.Popen:
    argv = [sys.executable, "-m", "flows.cli", "run", "--engine", "local", "--source", str(source), "--workdir", str(workdir),
            "--to", to_stage, *SETTINGS, *extra]
    return subprocess.Popen(argv, cwd=REPO, env=os.environ.copy(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def tables(workdir) -> dict[str, pd.DataFrame]:
    out = {}
    for stage, drop in (("clip", ["clip_uri"]), ("caption", ["latency_s"]), ("qa", [])):
        frame = pd.read_parquet(workdir / stage).drop(columns=drop)
        out[stage] = frame.sort_values(list(frame.columns[:2])).reset_index(drop=True)
    return out


def test_two_runs_on_one_workdir_take_turns_and_match_a_run_alone(tmp_path):
    source = tmp_path / "videos"
    for i in range(3):
        make_video(source / f"v{i}.mp4", 22, gop=25, audio=False, source="testsrc2" if i % 2 else "smptebars")
    shared = tmp_path / "shared"
    first, second = lvr_run(shared, source, "qa"), lvr_run(shared, source, "caption")
    outputs = [p.communicate(timeout=300)[0] for p in (first, second)]
    assert [first.returncode, second.returncode] == [0, 0], outputs
    assert "Traceback" not in "".join(outputs)
    alone = lvr_run(tmp_path / "alone", source, "qa")
    out = alone.communicate(timeout=300)[0]
    assert alone.returncode == 0, out
    together, single = tables(shared), tables(tmp_path / "alone")
    for stage in single:
        pd.testing.assert_frame_equal(together[stage], single[stage], obj=stage)
    assert not list(shared.rglob("_lock.json"))  # every lease given back
