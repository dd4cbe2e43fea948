"""Orchestration overhead at scale and the cost of a refresh (issue #18).

For each N: N synthetic 25-second videos, `lvr run --to qa` on the tiny profile (Prefect by default,
ephemeral API), then the same command again (fully cached), then again after adding 5 videos that
sort between the old ones. Overhead is (wall - stage work) / stage work, where work is the sum of
the stages' `work_time_s` (their shards' own processing plus publishing) and wall is the whole
command (interpreter, Prefect start-up and all). The work of the 5 videos alone is measured by a
run on just them with `--engine local`. Goals: overhead <= 5 % at N=600; the refresh within the
fixed start-up (the cached rerun) + 3x the work of the 5 videos. The last lines are machine-readable:

    scale_overhead_<N>=<ratio>
    stage_overhead_<N>=<ratio>      (the stages' own wall against their work: start-up left out)
    cached_rerun_<N>_s=<wall>
    refresh_5_of_<N>_s=<wall> work_5_videos_s=<work> refresh_goal_s=<cached + 3 x work>

    python benchmarks/scale.py [--sizes 150,600] [--engine prefect|local] [--keep DIR]

The videos are one ffmpeg-made video remuxed N times with a different comment (distinct bytes,
hence distinct video ids, in milliseconds each). Expect minutes per 100 videos on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.support.videos import make_video

STAGES = ("clip", "caption", "qa")


def remux(base: Path, out: Path, tag: str) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        ["ffmpeg", "-nostdin", "-y", "-loglevel", "error", "-i", str(base), "-c", "copy", "-metadata", f"comment={tag}", str(out)],
        check=True,
    )


def make_source(base: Path, directory: Path, names: list[str]) -> None:
    for name in names:
        if not (directory / name).exists():
            remux(base, directory / name, name)


def lvr_run(source: Path, workdir: Path, engine: str, log: Path) -> float:
    argv = [sys.executable, "-m", "flows.cli", "run", "--source", str(source), "--workdir", str(workdir), "--to", "qa", "--engine", engine]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    started = time.perf_counter()
    with log.open("ab") as fh:
        done = subprocess.run(argv, cwd=ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT, check=False)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        sys.exit(f"lvr run failed ({done.returncode}); see {log}")
    return wall


def stage_work(workdir: Path, since: float) -> tuple[float, dict[str, dict]]:
    """Work of the stages this run did (a stage left cached keeps its older manifest: not counted)."""
    total, per_stage = 0.0, {}
    for stage in STAGES:
        manifest = json.loads((workdir / stage / "_manifest.json").read_text())
        if (workdir / stage / "_manifest.json").stat().st_mtime >= since:
            total += manifest["work_time_s"]
            per_stage[stage] = {k: manifest[k] for k in ("work_time_s", "wall_time_s", "shards", "items_computed")}
    return total, per_stage


def loadavg() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def bench(n: int, base: Path, scratch: Path, engine: str) -> list[str]:
    log = scratch / f"run-{n}.log"
    names = [f"v{i:05d}0.mp4" for i in range(n)]
    added = [f"v{i:05d}5.mp4" for i in range(0, n, max(1, n // 5))][:5]  # sort between the old videos
    src, wd = scratch / f"src-{n}", scratch / f"wd-{n}"
    make_source(base, src, names)

    since = time.time()
    wall = lvr_run(src, wd, engine, log)
    work, detail = stage_work(wd, since)
    stages_wall = sum(d["wall_time_s"] for d in detail.values())
    print(f"N={n} first run: wall {wall:.1f} s, work {work:.1f} s {detail} (load {loadavg()})", flush=True)

    cached = lvr_run(src, wd, engine, log)
    print(f"N={n} cached rerun: wall {cached:.1f} s (load {loadavg()})", flush=True)

    make_source(base, src, added)
    since = time.time()
    refresh = lvr_run(src, wd, engine, log)
    refresh_work, refresh_detail = stage_work(wd, since)
    print(f"N={n} refresh +5: wall {refresh:.1f} s, stage work {refresh_work:.1f} s {refresh_detail} (load {loadavg()})", flush=True)

    only5, wd5 = scratch / f"src-5-of-{n}", scratch / f"wd-5-of-{n}"
    make_source(base, only5, added)
    since = time.time()
    lvr_run(only5, wd5, "local", log)
    work5, _ = stage_work(wd5, since)
    return [
        f"scale_overhead_{n}={(wall - work) / work:.3f}",
        # The same inside the stages (their wall against their work): without interpreter and API start-up.
        f"stage_overhead_{n}={(stages_wall - work) / work:.3f}",
        f"cached_rerun_{n}_s={cached:.2f}",
        f"refresh_5_of_{n}_s={refresh:.2f} work_5_videos_s={work5:.2f} refresh_goal_s={cached + 3 * work5:.2f}",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="150,600", help="comma-separated video counts (default: 150,600)")
    parser.add_argument("--engine", choices=("prefect", "local"), default="prefect")
    parser.add_argument("--seconds", type=float, default=25.0, help="length of each synthetic video")
    parser.add_argument("--keep", default=None, help="scratch folder to use and keep (default: a temporary one)")
    args = parser.parse_args()
    scratch = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="lvr-scale-"))
    scratch.mkdir(parents=True, exist_ok=True)
    base = scratch / "base.mp4"
    if not base.exists():
        make_video(base, args.seconds, fps=25, gop=25, size="160x120")
    lines = []
    try:
        for n in (int(s) for s in args.sizes.split(",")):
            lines += bench(n, base, scratch, args.engine)
    finally:
        if not args.keep:
            shutil.rmtree(scratch, ignore_errors=True)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
