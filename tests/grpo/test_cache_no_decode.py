"""Cached GRPO steps touch no video: the trainer's encode looks the embedding cache up from the video
key alone, before any frame is read, so a step whose videos are all cached opens no video file, and
its text inputs and embeddings are those of the uncached step."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

import tasks.grpo.data as grpo_data
from models.vlm import HFVideoLM
from parallel.embedding_cache import EmbeddingCache
from parallel.topology import SPGroup
from tasks.config import load_config
from tasks.grading.prompts import user_prompt
from tasks.grpo.data import RLExample
from tasks.grpo.trainer import Trainer
from tests.support.videos import make_video

TEXT = ("input_ids", "attention_mask", "mm_token_type_ids", "video_grid_thw", "second_per_grid_ts")


@pytest.fixture(scope="module")
def lm() -> HFVideoLM:
    return HFVideoLM("tiny", device="cpu")


def example(qa_id: str, path) -> RLExample:
    prompt = user_prompt(f"What happens in {qa_id}?", "open_ended", None)
    return RLExample(qa_id, path.stem, str(path), "open_ended", "What happens?", None, "a", prompt)


def encode(lm: HFVideoLM, cfg, cache: EmbeddingCache | None, examples: list[RLExample]):
    """`Trainer.encode`, the trainer's own step code, on a stand-in holding what it uses."""
    trainer = SimpleNamespace(policy=lm, cfg=cfg, topo=SimpleNamespace(sp=SPGroup.single()), cache=cache)
    return Trainer.encode(trainer, examples)


def test_cached_step_reads_no_video(lm, tmp_path, monkeypatch):
    a = make_video(tmp_path / "a.mp4", 2, fps=8, size="160x120", audio=False)
    b = make_video(tmp_path / "b.mp4", 2, fps=8, size="96x96", audio=False, source="testsrc")
    examples = [example("q1", a), example("q2", b), example("q3", a)]  # q1 and q3: one video
    cfg = load_config("tiny", {"grpo.num_frames": 6, "grpo.tokens_per_frame": 4}).grpo  # under a token budget
    reads: list[str] = []
    read = grpo_data.read_video_frames
    monkeypatch.setattr(grpo_data, "read_video_frames", lambda uri, sampling: reads.append(uri) or read(uri, sampling))

    uncached, _ = encode(lm, cfg, None, examples)
    assert sorted(reads) == [str(a), str(b)]  # each video read once

    reads.clear()
    root = tmp_path / "cache"
    _, stats = encode(lm, cfg, EmbeddingCache(root, lm.model, lm.preprocess), examples)
    assert (stats["videos_encoded"], stats["cache_hits"]) == (2, 0) and sorted(reads) == [str(a), str(b)]

    # Every video cached: no file is opened (they are gone), no tower call, the same inputs.
    reads.clear()
    a.unlink()
    b.unlink()
    cached, stats = encode(lm, cfg, EmbeddingCache(root, lm.model, lm.preprocess), examples)
    assert reads == [] and stats == {"encoder_calls": 0, "videos_encoded": 0, "cache_hits": 2}
    for name in TEXT:
        x, y = getattr(uncached, name), getattr(cached, name)
        assert x.dtype == y.dtype and torch.equal(x, y), name
    assert all(torch.equal(x, y) for x, y in zip(uncached.video_embeds, cached.video_embeds))
    assert cached.video_embeds[0] is cached.video_embeds[2] and cached.patch_rows == 0

    # One new video among cached ones: only it is read and encoded.
    c = make_video(tmp_path / "c.mp4", 2, fps=8, size="128x72", audio=False)
    batch, stats = encode(lm, cfg, EmbeddingCache(root, lm.model, lm.preprocess), [*examples, example("q4", c)])
    assert reads == [str(c)] and (stats["videos_encoded"], stats["cache_hits"]) == (1, 2)
    assert torch.equal(batch.video_embeds[0], uncached.video_embeds[0]) and len(batch.video_embeds) == 4
