"""`lvr run` killed mid-stage (the whole process group, its ephemeral Prefect server included) and
run again: finished shards are kept and the result equals a clean run. A file of its own so that
the two pytest workers share the CLI's end-to-end runs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd

from tests.support.paths import REPO, run_cli
from tests.support.videos import make_video


def _clip_rows(workdir: Path) -> list[dict]:
    df = pd.read_parquet(workdir / "clip").drop(columns=["clip_uri"])
    return df.sort_values("clip_id").to_dict("records")


def test_sigkill_mid_stage_then_rerun_matches_clean_run(tmp_path):
    src = tmp_path / "src"
    for i in range(5):
        make_video(src / f"v{i}.mp4", 20 + 2 * i, fps=25, gop=30, size="320x240", source="testsrc2" if i % 2 else "smptebars")
    wd = tmp_path / "killed"
    argv = [sys.executable, "-m", "flows.cli", "run", "--source", str(src), "--workdir", str(wd), "--to", "clip",
            "--set", "clip.mode=exact", "--set", "clip.shard_size=1"]
    proc = subprocess.Popen(argv, cwd=REPO, env=os.environ.copy(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    shards = wd / "clip" / "_work" / "shards"
    deadline = time.time() + 300
    while time.time() < deadline and len(list(shards.glob("*/_done.json"))) < 2:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the whole job, ephemeral Prefect server included
    proc.wait()
    done_before = len(list(shards.glob("*/_done.json")))
    assert 2 <= done_before < 5, "the kill must land mid-stage"
    assert not (wd / "clip" / "_manifest.json").exists()

    rerun = run_cli("run", "--source", str(src), "--workdir", str(wd), "--to", "clip", "--set", "clip.mode=exact", "--set", "clip.shard_size=1")
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    manifest = json.loads((wd / "clip" / "_manifest.json").read_text())
    assert manifest["shards"]["reused"] >= done_before and manifest["shards"]["total"] == 5

    clean = tmp_path / "clean"
    out = run_cli("run", "--source", str(src), "--workdir", str(clean), "--to", "clip", "--set", "clip.mode=exact",
                  "--set", "clip.shard_size=1", "--engine", "local")
    assert out.returncode == 0, out.stderr[-3000:]
    assert _clip_rows(wd) == _clip_rows(clean)
    assert len(list((wd / "clip").glob("part-*.parquet"))) == 1
