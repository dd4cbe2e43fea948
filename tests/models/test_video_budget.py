"""Video token budgets (models/video.py): the tokens `preprocess_video` gives real frames equal the
prediction for their size, never exceed the worst case `max_video_tokens_for` reports for any size,
and each frame gets the largest of Qwen's smart_resize sizes that fits the budget."""

from __future__ import annotations

import math

import numpy as np
import pytest

from models.video import (
    FrameSampling,
    VideoPreprocessConfig,
    VideoTokenBudget,
    budgeted_preprocess,
    frame_size,
    max_video_tokens_for,
    num_video_tokens,
    preprocess_video,
    sample_frame_indices,
    smart_resize,
    video_grid_thw_for,
    worst_case_frames,
)

TINY = VideoPreprocessConfig(min_pixels=4 * 28 * 28, max_pixels=64 * 28 * 28)  # the tiny model's limits
QWEN_VIDEO = VideoPreprocessConfig()  # transformers' Qwen2VLVideoProcessor defaults
QWEN_7B = VideoPreprocessConfig(min_pixels=3136, max_pixels=12845056)  # Qwen2.5-VL-7B's preprocessor_config.json

# (height, width): landscape, portrait, square, small (scaled up to min_pixels), very wide.
SIZES = [(120, 160), (720, 1280), (1080, 1920), (1280, 720), (333, 333), (30, 45), (36, 700), (28, 5000)]
BUDGETS = [
    VideoTokenBudget(tokens_per_frame=4),
    VideoTokenBudget(tokens_per_frame=50),
    VideoTokenBudget(max_video_tokens=100),
    VideoTokenBudget(tokens_per_frame=30, max_video_tokens=400),
    VideoTokenBudget(max_video_tokens=10_000_000),  # never binds
]


def _frames(t: int, h: int, w: int) -> np.ndarray:
    return np.random.default_rng(h * 7919 + w).integers(0, 256, size=(t, h, w, 3), dtype=np.uint8)


def _tokens(size: tuple[int, int], cfg: VideoPreprocessConfig) -> int:
    return size[0] * size[1] // cfg.factor**2


def _smart_resize_sizes(h: int, w: int, cfg: VideoPreprocessConfig) -> set[tuple[int, int]]:
    """Every size smart_resize gives the frame for max_pixels on a fine geometric grid up to cfg's
    (min_pixels lowered with it), found independently of frame_size's own search."""
    grid = np.geomspace(cfg.factor**2 / 300, cfg.max_pixels, 6000)
    return {smart_resize(h, w, cfg.factor, min(cfg.min_pixels, p), p) for p in grid}


@pytest.mark.parametrize("budget", BUDGETS, ids=str)
@pytest.mark.parametrize("cfg", [TINY, QWEN_VIDEO], ids=["tiny", "qwen-video"])
def test_preprocess_video_takes_the_predicted_tokens_within_the_budget(cfg, budget):
    for t in (3, 8):
        worst = max_video_tokens_for(t, cfg, budget)
        for h, w in [(120, 160), (720, 1280), (1280, 720), (333, 333), (30, 45)]:
            grid = preprocess_video(_frames(t, h, w), cfg, budget)["video_grid_thw"]
            tokens = num_video_tokens(grid, cfg.merge_size)
            assert tuple(grid[0].tolist()) == video_grid_thw_for(t, h, w, cfg, budget)
            assert tokens <= worst
            grid_t = math.ceil(t / cfg.temporal_patch_size)
            if budget.max_video_tokens is not None:
                assert tokens <= budget.max_video_tokens
            if budget.tokens_per_frame is not None:
                assert tokens <= budget.tokens_per_frame * grid_t * cfg.temporal_patch_size


def test_no_budget_is_qwens_smart_resize_exactly():
    for cfg in (TINY, QWEN_VIDEO, QWEN_7B):
        for h, w in SIZES:
            assert budgeted_preprocess(cfg, 16, None) is cfg
            assert budgeted_preprocess(cfg, 16, VideoTokenBudget()) is cfg
            assert frame_size(h, w, cfg) == smart_resize(h, w, cfg.factor, cfg.min_pixels, cfg.max_pixels)
    # A budget that frames of no size can exceed changes nothing either.
    assert budgeted_preprocess(TINY, 8, VideoTokenBudget(tokens_per_frame=10_000)) is TINY


@pytest.mark.parametrize("cfg", [TINY, QWEN_VIDEO, QWEN_7B], ids=["tiny", "qwen-video", "qwen-7b"])
def test_each_frame_gets_the_largest_smart_resize_size_that_fits(cfg):
    for budget, frames in [(VideoTokenBudget(tokens_per_frame=3), 8), (VideoTokenBudget(max_video_tokens=120_000), 512),
                           (VideoTokenBudget(max_video_tokens=120_000), 8192), (VideoTokenBudget(tokens_per_frame=20), 16)]:
        budgeted = budgeted_preprocess(cfg, frames, budget)
        cap = budgeted.max_tokens_per_temporal_patch
        for h, w in SIZES:
            size = frame_size(h, w, budgeted)
            assert size[0] % cfg.factor == 0 and size[1] % cfg.factor == 0
            if cap is None:  # the budget cannot bind for this model
                assert size == smart_resize(h, w, cfg.factor, cfg.min_pixels, cfg.max_pixels)
                continue
            sizes = _smart_resize_sizes(h, w, cfg) | {size}
            assert _tokens(size, cfg) <= cap
            assert size in _smart_resize_sizes(h, w, budgeted) | {frame_size(h, w, budgeted)}
            # one smart_resize step larger no longer fits
            larger = [s for s in sizes if _tokens(s, cfg) > _tokens(size, cfg)]
            assert all(_tokens(s, cfg) > cap for s in larger), (h, w, cap, size, sorted(larger, key=lambda s: _tokens(s, cfg))[:3])
            # and Qwen's own size (under the model's max_pixels) is kept whenever it fits
            qwen = smart_resize(h, w, cfg.factor, cfg.min_pixels, cfg.max_pixels)
            if _tokens(qwen, cfg) <= cap:
                assert size == qwen


def test_a_budgeted_frame_is_a_smart_resize_size_at_some_max_pixels():
    budgeted = budgeted_preprocess(QWEN_7B, 512, VideoTokenBudget(max_video_tokens=120_000))
    assert budgeted.max_tokens_per_temporal_patch == 120_000 // 256 == 468
    size = frame_size(720, 1280, budgeted)
    # 720p: lowering max_pixels to 468 blocks gives 16 x 28 = 448 tokens; one block wider fits too.
    assert smart_resize(720, 1280, 28, 3136, 468 * 784) == (448, 784)
    assert size == (448, 812) and _tokens(size, QWEN_7B) == 464
    assert size in _smart_resize_sizes(720, 1280, QWEN_7B)


def test_worst_case_tokens():
    # Without a budget: max_pixels per temporal patch, and for the tiny model (64 blocks) frames up to
    # 200:1 keep a one-block short side, so smart_resize can give them up to 113 blocks.
    assert max_video_tokens_for(512, QWEN_7B) == 256 * 16384
    assert max_video_tokens_for(16, QWEN_VIDEO) == 8 * 768
    assert max_video_tokens_for(8, TINY) == 4 * 113
    assert _tokens(smart_resize(28, 5572, 28, TINY.min_pixels, TINY.max_pixels), TINY) == 112
    # The paper's 512 frames, and 8,192, within 120,000 tokens.
    budget = VideoTokenBudget(max_video_tokens=120_000)
    assert max_video_tokens_for(512, QWEN_7B, budget) <= 120_000
    assert max_video_tokens_for(8192, QWEN_7B, budget) <= 120_000
    assert max_video_tokens_for(8192, QWEN_7B, budget) >= 4096 * 29
    # tokens_per_frame: T tokens per frame are 2T per temporal patch.
    assert max_video_tokens_for(16, QWEN_7B, VideoTokenBudget(tokens_per_frame=64)) == 16 * 64
    # Fewer frames than asked count: 3 patches share 100 tokens as 3 x 33, but 2 patches take 2 x 50.
    assert max_video_tokens_for(6, QWEN_7B, VideoTokenBudget(max_video_tokens=100)) == 100


def test_budget_errors():
    with pytest.raises(ValueError, match="below one token per temporal patch"):
        budgeted_preprocess(QWEN_7B, 512, VideoTokenBudget(max_video_tokens=255))
    with pytest.raises(ValueError, match="below one token per temporal patch"):
        max_video_tokens_for(8192, QWEN_7B, VideoTokenBudget(max_video_tokens=4000))
    assert budgeted_preprocess(QWEN_7B, 512, VideoTokenBudget(max_video_tokens=256)).max_tokens_per_temporal_patch == 1
    assert frame_size(720, 1280, budgeted_preprocess(QWEN_7B, 512, VideoTokenBudget(max_video_tokens=256))) == (28, 28)
    for bad in (0, -3, True, 2.5):
        with pytest.raises(ValueError, match="positive int"):
            VideoTokenBudget(tokens_per_frame=bad)
        with pytest.raises(ValueError, match="positive int"):
            VideoTokenBudget(max_video_tokens=bad)


def test_worst_case_frames_bounds_every_sampling():
    assert worst_case_frames(FrameSampling(num_frames=16)) == 16
    assert worst_case_frames(FrameSampling(num_frames=7)) == 8
    assert worst_case_frames(FrameSampling(num_frames=8192)) == 8192
    assert worst_case_frames(FrameSampling(fps=1.0, max_frames=8192)) == 8192
    assert worst_case_frames(FrameSampling(fps=1.0, max_frames=33)) == 32
    assert worst_case_frames(FrameSampling(fps=1.0, max_frames=33), temporal_patch_size=4) == 32
    assert worst_case_frames(FrameSampling(num_frames=6), temporal_patch_size=4) == 8
    for sampling in (FrameSampling(fps=2.0, max_frames=64), FrameSampling(fps=0.5, max_frames=9), FrameSampling(num_frames=10)):
        for total, fps in ((30, 25.0), (3000, 30.0), (900_000, 30.0)):
            assert len(sample_frame_indices(total, fps, sampling)) <= worst_case_frames(sampling)
    # fps sampling of an hour at 2 fps reaches max_frames: 8,192 frames are configurable.
    assert len(sample_frame_indices(108_000, 30.0, FrameSampling(fps=2.0, min_frames=4, max_frames=8192))) == 7200
    assert len(sample_frame_indices(216_000, 30.0, FrameSampling(fps=2.0, min_frames=4, max_frames=8192))) == 8192


@pytest.mark.parametrize("size", [(720, 1280), (1080, 1920), (240, 320), (100, 3000)])
def test_engine_video_pins_the_size_the_budget_gives(size):
    """Frames for an engine with Qwen's own processor (vLLM): resized as preprocess_video would, and
    pixel limits under which Qwen's smart_resize keeps them: the same grid as the hf path."""
    from models.video import engine_video, smart_resize

    cfg, budget = VideoPreprocessConfig(), VideoTokenBudget(max_video_tokens=2048)
    frames = np.zeros((16, *size, 3), dtype=np.uint8)
    video = engine_video(frames, cfg, budget)
    h, w = video.frames.shape[1:3]
    kwargs = video.processor_kwargs
    assert smart_resize(h, w, factor=cfg.factor, min_pixels=kwargs["min_pixels"], max_pixels=kwargs["max_pixels"]) == (h, w)
    grid = preprocess_video(frames, cfg, budget)["video_grid_thw"]
    assert tuple(grid[0].tolist()) == (8, h // cfg.patch_size, w // cfg.patch_size)
