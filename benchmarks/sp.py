"""Memory and speed of multi-modal sequence parallelism (MM-SP) for one long training sample.

    python benchmarks/sp.py [--frames 256] [--size 224]          # CPU: SP=1 vs SP=2 on gloo, tiny model
    python benchmarks/sp.py --gpu [--gpu-frames 64,128,256,512]  # plus a 7B-shaped model on one GPU

CPU: one forward and backward pass of the tiny Qwen2.5-VL over a `--frames`-frame video (random
pixels, `--size` square frames) and an assistant answer, as one process (SP=1) and as two gloo
processes (SP=2), after one warm-up pass. Reported per rank: the peak resident memory the measured
pass adds on top of what the process held before it (model, gradients, batch): activations and
temporaries. The goal of MM-SP is that each SP=2 rank needs about half of what SP=1 needs.

GPU (`--gpu`, needs CUDA): a random-weight model with Qwen2.5-VL-7B's shapes in bf16 with
gradient checkpointing, SP=1 on one GPU (no optimizer state): tokens/s of a forward and backward
pass and peak allocated memory for each frame count, frames at Qwen's default video resolution.

The last line is machine-readable: `sp2_vs_sp1_peak_mem=X` (max over SP=2 ranks / SP=1).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from models.video import SampledFrames, VideoPreprocessConfig  # noqa: E402
from tasks.grading.prompts import user_prompt
from tasks.sft.data import SFTExample, collate, encode_example

TARGET = "<think>" + " ".join(["First I look at the frames in order."] * 8) + "</think><answer>B</answer>"


def synthetic_batch(tokenizer, preprocess: VideoPreprocessConfig, frames: int, size: int) -> dict[str, torch.Tensor]:
    """One SFT sample about a video of `frames` random `size` x `size` frames at 1 fps."""
    pixels = np.random.default_rng(0).integers(0, 256, (frames, size, size, 3), dtype=np.uint8)
    video = SampledFrames(pixels, [float(i) for i in range(frames)], list(range(frames)), 1.0, "synthetic", 1.0, (0.0, float(frames)), frames)
    example = SFTExample("bench", "synthetic", user_prompt("What happens first?", "multiple_choice", ["a", "b", "c", "d"]), TARGET)
    return collate([encode_example(tokenizer, preprocess, example, video)], tokenizer.pad_token_id)


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def train_pass(module, batch: dict[str, torch.Tensor], sp) -> tuple[float, int]:
    """Forward and backward of the sample's token-mean loss. Returns this rank's seconds and the
    bytes of the tensors autograd saved for backward (activations, parameters excluded)."""
    from parallel.loss import count_sum, cross_entropy_sum
    from parallel.sequence import IGNORE_INDEX, shift_labels

    tokens = count_sum(torch.tensor(float((shift_labels(batch["labels"]) != IGNORE_INDEX).sum()) if sp.rank == 0 else 0.0))
    params = {p.data_ptr() for p in module.parameters()}
    saved: dict[tuple[int, tuple[int, ...]], int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.data_ptr() not in params:  # a tensor saved by several ops counts once
            saved[(t.data_ptr(), tuple(t.shape))] = t.numel() * t.element_size()
        return t

    started = time.perf_counter()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        shard = module(**batch)
        loss_sum, _ = cross_entropy_sum(shard.logits, shard.targets)
    (loss_sum / tokens.to(loss_sum.dtype)).backward()
    return time.perf_counter() - started, sum(saved.values())


def _cpu_rank(model_dir: str, batch: dict[str, torch.Tensor], sp_degree: int) -> dict[str, float]:
    from transformers import AutoModelForImageTextToText

    from models.positions import use_trained_positions
    from models.qwen_sp import SPQwen2_5_VL
    from parallel.topology import init_topology

    sp = init_topology(sp_degree).sp
    model = use_trained_positions(AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32))
    module = SPQwen2_5_VL(model, sp).train()
    # A first pass allocates the gradients and whatever kernels set up once; the measured pass
    # then adds activations and temporaries only.
    train_pass(module, batch, sp)
    module.zero_grad(set_to_none=False)
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM) to the current RSS
    before = _status_kb("VmRSS")
    seconds, saved = train_pass(module, batch, sp)
    return {"peak_mb": (_status_kb("VmHWM") - before) / 1024, "saved_mb": saved / 2**20, "seconds": seconds}


def cpu_comparison(frames: int, size: int) -> float:
    from transformers import AutoTokenizer

    from models.tiny import ensure_tiny_model
    from models.vlm import load_preprocess_config
    from parallel.local import run_local

    # Tensors of 64 KiB and more get their own mappings, returned to the system when freed, so
    # the resident size follows live memory instead of what glibc keeps cached (ranks inherit it).
    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", str(64 * 1024))
    model_dir = str(ensure_tiny_model())
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    batch = synthetic_batch(tokenizer, load_preprocess_config(model_dir), frames, size)
    length = batch["input_ids"].shape[1]
    print(f"CPU, tiny Qwen2.5-VL: {frames} frames of {size}x{size} -> {length} tokens "
          f"({int(batch['video_grid_thw'].prod()) // 4} video), {int(batch['pixel_values_videos'].shape[0])} vision patches")
    print(f"{'SP':>3} {'rank':>4} {'peak MB':>9} {'saved MB':>9} {'step s':>7}")
    peaks, saved = {}, {}
    for sp in (1, 2):
        ranks = run_local(_cpu_rank, sp, model_dir, batch, sp)
        for rank, r in enumerate(ranks):
            print(f"{sp:>3} {rank:>4} {r['peak_mb']:>9.1f} {r['saved_mb']:>9.1f} {r['seconds']:>7.2f}")
        peaks[sp] = max(r["peak_mb"] for r in ranks)
        saved[sp] = max(r["saved_mb"] for r in ranks)
    print("peak MB: resident memory the pass added; saved MB: activations autograd kept for backward")
    print(f"sp2_vs_sp1_saved_activations={saved[2] / saved[1]:.3f}")
    return peaks[2] / peaks[1]


def qwen25_vl_7b_config(tokenizer):
    """Qwen2.5-VL-7B-Instruct's architecture (its config.json), with this tokenizer's special ids."""
    from transformers import Qwen2_5_VLConfig

    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>")}
    return Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
            num_key_value_heads=4, max_position_embeddings=128000, rms_norm_eps=1e-6,
            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]},
        ),
        vision_config=dict(
            depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, in_channels=3, patch_size=14,
            spatial_merge_size=2, temporal_patch_size=2, tokens_per_second=2, window_size=112, out_hidden_size=3584,
            fullatt_block_indexes=[7, 15, 23, 31],
        ),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
    )


def gpu_sweep(frame_counts: list[int]) -> None:
    from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration

    from models.positions import use_trained_positions
    from models.qwen_sp import SPQwen2_5_VL
    from models.tiny import ensure_tiny_model
    from parallel.topology import SPGroup

    tokenizer = AutoTokenizer.from_pretrained(ensure_tiny_model())
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = use_trained_positions(Qwen2_5_VLForConditionalGeneration(qwen25_vl_7b_config(tokenizer)).to(torch.bfloat16))
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    module = SPQwen2_5_VL(model, SPGroup.single()).train()
    params_gb = sum(p.numel() for p in model.parameters()) * 2 / 2**30
    print(f"\nGPU {torch.cuda.get_device_name()}: 7B-shaped Qwen2.5-VL, bf16, {params_gb:.1f} GiB of weights, "
          "gradient checkpointing, SP=1, forward + backward (no optimizer state)")
    print(f"{'frames':>6} {'tokens':>7} {'step s':>7} {'tokens/s':>9} {'peak GiB':>9}")
    preprocess = VideoPreprocessConfig()  # Qwen's defaults: 336x336 frames -> 144 tokens per 2 frames
    for frames in frame_counts:
        batch = {k: v.cuda() for k, v in synthetic_batch(tokenizer, preprocess, frames, 336).items()}
        length = batch["input_ids"].shape[1]
        try:
            train_pass(module, batch, SPGroup.single())  # warm-up: kernels, allocator
            model.zero_grad(set_to_none=True)
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            started = time.perf_counter()
            train_pass(module, batch, SPGroup.single())
            torch.cuda.synchronize()
            seconds = time.perf_counter() - started
            peak = torch.cuda.max_memory_allocated() / 2**30
            print(f"{frames:>6} {length:>7} {seconds:>7.2f} {length / seconds:>9.0f} {peak:>9.1f}")
        except torch.OutOfMemoryError:
            print(f"{frames:>6} {length:>7} out of memory")
        model.zero_grad(set_to_none=True)
        del batch
        torch.cuda.empty_cache()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, default=256)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--gpu", action="store_true", help="also run the 7B-shaped sweep on one CUDA GPU")
    parser.add_argument("--gpu-frames", default="64,128,256,512")
    args = parser.parse_args()
    ratio = cpu_comparison(args.frames, args.size)
    if args.gpu:
        if not torch.cuda.is_available():
            raise SystemExit("--gpu needs CUDA")
        gpu_sweep([int(f) for f in args.gpu_frames.split(",")])
    print(f"sp2_vs_sp1_peak_mem={ratio:.3f}")


if __name__ == "__main__":
    main()
