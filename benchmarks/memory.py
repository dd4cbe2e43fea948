"""The per-GPU memory estimate of `lvr check` (`tasks.preflight.memory`) against a measured peak on a GPU.

    python benchmarks/memory.py [--model Qwen/Qwen2.5-VL-7B-Instruct] [--layers 4] [--seq-len 16384] [--scored 1024]

Builds a random-weight Qwen2.5-VL whose text model has the shipped architecture's shapes (hidden size,
heads, KV heads, intermediate size, vocabulary, mRoPE sections; `--layers` decoder layers, fewer than the
real 28 to leave room for long sequences) and a one-block vision tower it never runs, in bf16 on the GPU.
Then, without and with gradient checkpointing, one forward and backward pass of our training path
(`models.qwen_sp.sp_forward` with Ulysses attention at SP 1, the summed cross-entropy of `parallel.loss` on
the last `--scored` positions), and compares `torch.cuda.max_memory_allocated` over the pass with the
estimate for the same model and shape: weights, gradients and the forward/backward activations (no
optimizer here: DeepSpeed is not needed, and its states are exact arithmetic the CPU tests check).

The estimate is computed for the model actually built (its own parameter count, `--layers` layers), so
nothing is scaled. Machine-readable lines, one per setting, give the relative error (estimate / measured
- 1; `lvr check` promises within +-0.25):

    memory_estimate_error_gc_off=+0.031
    memory_estimate_error_gc_on=+0.087

Needs torch with CUDA and transformers 5; not DeepSpeed, not Prefect. `--device cpu` runs the same passes
without measuring (a smoke test of the script).
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

SEVEN_B = "Qwen/Qwen2.5-VL-7B-Instruct"


def build_model(arch, layers: int, device: str):
    """A random bf16 Qwen2.5-VL with `arch`'s text shapes and `layers` decoder layers."""
    import torch
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    text = {
        "hidden_size": arch.hidden_size, "intermediate_size": arch.intermediate_size, "num_hidden_layers": layers,
        "num_attention_heads": arch.num_heads, "num_key_value_heads": arch.num_kv_heads, "vocab_size": arch.vocab_size,
        "max_position_embeddings": arch.max_position_embeddings, "use_sliding_window": False, "max_window_layers": layers,
        "rope_parameters": {"rope_type": "default", "rope_theta": 1_000_000.0, "mrope_section": list(arch.mrope_section or (16, 24, 24))},
    }
    vision = {"depth": 1, "hidden_size": 64, "intermediate_size": 128, "num_heads": 2, "out_hidden_size": arch.hidden_size, "fullatt_block_indexes": [0]}
    config = Qwen2_5_VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=arch.tie_word_embeddings)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            model = Qwen2_5_VLForConditionalGeneration(config)
    finally:
        torch.set_default_dtype(previous)
    return model.train()


def train_pass(model, seq_len: int, scored: int, device: str) -> None:
    """One forward and backward pass of our SFT path on a text-only sequence (SP 1)."""
    import torch

    from models.qwen_sp import enable_ulysses, sp_forward
    from parallel.loss import cross_entropy_sum
    from parallel.sequence import IGNORE_INDEX
    from parallel.topology import SPGroup

    enable_ulysses(model)
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, model.config.text_config.vocab_size, (1, seq_len), generator=generator).to(device)
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    labels[:, -scored:] = input_ids[:, -scored:]
    shard = sp_forward(
        model, SPGroup.single(), input_ids, torch.ones_like(input_ids), labels=labels, mm_token_type_ids=torch.zeros_like(input_ids),
    )
    loss, _ = cross_entropy_sum(shard.logits, shard.targets)
    loss.backward()  # `shard` (its logits) is held through backward, as the SFT trainer does


def estimate_forward_backward(model, seq_len: int, scored: int, checkpointing: bool) -> tuple[int, str]:
    """The estimate's bytes held during forward/backward (weights, gradients, activations; no optimizer)
    for the built model at ZeRO-0, one GPU, and its table."""
    from models.architecture import parse_architecture
    from tasks.preflight.memory import (
        FORWARD_BACKWARD,
        TrainingShape,
        estimate_training_memory,
    )

    arch = parse_architecture(model.config.to_dict(), "benchmark")
    shape = TrainingShape(
        precision="bf16", gradient_checkpointing=checkpointing, seq_len=seq_len, scored_tokens=scored, video_patches=0,
        train_vision=True,
    )
    estimate = estimate_training_memory(arch, shape)
    optimizer = estimate.bytes_of("optimizer states (AdamW moments, fp32 master)")
    return estimate.phase_bytes()[FORWARD_BACKWARD] - optimizer, estimate.table()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=SEVEN_B, help="architecture to copy (a shipped id, a local folder, or 'tiny')")
    parser.add_argument("--layers", type=int, default=4, help="decoder layers to build (the estimate uses the same)")
    parser.add_argument("--seq-len", type=int, default=16384, help="tokens of the sequence")
    parser.add_argument("--scored", type=int, default=1024, help="positions at the end the loss scores (the response)")
    parser.add_argument("--device", default="cuda", help="cuda (measured) or cpu (runs the passes, measures nothing)")
    args = parser.parse_args(argv)

    import torch

    from models.architecture import load_architecture

    arch = replace(load_architecture(args.model), num_layers=args.layers)
    cuda = args.device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        parser.error("no CUDA device: run on a GPU machine, or pass --device cpu for a smoke test")
    started = time.perf_counter()
    model = build_model(arch, args.layers, args.device)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    print(f"{args.model} shapes, {args.layers} layers: {sum(p.numel() for p in model.parameters()) / 1e9:.2f}B parameters, "
          f"{weights / 2**30:.2f} GiB in bf16 (built in {time.perf_counter() - started:.0f}s)")

    for checkpointing in (False, True):
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        started = time.perf_counter()
        train_pass(model, args.seq_len, args.scored, args.device)
        seconds = time.perf_counter() - started
        estimate, table = estimate_forward_backward(model, args.seq_len, args.scored, checkpointing)
        label = "on" if checkpointing else "off"
        print(f"\ngradient checkpointing {label}: {args.seq_len:,} tokens, {args.scored:,} scored, {seconds:.1f}s")
        print(table)
        if not cuda:
            print(f"estimate (weights, gradients, forward/backward) {estimate / 2**30:.2f} GiB; not measured on {args.device}")
            continue
        torch.cuda.synchronize()
        measured = torch.cuda.max_memory_allocated()
        print(f"estimate (weights, gradients, forward/backward) {estimate / 2**30:.2f} GiB, measured peak {measured / 2**30:.2f} GiB")
        print(f"memory_estimate_error_gc_{label}={estimate / measured - 1:+.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
