"""Encode once, sample many: the vision tower runs once per video however many answers are drawn.

With the real tiny Qwen2.5-VL through `from_pretrained` / `generate`, on real frames of real videos.
"""

from __future__ import annotations

import pytest

from models.video import FrameSampling, read_frames
from models.vlm import HFVideoLM, VideoPrompt
from tasks.config import load_config
from tasks.filter.rollouts import HFSampler, RolloutRequest
from tasks.grading.prompts import prompt_messages
from tests.support.videos import make_video

QUESTION = ("What happens first in the video?", "multiple_choice", ["A red ball", "A blue car", "A dog", "Nothing"])


@pytest.fixture(scope="module")
def lm():
    return HFVideoLM("tiny")


@pytest.fixture(scope="module")
def frames(tmp_path_factory):
    root = tmp_path_factory.mktemp("rollout-videos")
    a = read_frames(make_video(root / "a.mp4", 3, audio=False), FrameSampling(num_frames=4))
    b = read_frames(make_video(root / "b.mp4", 2, audio=False, size="128x96", source="smptebars"), FrameSampling(num_frames=6))
    return a, b


def patch_rows(f) -> int:
    """Patch rows a video gives the tower (preprocessing alone, no model)."""
    from models.video import preprocess_video
    from models.vlm import load_preprocess_config, resolve_model_ref

    return int(preprocess_video(f, load_preprocess_config(resolve_model_ref("tiny")))["pixel_values_videos"].shape[0])


def test_encoded_greedy_decoding_matches_plain_generate(lm, frames):
    a, b = frames
    prompts = [VideoPrompt(prompt_messages(*QUESTION), a), VideoPrompt(prompt_messages("Where is it?", "open_ended", None), b)]
    plain = lm.generate(prompts, max_new_tokens=12)
    encoded = lm.generate_encoded(lm.encode(prompts), max_new_tokens=12)
    assert encoded == plain
    assert any(g.tokens_out > 0 for (g,) in plain)  # something was decoded: the comparison is not vacuous
    # Sampling too: same seed, same tokens.
    assert lm.generate_encoded(lm.encode(prompts), max_new_tokens=8, temperature=1.0, num_return_sequences=3, seed=7) == lm.generate(
        prompts, max_new_tokens=8, temperature=1.0, num_return_sequences=3, seed=7
    )


def test_ten_samples_from_one_tower_pass_over_one_copy(lm, frames):
    a, _ = frames
    calls, rows = lm.encoder_calls, lm.encoder_patch_rows
    batch = lm.encode([VideoPrompt(prompt_messages(*QUESTION), a)])
    samples = lm.generate_encoded(batch, max_new_tokens=8, temperature=1.0, num_return_sequences=10, seed=0)
    assert len(samples) == 1 and len(samples[0]) == 10
    assert lm.encoder_calls - calls == 1
    assert lm.encoder_patch_rows - rows == patch_rows(a) == batch.patch_rows  # one copy of the patches, not ten
    assert len({g.text for g in samples[0]}) > 1  # ten real samples, not one repeated
    # The encoded batch is reusable (GRPO reuses it across steps): no further tower pass, and the
    # in-place expansion generate does never leaks into the batch.
    again = lm.generate_encoded(batch, max_new_tokens=8, temperature=1.0, num_return_sequences=10, seed=0)
    assert again == samples and lm.encoder_calls - calls == 1 and len(batch.video_embeds) == 1


def test_questions_about_one_video_share_its_encoding(lm, frames):
    a, b = frames
    prompts = [
        VideoPrompt(prompt_messages(*QUESTION), a),
        VideoPrompt(prompt_messages("Why does it stop?", "open_ended", None), a),
        VideoPrompt(prompt_messages("Where is it?", "open_ended", None), b),
    ]
    calls, rows = lm.encoder_calls, lm.encoder_patch_rows
    batch = lm.encode(prompts)
    assert lm.encoder_calls - calls == 1 and lm.encoder_patch_rows - rows == patch_rows(a) + patch_rows(b)
    assert batch.video_embeds[0] is batch.video_embeds[1] and batch.video_embeds[2] is not batch.video_embeds[0]
    assert lm.generate_encoded(batch, max_new_tokens=8) == lm.generate(prompts, max_new_tokens=8)


def test_hf_sampler_one_generate_call_per_batch(frames, monkeypatch):
    a, b = frames
    cfg = load_config("tiny", {"filter.runs": 10, "filter.max_new_tokens": 8, "filter.batch_size": 4}).filter
    sampler = HFSampler(cfg)
    generate_calls = []
    original = sampler.lm.model.generate
    monkeypatch.setattr(sampler.lm.model, "generate", lambda **kw: generate_calls.append(kw["num_return_sequences"]) or original(**kw))
    requests = [
        RolloutRequest("q1", prompt_messages(*QUESTION), a),
        RolloutRequest("q2", prompt_messages("Why?", "open_ended", None), a),
        RolloutRequest("q3", prompt_messages("Where?", "open_ended", None), b),
    ]
    results = sampler.sample(requests)
    assert [len(r) for r in results] == [10, 10, 10]
    assert generate_calls == [10]  # one batched call for the three questions, never ten
    assert sampler.lm.encoder_calls == 1 and sampler.lm.encoder_patch_rows == patch_rows(a) + patch_rows(b)
    assert sampler.sample(requests) == results  # seeded from the qa ids: reproducible


@pytest.mark.gpu
def test_hf_sampler_on_cuda(frames):
    a, b = frames
    cfg = load_config("tiny", {"filter.runs": 10, "filter.max_new_tokens": 8}).filter
    sampler = HFSampler(cfg, device="cuda")
    assert str(next(sampler.lm.model.parameters()).device).startswith("cuda")
    results = sampler.sample([RolloutRequest("q1", prompt_messages(*QUESTION), a), RolloutRequest("q2", prompt_messages("Where?", "open_ended", None), b)])
    assert [len(r) for r in results] == [10, 10] and sampler.lm.encoder_calls == 1


@pytest.mark.gpu
def test_vllm_sampler_draws_n_answers_per_question(frames):
    pytest.importorskip("vllm")
    from tasks.filter.rollouts import VLLMSampler

    a, b = frames
    cfg = load_config("tiny", {"filter.backend": "vllm", "filter.runs": 10, "filter.max_new_tokens": 8}).filter
    requests = [RolloutRequest("q1", prompt_messages(*QUESTION), a), RolloutRequest("q2", prompt_messages("Where?", "open_ended", None), b)]
    results = VLLMSampler(cfg).sample(requests)
    assert [len(r) for r in results] == [10, 10] and all(g.tokens_out > 0 for r in results for g in r)
