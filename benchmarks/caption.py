"""Caption throughput with the tiny model on CPU, where the time goes, and decord versus PyAV.

    python benchmarks/caption.py [--clips 24] [--frames 16]

Prints clips/s of the `hf` captioner, the share of its time spent decoding and preprocessing
frames (versus the model), and the time to sample 16 frames per clip with decord and with PyAV.
The last line is machine-readable: `caption_clips_per_s=X preprocess_share=Y`.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from models.captioners import CaptionSettings, ClipRequest, HFCaptioner  # noqa: E402
from models.video import FrameSampling, read_frames  # noqa: E402
from tasks.clip.stage import ClipStage
from tasks.config import cache_dir, load_config
from tasks.engine.run import run_stage
from tasks.engine.stage import StageContext
from tasks.engine.store import Workdir
from tasks.samples.videos import write_sample_videos


def sample_clips(workdir: Path, limit: int) -> list[ClipRequest]:
    source = cache_dir() / "sample-videos"
    write_sample_videos(source)
    report = run_stage(ClipStage(), StageContext(Workdir(str(workdir)), load_config("tiny"), source=str(source)))
    import pandas as pd

    assert report.rows, "the sample produced no clips"
    clips = pd.read_parquet(workdir / "clip").sort_values("clip_id").head(limit)
    return [ClipRequest(row.clip_id, row.clip_uri) for row in clips.itertuples()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clips", type=int, default=24)
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=32)
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
        captioner = HFCaptioner(cfg.model, settings)
        captioner.caption(clips[: args.batch_size])  # warm-up: first-call allocations are not throughput
        captioner.timing.decode_s = 0.0
        captioner.timing.generation.preprocess_s = captioner.timing.generation.model_s = 0.0
        started = time.perf_counter()
        captioner.caption(clips)
        elapsed = time.perf_counter() - started

    t = captioner.timing
    prep = t.decode_s + t.generation.preprocess_s
    share = prep / (prep + t.generation.model_s)
    print(f"clips: {len(clips)} x {args.frames} frames, batch {args.batch_size}, {args.max_new_tokens} new tokens, tiny model on CPU")
    print(f"decode {t.decode_s:.2f}s  preprocess {t.generation.preprocess_s:.2f}s  model {t.generation.model_s:.2f}s  total {elapsed:.2f}s")
    print(f"16-frame sampling per clip: decord {decode['decord'] * 1000:.1f} ms, pyav {decode['pyav'] * 1000:.1f} ms "
          f"(pyav/decord = {decode['pyav'] / decode['decord']:.2f})")
    print(f"caption_clips_per_s={len(clips) / elapsed:.2f} preprocess_share={share:.3f}")


if __name__ == "__main__":
    main()
