"""SFT's inputs per step: every example's video decoded at every step versus through `FrameCache`.

    python benchmarks/sft_inputs.py [--steps 40] [--questions-per-video 11] [--set sft.fps=0.2 ...]

Builds the tiny profile's SFT examples on the built-in sample's videos (`--questions-per-video`
questions on each, as the sample's QA stage writes ~11), then, for `--steps` optimizer steps of the
real schedule (rank 0 of the profile's data-parallel size), makes each step's model inputs two ways,
interleaved step by step so both see the same load on a shared machine:

- direct: `example_inputs` reading every example's frames from its video (the trainer before the cache);
- decoded: through a `FrameCache` of decoded frames, resized for the model at every step (the trainer
  before the cache kept them resized);
- cached: through one `FrameCache` of `sft.frame_cache_mb` holding the frames resized for the model, as
  the trainer does now.

Checks that all three give equal tensors, then prints the time per step of each and the caches' hits
and bytes. The last line is machine-readable: `sft_inputs_speedup=X` (direct time / cached time).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from models.vlm import load_preprocess_config, resolve_model_ref  # noqa: E402
from tasks.config import load_config  # noqa: E402
from tasks.grading.prompts import user_prompt  # noqa: E402
from tasks.media.frames import FrameCache  # noqa: E402
from tasks.samples.videos import built_in_sample  # noqa: E402
from tasks.sft.data import SFTExample, encode_example, example_inputs  # noqa: E402
from tasks.training.schedule import TrainSchedule  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--questions-per-video", type=int, default=11)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override of the tiny profile")
    args = parser.parse_args()
    torch.set_num_threads(1)

    config = load_config("tiny", args.set)
    cfg = config.sft
    from transformers import AutoTokenizer

    model = resolve_model_ref(cfg.model)
    tokenizer, preprocess = AutoTokenizer.from_pretrained(model), load_preprocess_config(model)
    videos = sorted(built_in_sample().glob("*.mp4"))
    examples = [
        SFTExample(f"{video.stem}-{i}", str(video), user_prompt(f"What happens in moment {i}?", "open_ended", None),
                   "<think>Shot 2 shows it.</think><answer>a solid red screen</answer>")
        for video in videos for i in range(args.questions_per_video)
    ]
    dp_size = cfg.nproc_per_node // cfg.sp_degree
    schedule = TrainSchedule.plan(len(examples), cfg, dp_size)
    cache_bytes = cfg.frame_cache_mb * 2**20
    decoded, cache = FrameCache(cache_bytes), FrameCache(cache_bytes)
    sampling, video_budget = cfg.frame_sampling(), cfg.video_budget()
    ways = {
        "direct": lambda e: example_inputs(tokenizer, preprocess, e, cfg),
        "decoded": lambda e: encode_example(tokenizer, preprocess, e, decoded.read(e.video_uri, sampling), video_budget),
        "cached": lambda e: example_inputs(tokenizer, preprocess, e, cfg, cache),
    }
    seconds = dict.fromkeys(ways, 0.0)
    for step in range(args.steps):
        indices = [i for micro in schedule.micro_batches(step, 0) for i in micro]
        inputs = {}
        for way, make in ways.items():  # interleaved step by step: the same load on a shared machine
            started = time.perf_counter()
            inputs[way] = [make(examples[i]) for i in indices]
            seconds[way] += time.perf_counter() - started
        for way in ("decoded", "cached"):
            for a, b in zip(inputs["direct"], inputs[way]):
                assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), f"the {way} cache changed the inputs"

    per_step = len(indices)
    print(f"{len(examples)} examples on {len(videos)} videos, {cfg.video_inputs_text()}, {per_step} examples per step and rank")
    for way, total in seconds.items():
        print(f"{way:>7}: {1000 * total / args.steps:7.1f} ms per step")
    for way, held in (("decoded", decoded), ("cached", cache)):
        print(f"{way} cache: {held.hits} hits, {held.misses} decodes, {held.bytes / 2**20:.1f} MiB held")
    print(f"resized once instead of every step: {seconds['decoded'] / seconds['cached']:.2f}x")
    print(f"sft_inputs_speedup={seconds['direct'] / seconds['cached']:.2f}")


if __name__ == "__main__":
    main()
