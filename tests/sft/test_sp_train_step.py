"""A full SP=2 training step (MM-SP data path, Ulysses attention, DeepSpeed ZeRO-2 on gloo) gives
the loss and gradients of the plain single-process model on the same batch."""

from __future__ import annotations

import pytest
import torch

from tests.support.videos import make_video

SP = 2


def _sp_step(model_dir: str, batch: dict, zero_stage: int):
    """On each rank: the trainer's engine and micro-step; loss, full gradients, frames encoded."""
    from parallel.loss import count_sum, cross_entropy_sum
    from parallel.topology import init_topology
    from tasks.config import SFTConfig
    from tasks.sft.trainer import build_engine, forward_backward, scored_tokens
    from tasks.training.loop import import_deepspeed
    from tasks.training.schedule import TrainSchedule

    deepspeed = import_deepspeed()

    torch.use_deterministic_algorithms(True)
    cfg = SFTConfig(model="tiny", sp_degree=SP, nproc_per_node=SP, zero_stage=zero_stage, micro_batch_size=2, max_grad_norm=0.0)
    topo = init_topology(SP)
    engine = build_engine(model_dir, cfg, topo, TrainSchedule.plan(2, cfg, topo.dp_size))
    visual = engine.module.model.model.visual
    patch_rows: list[int] = []
    visual.register_forward_hook(lambda _m, args, _out: patch_rows.append(int(args[0].shape[0])))
    tokens = scored_tokens([batch], topo, torch.device("cpu"))
    loss_sum = forward_backward(engine, batch, tokens, topo)
    loss = float(count_sum(loss_sum) / tokens)
    # A collective under ZeRO: every rank assembles every gradient, in the same order.
    grads = {name: deepspeed.utils.safe_get_full_grad(p).clone() for name, p in engine.module.model.named_parameters()}
    with torch.no_grad():  # left padding: the key padding mask path of Ulysses attention
        shard = engine(**left_padded(batch))
        left_loss = float(count_sum(cross_entropy_sum(shard.logits, shard.targets)[0]) / tokens)
    return {"loss": loss, "left_loss": left_loss, "grads": grads if topo.rank == 0 else None, "patch_rows": patch_rows}


def left_padded(batch: dict) -> dict:
    """The same batch with each row's padding moved to its start."""
    out = dict(batch)
    for name in ("input_ids", "attention_mask", "mm_token_type_ids", "labels"):
        out[name] = torch.stack([row.roll(int((mask == 0).sum())) for row, mask in zip(batch[name], batch["attention_mask"])])
    return out


@pytest.fixture(scope="module")
def batch_and_model(tmp_path_factory):
    """Two examples of different lengths (right padding) about an 8-frame and a 6-frame video,
    so a video is split between the ranks' vision shards."""
    from transformers import AutoTokenizer

    from models.tiny import ensure_tiny_model
    from models.video import FrameSampling
    from models.vlm import load_preprocess_config
    from tasks.grading.prompts import user_prompt
    from tasks.media.frames import read_video_frames
    from tasks.sft.data import SFTExample, collate, encode_example

    root = tmp_path_factory.mktemp("sp-step")
    model_dir = str(ensure_tiny_model())
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    preprocess = load_preprocess_config(model_dir)
    videos = [make_video(root / "a.mp4", 3, audio=False), make_video(root / "b.mp4", 2, source="smptebars", audio=False)]
    examples = [
        (SFTExample("a", str(videos[0]), user_prompt("What moves first?", "multiple_choice", ["the car", "the dog", "the cup", "the tree"]),
                    "<think>First I look at the frames in order. The car moves first.</think><answer>A</answer>"), 8),
        (SFTExample("b", str(videos[1]), user_prompt("What is shown?", "open_ended", None), "<think>Colour bars fill the frame.</think><answer>colour bars</answer>"), 6),
    ]
    encoded = [encode_example(tokenizer, preprocess, ex, read_video_frames(ex.video_uri, FrameSampling(num_frames=n))) for ex, n in examples]
    return model_dir, collate(encoded, tokenizer.pad_token_id)


def reference_step(model_dir: str, batch: dict) -> tuple[float, dict[str, torch.Tensor]]:
    """The transformers model (with the mRoPE positions lvr gives every model it loads), one
    process, its own loss (mean over scored tokens)."""
    from transformers import AutoModelForImageTextToText

    from models.positions import use_trained_positions

    torch.use_deterministic_algorithms(True)
    model = use_trained_positions(AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32))
    model.train()
    out = model(**batch)
    out.loss.backward()
    return float(out.loss.detach()), {name: p.grad for name, p in model.named_parameters()}


def test_sp2_zero2_step_equals_single_process(batch_and_model, monkeypatch):
    from parallel.local import run_local

    model_dir, batch = batch_and_model
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    ranks = run_local(_sp_step, SP, model_dir, batch, 2)
    loss, grads = reference_step(model_dir, batch)

    assert ranks[0]["loss"] == ranks[1]["loss"]
    assert abs(ranks[0]["loss"] - loss) < 1e-5, (ranks[0]["loss"], loss)
    left_loss, _ = reference_step(model_dir, left_padded(batch))
    assert abs(left_loss - loss) < 1e-5 and abs(ranks[0]["left_loss"] - left_loss) < 1e-5, (ranks[0]["left_loss"], left_loss)
    sp_grads = ranks[0]["grads"]
    assert sp_grads.keys() == grads.keys()
    worst = max((float((sp_grads[n] - g).abs().max()), n) for n, g in grads.items())
    assert worst[0] < 1e-5, worst
    assert sum(float(g.abs().sum()) for n, g in grads.items() if ".visual." in n) > 0  # the vision tower learns too

    # Each rank encoded only its share of the frames: 7 temporal patches over 2 ranks.
    total_rows = int(batch["video_grid_thw"].prod(-1).sum())
    rows = [r["patch_rows"] for r in ranks]
    assert all(len(r) == 2 for r in rows) and rows[0][0] + rows[1][0] == total_rows  # training pass, left-padded pass
    assert max(rows[0][0], rows[1][0]) <= total_rows * 4 // 7 + 1

