"""`lvr` as a user runs it: a subprocess, real ffmpeg, real Prefect (ephemeral API), real Parquet."""

from __future__ import annotations

import json
import os
import sqlite3
from datetime import datetime, timedelta
from pathlib import Path

import pandas as pd
import pytest

from tasks.samples.videos import SAMPLE_CACHE_SUBDIR
from tests.support.paths import run_cli
from tests.support.videos import make_video

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def small_source(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli-src")
    make_video(root / "a.mp4", 24, fps=25, gop=50)
    make_video(root / "b.mp4", 16, fps=25, gop=25, source="smptebars")
    (root / "broken.mp4").write_text("not a video")
    return root


def test_stages_and_config_commands():
    out = run_cli("stages")
    assert out.returncode == 0
    lines = out.stdout.splitlines()
    assert [ln.split()[1] for ln in lines] == ["clip", "caption", "qa", "filter", "sft", "grpo", "eval"]
    shown = run_cli("config", "--config", "longvila-r1", "--set", "clip.seconds=8")
    assert shown.returncode == 0 and "seconds: 8.0" in shown.stdout and "NVILA" in shown.stdout


def test_bad_override_exits_2_with_valid_keys(tmp_path):
    out = run_cli("run", "--workdir", str(tmp_path / "wd"), "--set", "clip.secs=3", "--to", "clip")
    assert out.returncode == 2
    assert "unknown key 'clip.secs'" in out.stderr and "min_seconds" in out.stderr
    assert not (tmp_path / "wd").exists()


def _backdate_flow_runs(prefect_db: Path, days: int) -> set[str]:
    """Make every flow run of a Prefect database have ended `days` earlier; their ids."""
    with sqlite3.connect(prefect_db) as db:
        runs = db.execute("select id, end_time from flow_run").fetchall()
        for run_id, end in runs:
            then = datetime.strptime(end, "%Y-%m-%d %H:%M:%S.%f") - timedelta(days=days)
            db.execute("update flow_run set end_time = ? where id = ?", (then.strftime("%Y-%m-%d %H:%M:%S.%f"), run_id))
    return {run_id for run_id, _ in runs}


def test_run_to_clip_twice_second_is_cached(tmp_path, small_source):
    wd = tmp_path / "wd"
    # Its own Prefect database (ephemeral API), to check the history retention of `lvr run`.
    prefect = {"PREFECT_HOME": str(tmp_path / "prefect")}
    first = run_cli("run", "--source", str(small_source), "--workdir", str(wd), "--to", "clip", env=prefect)
    assert first.returncode == 0, first.stderr[-3000:]
    assert (wd / "clip" / "_manifest.json").exists()
    assert "pruned" not in first.stdout  # nothing is older than execution.history_retention_days (14)
    status = run_cli("status", str(wd))
    clip_line = next(ln for ln in status.stdout.splitlines() if ln.startswith("clip"))
    assert clip_line.split()[1:4] == ["done", str(len(pd.read_parquet(wd / "clip"))), "1"]
    assert next(ln for ln in status.stdout.splitlines() if ln.startswith("caption")).split()[1] == "missing"
    manifest_before = (wd / "clip" / "_manifest.json").read_text()

    # A month later: the runs ended 30 days ago, and so did the last prune (it is at most hourly).
    first_runs = _backdate_flow_runs(tmp_path / "prefect" / "prefect.db", days=30)
    stamp = tmp_path / "prefect" / "lvr-history-pruned"
    assert stamp.exists()  # the first run pruned (nothing was old enough to go)
    month_ago = stamp.stat().st_mtime - 30 * 86400
    os.utime(stamp, (month_ago, month_ago))
    second = run_cli("run", "--source", str(small_source), "--workdir", str(wd), "--to", "clip", env=prefect)
    assert second.returncode == 0, second.stderr[-3000:]
    assert (wd / "clip" / "_manifest.json").read_text() == manifest_before  # nothing was redone
    status = run_cli("status", str(wd))
    assert next(ln for ln in status.stdout.splitlines() if ln.startswith("clip")).split()[1] == "cached"
    # The first run's history (30 days old now) went with its task runs and logs; the second's stayed.
    assert f"pruned Prefect's run history: {len(first_runs)} flow runs" in second.stdout
    with sqlite3.connect(tmp_path / "prefect" / "prefect.db") as db:
        left = {row[0] for row in db.execute("select id from flow_run")}
        logged = {row[0] for row in db.execute("select distinct flow_run_id from log")}
    assert left and not left & first_runs and logged <= left


def test_from_caption_without_clip_fails_clearly(tmp_path, small_source):
    out = run_cli("run", "--source", str(small_source), "--workdir", str(tmp_path / "wd"), "--from", "qa", "--to", "qa", "--engine", "local")
    assert out.returncode != 0
    assert "stage 'qa' needs the output of 'caption'" in out.stderr and "--from caption" in out.stderr


def test_a_run_without_clip_does_not_write_the_built_in_sample(tmp_path):
    """Only clip reads the source: `--from qa` with none given used to render the whole sample
    (most of a minute of ffmpeg on 2 cores) into the cache before failing or running on."""
    cache = tmp_path / "cache"
    out = run_cli("run", "--workdir", str(tmp_path / "wd"), "--from", "qa", "--to", "qa", "--engine", "local",
                  env={"LVR_CACHE_DIR": str(cache)})
    assert out.returncode != 0 and "stage 'qa' needs the output of 'caption'" in out.stderr
    assert not (cache / SAMPLE_CACHE_SUBDIR).exists()


def test_full_run_end_to_end(tmp_path, small_source):
    """`lvr run` over the whole DAG on the tiny profile: every stage done, the report written."""
    from tasks.stages import STAGE_NAMES

    wd = tmp_path / "wd"
    # The tiny profile with fewer steps and samples, and SFT sequence-parallel (Ulysses, SP=2).
    cheaper = ["qa.questions_per_request=1", "filter.runs=4", "caption.max_new_tokens=16", "sft.max_steps=4", "sft.sp_degree=2",
               "grpo.steps=2", "grpo.group_size=4", "grpo.prompts_per_step=2", "grpo.max_new_tokens=16", "eval.max_new_tokens=16"]
    out = run_cli("run", "--source", str(small_source), "--workdir", str(wd), *[a for o in cheaper for a in ("--set", o)])
    assert out.returncode == 0, out.stderr[-3000:]
    assert all((wd / s / "_manifest.json").exists() for s in STAGE_NAMES)
    assert (wd / "report" / "index.html").exists() and len(pd.read_parquet(wd / "eval" / "_summary")) > 0
    # Each model against the one before it on the same questions, in the stage's report and the run's.
    for report in ("eval.md", "index.html"):
        text = (wd / "report" / report).read_text()
        assert "sft - base" in text and "grpo - sft" in text, report
    status = run_cli("status", str(wd)).stdout
    assert [ln.split()[1] for ln in status.splitlines() if ln.split() and ln.split()[0] in STAGE_NAMES] == ["done"] * 7


def test_models_build_tiny_then_loads_through_from_pretrained(tmp_path):
    out = run_cli("models", "build-tiny", "--out", str(tmp_path / "tiny"))
    assert out.returncode == 0, out.stderr[-2000:]
    folder = Path(out.stdout.strip().splitlines()[-1])
    assert folder == (tmp_path / "tiny").resolve() and (folder / "config.json").exists()
    again = run_cli("models", "build-tiny", "--out", str(tmp_path / "tiny"))  # already built: a no-op
    assert again.returncode == 0 and Path(again.stdout.strip().splitlines()[-1]) == folder
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(folder)
    assert model.config.text_config.hidden_size == 64 and model.config.vision_config.depth == 2


def test_synth_writes_a_complete_filter_stage(tmp_path):
    out = run_cli("synth", str(tmp_path / "wd"), "--videos", "5")
    assert out.returncode == 0, out.stderr[-2000:]
    table = pd.read_parquet(tmp_path / "wd" / "filter")
    assert len(table) == 15 and set(table["split"]) <= {"sft", "rl", "eval"}
    assert json.loads((tmp_path / "wd" / "filter" / "_manifest.json").read_text())["rows"] == 15
