"""MR-SP stage 1: each video goes through the vision tower once per step, the rollouts and the
log-prob prefills reuse its embeddings (and equal what pixels give), and the on-disk cache makes
later steps and runs skip the tower entirely."""

from __future__ import annotations

import pytest
import torch

from models.video import FrameSampling, build_video_inputs, read_frames
from models.vlm import HFVideoLM, video_messages
from parallel.embedding_cache import EmbeddingCache, VideoRequest, encode_requests
from parallel.topology import SPGroup
from tasks.grpo.prefill import pack_sequences, response_logprobs
from tasks.grpo.rollout import HFRolloutEngine
from tasks.samples.synth import SynthSpec, write_video

SINGLE = SPGroup.single()


@pytest.fixture(scope="module")
def lm() -> HFVideoLM:
    return HFVideoLM("tiny", device="cpu")


@pytest.fixture(scope="module")
def requests(tmp_path_factory) -> list[VideoRequest]:
    """Three questions about two videos (8 and 6 frames): the first two share a video."""
    root = tmp_path_factory.mktemp("grpo-cache")
    spec = SynthSpec(videos=1)
    write_video(root / "a.mp4", [("red", 3), ("blue", 5)], spec)
    write_video(root / "b.mp4", [("green", 2), ("yellow", 4), ("red", 2)], spec)
    a = read_frames(str(root / "a.mp4"), FrameSampling(num_frames=8))
    b = read_frames(str(root / "b.mp4"), FrameSampling(num_frames=6))
    a_again = read_frames(str(root / "a.mp4"), FrameSampling(num_frames=8))  # another frames object, same video
    return [
        VideoRequest(video_messages("Which colour is shown first?"), a, "a-8"),
        VideoRequest(video_messages("Which colour is shown last?"), a_again, "a-8"),
        VideoRequest(video_messages("Which colour lasts longest?"), b, "b-6"),
    ]


def uncached_logprobs(lm: HFVideoLM, request: VideoRequest, response: list[int]) -> torch.Tensor:
    """transformers' own forward from pixels: the response tokens' log-probs."""
    tok = lm.tokenizer
    prompt = tok.apply_chat_template(request.messages, tokenize=False, add_generation_prompt=True)
    inputs = build_video_inputs(tok, prompt, [request.frames], lm.preprocess)
    ids = torch.cat([inputs["input_ids"], torch.tensor([response])], dim=1)
    inputs.update(
        input_ids=ids, attention_mask=torch.ones_like(ids),
        mm_token_type_ids=torch.cat([inputs["mm_token_type_ids"], torch.zeros(1, len(response), dtype=torch.long)], dim=1),
    )
    with torch.no_grad():
        logits = lm.model(**inputs).logits[0, -len(response) - 1 : -1]
    return torch.log_softmax(logits.float(), -1).gather(-1, torch.tensor(response)[:, None])[:, 0]


def test_one_encoding_per_video_serves_rollouts_and_prefills(lm, requests):
    calls, rows = lm.encoder_calls, lm.encoder_patch_rows
    batch, stats = encode_requests(lm.model, lm.tokenizer, lm.preprocess, requests, SINGLE)
    per_video = [int(r.frames.frames.shape[0]) // 2 * 16 for r in (requests[0], requests[2])]  # temporal patches x 4x4 patches
    assert lm.encoder_calls - calls == 1 and lm.encoder_patch_rows - rows == sum(per_video) == stats.patch_rows
    assert (stats.videos, stats.encoded, stats.cache_hits) == (2, 2, 0)
    assert batch.video_embeds[0] is batch.video_embeds[1]  # same video key, one tensor

    engine = HFRolloutEngine(lm.model, lm.tokenizer, max_new_tokens=6, temperature=1.0, top_p=1.0)
    rollouts = engine.generate(batch, [r.messages for r in requests], n=4, seed=0)
    assert [len(g) for g in rollouts] == [4, 4, 4] and all(1 <= len(r.token_ids) <= 6 for g in rollouts for r in g)
    assert engine.generate(batch, [r.messages for r in requests], n=4, seed=0) == rollouts  # seeded

    prompt_of = [i for i in range(3) for _ in range(4)]
    responses = [list(r.token_ids) for g in rollouts for r in g]
    seqs = pack_sequences(batch, prompt_of, responses, lm.tokenizer.pad_token_id)
    with torch.no_grad():
        logp, scored = response_logprobs(lm.model, seqs, SINGLE)
    assert lm.encoder_calls - calls == 1  # G rollouts and the prefill never touched the tower
    assert int(scored.sum()) == sum(len(r) for r in responses)

    expected = torch.cat([uncached_logprobs(lm, requests[p], r) for p, r in zip(prompt_of, responses)])
    assert torch.allclose(logp, expected, atol=1e-5), float((logp - expected).abs().max())

    # A response may sample the video placeholder token itself: it is text there, not a video slot.
    video_pad = lm.tokenizer.convert_tokens_to_ids("<|video_pad|>")
    odd = pack_sequences(batch, [0], [[5, video_pad, 7]], lm.tokenizer.pad_token_id)
    with torch.no_grad():
        logp, scored = response_logprobs(lm.model, odd, SINGLE)
    assert logp.shape == (3,) and torch.isfinite(logp).all()


def test_disk_cache_skips_the_tower_on_later_steps(lm, requests, tmp_path):
    cache = EmbeddingCache(tmp_path / "cache", lm.model, lm.preprocess)
    first, stats = encode_requests(lm.model, lm.tokenizer, lm.preprocess, requests, SINGLE, cache)
    assert stats.encoded == 2 and len(list(cache.folder.glob("*.safetensors"))) == 2

    calls = lm.encoder_calls
    again = EmbeddingCache(tmp_path / "cache", lm.model, lm.preprocess)  # a later run: same namespace
    second, stats = encode_requests(lm.model, lm.tokenizer, lm.preprocess, requests, SINGLE, again)
    assert lm.encoder_calls == calls and (stats.encoded, stats.cache_hits) == (0, 2)
    assert all(torch.equal(x, y) for x, y in zip(first.video_embeds, second.video_embeds))
    assert torch.equal(first.input_ids, second.input_ids)

    # A corrupt entry is a miss and is rewritten.
    cache.path("b-6").write_bytes(b"not a safetensors file")
    _, stats = encode_requests(lm.model, lm.tokenizer, lm.preprocess, requests, SINGLE, cache)
    assert (stats.encoded, stats.cache_hits) == (1, 1)

    # Other vision weights: another namespace, nothing reused.
    weight = lm.model.model.visual.patch_embed.proj.weight
    saved = weight.detach().clone()
    with torch.no_grad():
        weight.add_(1e-3)
    try:
        assert EmbeddingCache(tmp_path / "cache", lm.model, lm.preprocess).folder != cache.folder
    finally:
        with torch.no_grad():
            weight.copy_(saved)
