"""Caption throughput with the tiny model on CPU, where the time goes, frames read in line versus
prefetched, and decord versus PyAV.

    python benchmarks/caption.py [--clips 24] [--frames 16] [--prefetch-workers 1] [--rounds 3]

Captions the clips with frames read in line (`prefetch_workers: 0`: decode and preprocess, then the
model, one after the other) and with frames read and resized by worker processes ahead of the model,
each `--rounds` times alternately (the best round counts: other load on the machine only slows one
down). The in-line rounds measure preprocessing (decoding + preprocessing) and model time per clip;
prefetching should bring throughput near 1 / max(preprocess, model) instead of 1 / (their sum).
The last line is machine-readable: `caption_clips_per_s=X preprocess_share=Y prefetched_clips_per_s=Z
caption_overlap_ratio=R`, R = prefetched throughput x max(preprocess, model) per clip (goal >= 0.9).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from models.captioners import CaptionSettings, ClipRequest, HFCaptioner  # noqa: E402
from models.video import FrameSampling, read_frames  # noqa: E402
from tasks.clip.stage import ClipStage
from tasks.config import load_config
from tasks.engine.run import run_stage
from tasks.engine.stage import StageContext
from tasks.engine.store import Workdir
from tasks.samples.videos import built_in_sample


def sample_clips(workdir: Path, limit: int) -> list[ClipRequest]:
    report = run_stage(ClipStage(), StageContext(Workdir(str(workdir)), load_config("tiny"), source=str(built_in_sample())))
    import pandas as pd

    assert report.rows, "the sample produced no clips"
    clips = pd.read_parquet(workdir / "clip").sort_values("clip_id").head(limit)
    return [ClipRequest(row.clip_id, row.clip_uri) for row in clips.itertuples()]


def timed_round(captioner: HFCaptioner, clips: list[ClipRequest]) -> tuple[float, float, float]:
    """(seconds, preprocess seconds, model seconds) of captioning `clips` once."""
    t = captioner.timing
    t.decode_s = t.generation.preprocess_s = t.generation.model_s = 0.0
    started = time.perf_counter()
    captioner.caption(clips)
    elapsed = time.perf_counter() - started
    return elapsed, t.decode_s + t.generation.preprocess_s, t.generation.model_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clips", type=int, default=24)
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--prefetch-workers", type=int, default=1)
    parser.add_argument("--prefetch-depth", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="lvr-bench-caption-") as tmp:
        clips = sample_clips(Path(tmp) / "wd", args.clips)

        decode = {}
        for backend in ("decord", "pyav"):
            started = time.perf_counter()
            for clip in clips:
                read_frames(clip.path, FrameSampling(num_frames=args.frames), backend=backend)
            decode[backend] = (time.perf_counter() - started) / len(clips)

        cfg = load_config("tiny").caption
        settings = CaptionSettings(
            prompt=cfg.prompt, sampling=FrameSampling(num_frames=args.frames), max_new_tokens=args.max_new_tokens, temperature=cfg.temperature,
            top_p=cfg.top_p, batch_size=args.batch_size, seed=cfg.seed,
        )
        in_line = HFCaptioner(cfg.model, settings)
        prefetched = HFCaptioner(
            cfg.model, dataclasses.replace(settings, prefetch_workers=args.prefetch_workers, prefetch_depth=args.prefetch_depth)
        )
        for captioner in (in_line, prefetched):  # warm-up: first-call allocations and the worker start are not throughput
            captioner.caption(clips[: args.batch_size])
        serial_rounds, prefetched_rounds = [], []
        for _ in range(args.rounds):
            serial_rounds.append(timed_round(in_line, clips))
            prefetched_rounds.append(timed_round(prefetched, clips))
        prefetched.close()

    n = len(clips)
    elapsed, prep, model = min(serial_rounds)
    pre_per_clip, model_per_clip = prep / n, model / n
    best = min(prefetched_rounds)
    serial_tput, prefetched_tput = n / elapsed, n / best[0]
    bound = 1 / max(pre_per_clip, model_per_clip)
    load = os.getloadavg()
    print(f"clips: {n} x {args.frames} frames, batch {args.batch_size}, {args.max_new_tokens} new tokens, tiny model on CPU "
          f"({os.cpu_count()} cores, load average {load[0]:.2f} {load[1]:.2f}), best of {args.rounds} rounds")
    print(f"per clip: preprocess (decode + preprocess) {pre_per_clip * 1000:.1f} ms  model {model_per_clip * 1000:.1f} ms")
    print(f"in line: {serial_tput:.2f} clips/s (rounds: {', '.join(f'{n / r[0]:.2f}' for r in serial_rounds)})")
    print(f"prefetched ({args.prefetch_workers} workers, depth {args.prefetch_depth}): {prefetched_tput:.2f} clips/s "
          f"(rounds: {', '.join(f'{n / r[0]:.2f}' for r in prefetched_rounds)}); 1 / max(preprocess, model) = {bound:.2f} clips/s")
    print(f"prefetched, per clip: waiting for frames + preprocessing left to the model's process {best[1] / n * 1000:.1f} ms  "
          f"model {best[2] / n * 1000:.1f} ms")
    print(f"16-frame sampling per clip: decord {decode['decord'] * 1000:.1f} ms, pyav {decode['pyav'] * 1000:.1f} ms "
          f"(pyav/decord = {decode['pyav'] / decode['decord']:.2f})")
    print(f"caption_clips_per_s={serial_tput:.2f} preprocess_share={prep / (prep + model):.3f} "
          f"prefetched_clips_per_s={prefetched_tput:.2f} caption_overlap_ratio={prefetched_tput / bound:.3f}")


if __name__ == "__main__":
    main()
