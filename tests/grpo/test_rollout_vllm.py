"""The vllm rollout engine (CUDA machines with vLLM): samples from MR-SP's cached embeddings without
touching the policy's vision tower, and follows the policy's weights after `sync_weights`."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.gpu


def test_vllm_rollouts_from_cached_embeddings_and_weight_sync(tmp_path):
    pytest.importorskip("vllm")
    from models.tiny import ensure_tiny_model
    from models.video import FrameSampling, read_frames
    from models.vlm import HFVideoLM, video_messages
    from parallel.embedding_cache import VideoRequest, encode_requests
    from parallel.topology import SPGroup
    from tasks.config import GRPOConfig
    from tasks.grpo.rollout import make_rollout_engine
    from tasks.samples.synth import SynthSpec, write_video

    write_video(tmp_path / "v.mp4", [("red", 3), ("blue", 5)], SynthSpec(videos=1))
    lm = HFVideoLM("tiny", device="cuda", dtype="bf16")
    frames = read_frames(str(tmp_path / "v.mp4"), FrameSampling(num_frames=16))
    messages = video_messages("Which colour is shown first?")
    batch, _ = encode_requests(lm.model, lm.tokenizer, lm.preprocess, [VideoRequest(messages, frames, "v")], SPGroup.single())
    cfg = GRPOConfig(rollout_engine="vllm", max_new_tokens=8, vllm_gpu_memory_utilization=0.2)
    engine = make_rollout_engine(cfg, lm.model, lm.tokenizer, str(ensure_tiny_model()), seed=0)

    calls = lm.encoder_calls
    before = engine.generate(batch, [messages], n=4, seed=0)
    assert lm.encoder_calls == calls
    assert len(before) == 1 and len(before[0]) == 4 and all(1 <= len(r.token_ids) <= 8 for r in before[0])
    assert engine.generate(batch, [messages], n=4, seed=0) == before  # seeded

    with torch.no_grad():
        for p in lm.model.model.language_model.parameters():
            p.add_(torch.randn_like(p))
    engine.sync_weights(lm.model)
    assert engine.generate(batch, [messages], n=4, seed=0) != before
