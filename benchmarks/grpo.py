"""GRPO step time with and without MR-SP's reuse of video embeddings.

    python benchmarks/grpo.py [--frames 16,64] [--group-size 8] [--prompts 2]   # tiny model on CPU
    python benchmarks/grpo.py --gpu [--gpu-frames 64,128,256,512]              # plus a 7B-shaped model on one GPU

One step = every pass of a GRPO step with `updates_per_step: 2` (the setting in which all of them
exist) on `--prompts` questions about different videos, G rollouts each: the rollouts, the
old-policy log-probs, the reference log-probs and two policy updates (forward, backward, AdamW),
with the trainer's own functions (`tasks.grpo`). Three ways to feed the video:

- `pixels`: every pass takes pixels, as verl, TRL, OpenRLHF, EasyR1 and Video-R1 do: the vision
  tower encodes each video once per sequence per pass (generation expands the pixels per sample);
- `mr-sp`: MR-SP stage 1, the tower runs once per video per step and every pass reuses it;
- `disk`: the embeddings come from the warm on-disk cache (frozen tower): no tower call at all.

The same seed gives the same rollouts in every mode, so the text work is identical; each mode is
timed over `--repeats` steps after a warm-up step (the minimum is reported: the machine is
shared). The GPU sweep uses a random-weight model with Qwen2.5-VL-7B's shapes in bf16 with
gradient checkpointing and plain SGD (no optimizer state), micro-batches of one sequence.

The last line is machine-readable: `grpo_cache_speedup_64f=X` (pixels / mr-sp step time at 64 frames).
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

from models.video import SampledFrames, VideoPreprocessConfig, build_video_inputs  # noqa: E402
from models.vlm import video_messages  # noqa: E402
from parallel.embedding_cache import (
    EmbeddingCache,
    VideoRequest,
    encode_requests,
    vision_tower,
)
from parallel.topology import SPGroup  # noqa: E402
from tasks.grading.prompts import user_prompt
from tasks.grpo import core_algos  # noqa: E402
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


def random_video(frames: int, size: int, seed: int) -> SampledFrames:
    pixels = np.random.default_rng(seed).integers(0, 256, (frames, size, size, 3), dtype=np.uint8)
    return SampledFrames(pixels, [float(i) for i in range(frames)], list(range(frames)), 1.0, "synthetic", 1.0, (0.0, float(frames)), frames)


def requests_for(frames: int, size: int, prompts: int) -> list[VideoRequest]:
    question = user_prompt("Which colour is shown first?", "multiple_choice", ["red", "green", "blue", "yellow"])
    return [VideoRequest(video_messages(question), random_video(frames, size, i), f"bench-{frames}-{size}-{i}") for i in range(prompts)]


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def grpo_step(m: Models, requests: list[VideoRequest], mode: str, group_size: int, max_new_tokens: int, cache: EmbeddingCache | None) -> float:
    """One step's passes; returns its seconds."""
    synchronize()
    started = time.perf_counter()
    messages = [r.messages for r in requests]
    if mode == "pixels":
        inputs = {k: v.to(m.policy.device) for k, v in build_video_inputs(m.tokenizer, messages, [r.frames for r in requests], m.preprocess).items()}
        torch.manual_seed(0)
        with torch.inference_mode():
            output = m.policy.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=True, num_return_sequences=group_size,
                                       pad_token_id=m.tokenizer.pad_token_id)
        stops = stop_token_ids(m.policy, m.tokenizer)
        new = output[:, inputs["input_ids"].shape[1] :].tolist()
        responses = [make_rollout(row, stops, m.tokenizer).token_ids for row in new]
    else:
        batch, _ = encode_requests(m.policy, m.tokenizer, m.preprocess, requests, SINGLE, cache if mode == "disk" else None)
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
    return time.perf_counter() - started


def sweep(m: Models, frame_counts: list[int], size: int, args: argparse.Namespace, cache_root: Path) -> dict[int, dict[str, float]]:
    cache = EmbeddingCache(cache_root, m.policy, m.preprocess)
    print(f"{'frames':>6} {'mode':>7} {'step s':>8} {'tower calls':>12}")
    results: dict[int, dict[str, float]] = {}
    for frames in frame_counts:
        requests = requests_for(frames, size, args.prompts)
        encode_requests(m.policy, m.tokenizer, m.preprocess, requests, SINGLE, cache)  # warms the disk cache
        results[frames] = {}
        for mode in MODES:
            grpo_step(m, requests, mode, args.group_size, args.max_new_tokens, cache)  # warm-up
            times, calls = [], m.tower_calls
            for _ in range(args.repeats):
                times.append(grpo_step(m, requests, mode, args.group_size, args.max_new_tokens, cache))
            results[frames][mode] = min(times)
            print(f"{frames:>6} {mode:>7} {min(times):>8.2f} {(m.tower_calls - calls) / args.repeats:>12.0f}", flush=True)
        print(f"{frames:>6} speedup: mr-sp {results[frames]['pixels'] / results[frames]['mr-sp']:.2f}x, "
              f"disk {results[frames]['pixels'] / results[frames]['disk']:.2f}x over pixels")
    return results


def tiny_models() -> Models:
    from transformers import AutoModelForImageTextToText, AutoTokenizer

    from models.tiny import ensure_tiny_model
    from models.vlm import load_preprocess_config

    path = ensure_tiny_model()
    policy = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32)
    reference = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32).requires_grad_(False)
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
    print(f"grpo_cache_speedup_{key}f={results[key]['pixels'] / results[key]['mr-sp']:.2f}")


if __name__ == "__main__":
    main()
