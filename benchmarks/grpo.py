"""GRPO step time with and without MR-SP's reuse of video embeddings.

    python benchmarks/grpo.py [--frames 16,64] [--group-size 8] [--prompts 2]   # tiny model on CPU
    python benchmarks/grpo.py --gpu [--gpu-frames 64,128,256,512]              # plus a 7B-shaped model on one GPU

One step = every pass of a GRPO step with `updates_per_step: 2` (the setting in which all of them
exist) on `--prompts` questions about different videos, G rollouts each: the rollouts, the
old-policy log-probs, the reference log-probs and two policy updates (forward, backward, AdamW),
with the trainer's own functions (`tasks.grpo`). Each question's video is an H.264 file of random
frames, read every step as the trainer reads it (`tasks.grpo.data.video_requests`). Three ways to
feed the video:

- `pixels`: every pass takes pixels, as verl, TRL, OpenRLHF, EasyR1 and Video-R1 do: the vision
  tower encodes each video once per sequence per pass (generation expands the pixels per sample);
- `mr-sp`: MR-SP stage 1, the tower runs once per video per step and every pass reuses it;
- `disk`: the embeddings come from the warm on-disk cache (frozen tower): no tower call and, since
  the cache is looked up before any frame is read, no video decode either (the `decodes` column).

The same seed gives the same rollouts in every mode, so the text work is identical; each mode is
timed over `--repeats` steps after a warm-up step (the minimum is reported: the machine is
shared). The GPU sweep uses a random-weight model with Qwen2.5-VL-7B's shapes in bf16 with
gradient checkpointing and plain SGD (no optimizer state), micro-batches of one sequence.

The last lines are machine-readable, at 64 frames: `grpo_disk_speedup_64f=X` (mr-sp / disk step time:
a cached step against an uncached one), `grpo_disk_video_speedup_64f=X` (the same for the step's video
inputs alone: the `video s` column), `grpo_disk_decodes_64f=N` (video decodes per cached step) and,
last, `grpo_cache_speedup_64f=X` (pixels / mr-sp step time).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import tasks.grpo.data as grpo_data  # noqa: E402
from models.qwen_sp import generation_attention  # noqa: E402
from models.video import SampledFrames, VideoPreprocessConfig, build_video_inputs  # noqa: E402
from parallel.embedding_cache import (
    EmbeddingCache,
    VideoRequest,
    encode_requests,
    vision_tower,
)
from parallel.topology import SPGroup  # noqa: E402
from tasks.config import VideoInputs  # noqa: E402
from tasks.grading.prompts import user_prompt  # noqa: E402
from tasks.grpo import core_algos  # noqa: E402
from tasks.grpo.data import RLExample, video_requests  # noqa: E402
from tasks.grpo.prefill import PolicyBatch, pack_sequences, response_logprobs  # noqa: E402
from tasks.grpo.rollout import HFRolloutEngine, make_rollout, stop_token_ids  # noqa: E402

MODES = ("pixels", "mr-sp", "disk")
SINGLE = SPGroup.single()
UPDATES = 2


@dataclass
class Models:
    policy: torch.nn.Module
    reference: torch.nn.Module
    tokenizer: Any
    preprocess: VideoPreprocessConfig
    optimizer: torch.optim.Optimizer
    micro_batch: int
    tower_calls: int = 0

    def __post_init__(self) -> None:
        vision_tower(self.policy).register_forward_hook(self._count)
        vision_tower(self.reference).register_forward_hook(self._count)

    def _count(self, *_: Any) -> None:
        self.tower_calls += 1


class Decodes:
    """Counts the videos read through the trainer's data path (`tasks.grpo.data.read_video_frames`)."""

    count = 0

    def __init__(self) -> None:
        self.read = grpo_data.read_video_frames
        grpo_data.read_video_frames = self

    def __call__(self, *args: Any, **kwargs: Any) -> SampledFrames:
        Decodes.count += 1
        return self.read(*args, **kwargs)


def write_random_video(path: Path, frames: int, size: int, seed: int) -> None:
    """`frames` frames of uniform noise at 8 fps, H.264."""
    import av

    rng = np.random.default_rng(seed)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=8, options={"crf": "23", "preset": "ultrafast", "threads": "1"})
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        for _ in range(frames):
            pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")))
        container.mux(stream.encode())


def examples_for(frames: int, size: int, prompts: int, folder: Path) -> list[RLExample]:
    """One question about each of `prompts` videos of `frames` frames."""
    question = user_prompt("Which colour is shown first?", "multiple_choice", ["red", "green", "blue", "yellow"])
    examples = []
    for i in range(prompts):
        path = folder / f"bench-{frames}-{size}-{i}.mp4"
        write_random_video(path, frames, size, seed=i)
        examples.append(RLExample(f"q{i}", f"bench-{frames}-{size}-{i}", str(path), "multiple_choice", "Which colour is shown first?",
                                  ("red", "green", "blue", "yellow"), "A", question))
    return examples


def frames_of(request: VideoRequest) -> SampledFrames:
    return request.frames() if callable(request.frames) else request.frames


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def grpo_step(
    m: Models, examples: list[RLExample], video: VideoInputs, mode: str, group_size: int, max_new_tokens: int, cache: EmbeddingCache | None
) -> tuple[float, float]:
    """One step's passes, from reading the videos on; returns its seconds and those of its video
    inputs (reading, preprocessing and the tower or the cache, until the first pass can start)."""
    synchronize()
    started = time.perf_counter()
    requests = video_requests(examples, video)
    messages = [r.messages for r in requests]
    if mode == "pixels":
        requests = [VideoRequest(r.messages, frames_of(r), r.video_key) for r in requests]
        inputs = {k: v.to(m.policy.device) for k, v in build_video_inputs(m.tokenizer, messages, [r.frames for r in requests], m.preprocess).items()}
        torch.manual_seed(0)
        with torch.inference_mode(), generation_attention(m.policy):
            output = m.policy.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=True, num_return_sequences=group_size,
                                       pad_token_id=m.tokenizer.pad_token_id)
        stops = stop_token_ids(m.policy, m.tokenizer)
        new = output[:, inputs["input_ids"].shape[1] :].tolist()
        responses = [make_rollout(row, stops, m.tokenizer).token_ids for row in new]
        encoded_s = 0.0  # the pixels go into every pass; see `tower calls`
    else:
        batch, _ = encode_requests(m.policy, m.tokenizer, m.preprocess, requests, SINGLE, cache if mode == "disk" else None)
        synchronize()
        encoded_s = time.perf_counter() - started
        engine = HFRolloutEngine(m.policy, m.tokenizer, max_new_tokens, temperature=1.0, top_p=1.0)
        responses = [r.token_ids for group in engine.generate(batch, messages, group_size, seed=0) for r in group]
    prompt_of = [i for i in range(len(requests)) for _ in range(group_size)]

    def sequences() -> PolicyBatch:
        """What one pass is fed: re-encoded for every sequence (pixels) or the step's embeddings."""
        if mode == "pixels":
            per_sequence = [VideoRequest(requests[p].messages, requests[p].frames, f"row-{row}") for row, p in enumerate(prompt_of)]
            encoded, _ = encode_requests(m.policy, m.tokenizer, m.preprocess, per_sequence, SINGLE)
            return pack_sequences(encoded, list(range(len(prompt_of))), responses, m.tokenizer.pad_token_id)
        return pack_sequences(batch, prompt_of, responses, m.tokenizer.pad_token_id)

    rewards = torch.rand(len(requests), group_size, generator=torch.Generator().manual_seed(0))
    advantages = core_algos.group_advantages(rewards).flatten()
    micro = [list(range(i, min(i + m.micro_batch, len(prompt_of)))) for i in range(0, len(prompt_of), m.micro_batch)]
    with torch.no_grad():
        seqs = sequences()
        old = [response_logprobs(m.policy, seqs.select(rows), SINGLE)[0] for rows in micro]
        seqs = sequences()
        ref = [response_logprobs(m.reference, seqs.select(rows), SINGLE)[0] for rows in micro]
    for _ in range(UPDATES):
        seqs = sequences()
        n_tokens = float((seqs.targets() != -100).sum())
        for k, rows in enumerate(micro):
            sub = seqs.select(rows)
            logp, scored = response_logprobs(m.policy, sub, SINGLE)
            mask = sub.targets() != -100
            adv = advantages[rows].to(logp.device)[:, None].expand(mask.shape)[mask]
            terms = core_algos.grpo_token_loss(logp, old[k], ref[k], adv, beta=0.04, eps_low=0.2, eps_high=0.28)
            (core_algos.token_weights(mask, "token_mean", n_tokens=n_tokens).to(logp.device)[mask] * terms.loss).sum().backward()
        m.optimizer.step()
        m.optimizer.zero_grad(set_to_none=True)
    synchronize()
    return time.perf_counter() - started, encoded_s


def sweep(m: Models, frame_counts: list[int], size: int, args: argparse.Namespace, cache_root: Path) -> dict[int, dict[str, float]]:
    cache = EmbeddingCache(cache_root, m.policy, m.preprocess)
    print(f"{'frames':>6} {'mode':>7} {'step s':>8} {'video s':>8} {'tower calls':>12} {'decodes':>8}")
    results: dict[int, dict[str, float]] = {}
    for frames in frame_counts:
        video = VideoInputs(num_frames=frames)
        (cache_root / "videos").mkdir(parents=True, exist_ok=True)
        examples = examples_for(frames, size, args.prompts, cache_root / "videos")
        encode_requests(m.policy, m.tokenizer, m.preprocess, video_requests(examples, video), SINGLE, cache)  # warms the disk cache
        results[frames] = {}
        for mode in MODES:
            grpo_step(m, examples, video, mode, args.group_size, args.max_new_tokens, cache)  # warm-up
            times, calls, decodes = [], m.tower_calls, Decodes.count
            for _ in range(args.repeats):
                times.append(grpo_step(m, examples, video, mode, args.group_size, args.max_new_tokens, cache))
            r = results[frames]
            r[mode], r[f"{mode}_video"] = min(t for t, _ in times), min(v for _, v in times)
            r[f"{mode}_decodes"] = (Decodes.count - decodes) / args.repeats
            print(f"{frames:>6} {mode:>7} {r[mode]:>8.2f} {r[f'{mode}_video']:>8.3f} {(m.tower_calls - calls) / args.repeats:>12.0f} "
                  f"{r[f'{mode}_decodes']:>8.0f}", flush=True)
        r = results[frames]
        print(f"{frames:>6} speedup: mr-sp {r['pixels'] / r['mr-sp']:.2f}x, disk {r['pixels'] / r['disk']:.2f}x over pixels; "
              f"cached vs uncached (disk vs mr-sp): step {r['mr-sp'] / r['disk']:.2f}x, video inputs {r['mr-sp_video'] / r['disk_video']:.2f}x")
    return results


def tiny_models() -> Models:
    from transformers import AutoModelForImageTextToText, AutoTokenizer

    from models.positions import use_trained_positions
    from models.tiny import ensure_tiny_model
    from models.vlm import load_preprocess_config

    path = ensure_tiny_model()
    policy = use_trained_positions(AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32))
    reference = use_trained_positions(AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32)).requires_grad_(False)
    vision_tower(policy).requires_grad_(False)
    optimizer = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=1e-5)
    return Models(policy, reference, AutoTokenizer.from_pretrained(path), load_preprocess_config(path), optimizer, micro_batch=8)


def gpu_models() -> Models:
    from sp import qwen25_vl_7b_config  # benchmarks/sp.py
    from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration

    from models.tiny import ensure_tiny_model

    tokenizer = AutoTokenizer.from_pretrained(ensure_tiny_model())
    config = qwen25_vl_7b_config(tokenizer)
    torch.manual_seed(0)
    with torch.device("cuda"):
        policy = Qwen2_5_VLForConditionalGeneration(config).to(torch.bfloat16)
        reference = Qwen2_5_VLForConditionalGeneration(config).to(torch.bfloat16).requires_grad_(False)
    policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    vision_tower(policy).requires_grad_(False)
    optimizer = torch.optim.SGD([p for p in policy.parameters() if p.requires_grad], lr=1e-6)
    return Models(policy, reference, tokenizer, VideoPreprocessConfig(), optimizer, micro_batch=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", default="16,64")
    parser.add_argument("--size", type=int, default=224, help="frame side in pixels (CPU sweep)")
    parser.add_argument("--prompts", type=int, default=2)
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--gpu", action="store_true", help="also run the 7B-shaped sweep on one CUDA GPU")
    parser.add_argument("--gpu-frames", default="64,128,256,512")
    args = parser.parse_args()
    frame_counts = [int(f) for f in args.frames.split(",")]
    Decodes()

    with tempfile.TemporaryDirectory(prefix="lvr-bench-grpo-") as tmp:
        print(f"CPU, tiny Qwen2.5-VL: {args.prompts} prompts x G={args.group_size}, {args.max_new_tokens} new tokens, "
              f"{args.size}x{args.size} frames; rollouts + old + reference + {UPDATES} updates per step")
        results = sweep(tiny_models(), frame_counts, args.size, args, Path(tmp) / "cpu")
        if args.gpu:
            if not torch.cuda.is_available():
                raise SystemExit("--gpu needs CUDA")
            print(f"\nGPU {torch.cuda.get_device_name()}: 7B-shaped Qwen2.5-VL, random weights, bf16, 336x336 frames")
            gpu = sweep(gpu_models(), [int(f) for f in args.gpu_frames.split(",")], 336, args, Path(tmp) / "gpu")
            last = max(gpu)
            print(f"grpo_cache_speedup_gpu_{last}f={gpu[last]['pixels'] / gpu[last]['mr-sp']:.2f}")
    key = 64 if 64 in results else max(results)
    print(f"grpo_disk_speedup_{key}f={results[key]['mr-sp'] / results[key]['disk']:.2f}")
    print(f"grpo_disk_video_speedup_{key}f={results[key]['mr-sp_video'] / results[key]['disk_video']:.2f}")
    print(f"grpo_disk_decodes_{key}f={results[key]['disk_decodes']:.0f}")
    print(f"grpo_cache_speedup_{key}f={results[key]['pixels'] / results[key]['mr-sp']:.2f}")


if __name__ == "__main__":
    main()
