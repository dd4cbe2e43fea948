"""Every stage that shows videos to a model samples frames and sizes them under the token budget the
same way: the video tokens the tiny model is given in caption, filter, eval, SFT, GRPO and training
validation equal the budget's prediction (`models.video.video_grid_thw_for`), and fps sampling gives
the frame count it promises.

Caption, filter and eval run as stages through the real engine; the grids reaching the model are read
off its vision tower. SFT and GRPO train in torchrun workers, so their tests call the functions the
trainers build each step's inputs with (`tasks.sft.data.example_inputs`; `tasks.grpo.data.video_requests`
and `encode_requests`).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd
import pytest
import torch

from data_schemas import QA, VIDEOS
from models.video import (
    FrameSampling,
    VideoTokenBudget,
    num_video_tokens,
    video_grid_thw_for,
)
from models.vlm import (
    HFVideoLM,
    VideoPrompt,
    load_preprocess_config,
    resolve_model_ref,
    video_messages,
)
from parallel.embedding_cache import encode_requests
from parallel.topology import SPGroup
from tasks.caption.stage import CaptionStage
from tasks.clip.stage import ClipStage
from tasks.config import load_config
from tasks.engine.run import run_stage
from tasks.engine.stage import StageContext, read_stage_table
from tasks.engine.store import Workdir
from tasks.eval.stage import EvalStage
from tasks.filter.stage import FilterStage
from tasks.grading.prompts import user_prompt
from tasks.grpo.data import RLExample, video_requests
from tasks.media.frames import FrameCache, read_video_frames
from tasks.sft.data import SFTExample, example_inputs
from tasks.training.validation import answer
from tests.filter.test_stage import qa_item
from tests.support.eval_workdir import filter_row, publish_filter
from tests.support.stand_ins import Published
from tests.support.videos import make_video

# Two frame sizes (160x120 and 320x180, 3 s and 2 s at 25 fps); 4 tokens per frame is 8 per temporal
# patch, 20 per video is 5 per patch at 8 frames: both limits bind somewhere (the tiny model would give
# 120x160 frames 24 tokens per patch).
SIZES = {"a.mp4": (120, 160), "b.mp4": (180, 320)}
SECONDS = {"a.mp4": 3, "b.mp4": 2}
# 8 frames across each video (the profile samples some stages by fps; naming num_frames replaces that), under a budget.
BUDGET = {"num_frames": 8, "tokens_per_frame": 4, "max_video_tokens": 20}


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    src = tmp_path_factory.mktemp("budget-videos")
    make_video(src / "a.mp4", SECONDS["a.mp4"], audio=False)
    make_video(src / "b.mp4", SECONDS["b.mp4"], audio=False, source="smptebars", size="320x180")
    return src


@pytest.fixture(scope="module")
def clipped(source, tmp_path_factory) -> Path:
    wd = tmp_path_factory.mktemp("budget-wd") / "wd"
    run_stage(ClipStage(), StageContext(Workdir(str(wd)), load_config("tiny"), source=str(source)))
    return wd


@pytest.fixture(scope="module")
def tiny_preprocess():
    return load_preprocess_config(resolve_model_ref("tiny"))


@pytest.fixture
def tower_grids(monkeypatch) -> list[tuple[int, int, int]]:
    """Every `video_grid_thw` row the tiny model's vision tower is given."""
    from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl as qwen

    seen: list[tuple[int, int, int]] = []
    tower = qwen.Qwen2_5_VisionTransformerPretrainedModel
    forward = tower.forward

    def spy(self, hidden_states, grid_thw, **kwargs):
        seen.extend(tuple(row) for row in grid_thw.tolist())
        return forward(self, hidden_states, grid_thw, **kwargs)

    monkeypatch.setattr(tower, "forward", spy)
    return seen


def predicted(frames: int, name: str, preprocess, stage: str = "caption", **overrides) -> tuple[int, int, int]:
    """The grid the budget of `<stage>.*` predicts for `frames` frames of video `name`."""
    section = getattr(load_config("tiny", {**{f"{stage}.{k}": v for k, v in BUDGET.items()}, **overrides}), stage)
    return video_grid_thw_for(frames, *SIZES[name], preprocess, section.video_budget())


def _context(workdir: Path, stage: str, **overrides) -> StageContext:
    config = {**{f"{stage}.{k}": v for k, v in BUDGET.items()}, **{f"{stage}.{k}": v for k, v in overrides.items()}}
    return StageContext(Workdir(str(workdir)), load_config("tiny", config))


def test_budget_predictions_bind(tiny_preprocess):
    """The budget binds in these tests (else equal grids would prove nothing), each limit somewhere."""
    assert num_video_tokens(video_grid_thw_for(8, 120, 160, tiny_preprocess)) == 4 * 24
    assert num_video_tokens(predicted(8, "a.mp4", tiny_preprocess)) <= 20  # max_video_tokens: 5 per patch
    assert num_video_tokens(predicted(4, "a.mp4", tiny_preprocess)) <= 2 * 8  # tokens_per_frame: 8 per patch
    assert num_video_tokens(predicted(4, "a.mp4", tiny_preprocess)) > 10


def test_caption_stage(clipped, tmp_path, tower_grids, tiny_preprocess):
    wd = tmp_path / "wd"
    shutil.copytree(clipped, wd)
    report = run_stage(CaptionStage(), _context(wd, "caption", max_new_tokens=4))
    captions = pd.read_parquet(wd / "caption")
    clips = read_stage_table(Workdir(str(wd)), "clip", VIDEOS, "_videos").to_pylist()
    assert report.rows + report.failures == 2 and (captions["frames_used"] == 8).all()
    expected = {predicted(8, Path(v["uri"]).name, tiny_preprocess) for v in clips}
    assert len(expected) == 2 and sorted(set(tower_grids)) == sorted(expected)


def test_filter_stage_samples_by_fps(clipped, tmp_path, tower_grids, tiny_preprocess):
    wd = tmp_path / "wd"
    shutil.copytree(clipped, wd)
    ctx = _context(wd, "filter", runs=2, max_new_tokens=4, fps=2.0, max_frames=16)
    videos = {Path(v["uri"]).name: v["video_id"] for v in read_stage_table(ctx.workdir, "clip", VIDEOS, "_videos").to_pylist()}
    rows = [qa_item(f"q-{name}", video_id, "Temporal", "multiple_choice", "A") for name, video_id in videos.items()]
    run_stage(Published("qa", QA, rows), ctx)
    run_stage(FilterStage(), ctx)
    table = pd.read_parquet(wd / "filter")
    # 2 frames per second: 6 of the 3 s video, 4 of the 2 s one.
    frames = {name: 2 * SECONDS[name] for name in SIZES}
    assert dict(zip(table["video_id"], table["num_frames"])) == {videos[n]: f for n, f in frames.items()}
    overrides = {"filter.fps": 2.0, "filter.max_frames": 16}
    expected = {predicted(f, name, tiny_preprocess, "filter", **overrides) for name, f in frames.items()}
    assert sorted(set(tower_grids)) == sorted(expected)


def test_eval_stage_and_its_frames_sweep(clipped, tmp_path, tower_grids, tiny_preprocess):
    wd = tmp_path / "wd"
    shutil.copytree(clipped, wd)
    ctx = _context(wd, "eval", models=["base"], num_frames=8, frames_sweep=[4], max_new_tokens=4)

    def rows_for(uris: dict[str, str]) -> list[dict]:
        return [filter_row(f"e-{vid}", vid, uri, "Temporal", "multiple_choice", "A") for vid, uri in uris.items()]

    uris = {r["video_id"]: r["video_uri"] for r in publish_filter(ctx, rows_for)}
    run_stage(EvalStage(), ctx)
    table = pd.read_parquet(wd / "eval")
    assert sorted(zip(table["num_frames"], table["frames_used"])) == [(4, 4), (4, 4), (8, 8), (8, 8)]
    expected = {predicted(n, Path(uri).name, tiny_preprocess, "eval") for uri in uris.values() for n in (4, 8)}
    assert len(expected) == 4 and sorted(set(tower_grids)) == sorted(expected)


def test_sft_example_inputs(source, tiny_preprocess):
    from transformers import AutoTokenizer

    cfg = load_config("tiny", {f"sft.{k}": v for k, v in BUDGET.items()}).sft
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_ref("tiny"))
    video_pad = tokenizer.convert_tokens_to_ids("<|video_pad|>")
    for name in SIZES:
        example = SFTExample("q", str(source / name), user_prompt("Who?", "open_ended", None), "<think>t</think><answer>a</answer>")
        inputs = example_inputs(tokenizer, tiny_preprocess, example, cfg)
        grid = predicted(8, name, tiny_preprocess, "sft")
        assert tuple(inputs["video_grid_thw"][0].tolist()) == grid
        assert int((inputs["input_ids"] == video_pad).sum()) == num_video_tokens(grid)


def test_sft_example_inputs_through_the_frame_cache_equal_those_read_directly(source, tiny_preprocess):
    from transformers import AutoTokenizer

    cfg = load_config("tiny", {f"sft.{k}": v for k, v in BUDGET.items()}).sft
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_ref("tiny"))
    cache = FrameCache(2**30)
    for name in [*SIZES, *SIZES]:  # the second pass hits the cache
        example = SFTExample("q", str(source / name), user_prompt("Who?", "open_ended", None), "<think>t</think><answer>a</answer>")
        direct, cached = example_inputs(tokenizer, tiny_preprocess, example, cfg), example_inputs(tokenizer, tiny_preprocess, example, cfg, cache)
        assert direct.keys() == cached.keys() and all(torch.equal(direct[k], cached[k]) for k in direct)
    assert (cache.misses, cache.hits) == (len(SIZES), len(SIZES))


def test_grpo_video_requests_and_their_embeddings(source, tiny_preprocess):
    cfg = load_config("tiny", {f"grpo.{k}": v for k, v in BUDGET.items()}).grpo
    lm = HFVideoLM("tiny", device="cpu")
    examples = [
        RLExample(f"q-{name}", name, str(source / name), "open_ended", "Who?", None, "a", user_prompt("Who?", "open_ended", None))
        for name in SIZES
    ]
    requests = video_requests(examples, cfg)
    batch, _ = encode_requests(lm.model, lm.tokenizer, lm.preprocess, requests, SPGroup.single(), budget=cfg.video_budget())
    grids = [predicted(8, name, tiny_preprocess, "grpo") for name in SIZES]
    assert [tuple(g) for g in batch.video_grid_thw.tolist()] == grids
    assert [e.shape[0] for e in batch.video_embeds] == [num_video_tokens(g) for g in grids]
    # The embedding cache never mixes inputs made under other settings.
    example, sampling = examples[0], cfg.frame_sampling()
    keys = {
        example.video_key(sampling, cfg.video_budget()),
        example.video_key(sampling),
        example.video_key(sampling, VideoTokenBudget(tokens_per_frame=4)),
        example.video_key(FrameSampling(fps=2.0, max_frames=64), cfg.video_budget()),
    }
    assert len(keys) == 4 and requests[0].video_key == example.video_key(sampling, cfg.video_budget())


def test_training_validation_answers_under_the_budget(source, tower_grids, tiny_preprocess):
    lm = HFVideoLM("tiny", device="cpu")
    budget = load_config("tiny", {f"sft.{k}": v for k, v in BUDGET.items()}).sft.video_budget()
    frames = read_video_frames(str(source / "b.mp4"), FrameSampling(num_frames=8))
    answer(lm.model, lm.tokenizer, lm.preprocess, VideoPrompt(video_messages("Who?"), frames), 2, budget)
    assert set(tower_grids) == {predicted(8, "b.mp4", tiny_preprocess, "sft")}
