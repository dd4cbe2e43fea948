"""`FrameCache`: a trainer's videos decoded (and resized for the model) once while they fit its byte budget, real videos, real decoding."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch

from models.video import (
    FrameSampling,
    SampledFrames,
    VideoPreprocessConfig,
    VideoTokenBudget,
    budgeted_preprocess,
    frame_size,
    preprocess_video,
)
from tasks.media.frames import FrameCache, read_video_frames
from tests.support.videos import make_video

EIGHT = FrameSampling(num_frames=8)


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> list[str]:
    folder = tmp_path_factory.mktemp("frame-cache")
    return [str(make_video(folder / f"{name}.mp4", 2, audio=False, source=source))
            for name, source in (("a", "testsrc2"), ("b", "smptebars"), ("c", "rgbtestsrc"))]


class CountingRead:
    """The real `read_video_frames`, counting the decodes of each (video, sampling)."""

    def __init__(self) -> None:
        self.calls: Counter[tuple[str, FrameSampling]] = Counter()

    def __call__(self, uri: str, sampling: FrameSampling) -> SampledFrames:
        self.calls[(uri, sampling)] += 1
        return read_video_frames(uri, sampling)


def one_video_bytes(uri: str) -> int:
    return read_video_frames(uri, EIGHT).frames.nbytes


def test_a_cached_video_is_decoded_once_and_its_frames_are_those_read_directly_and_read_only(videos):
    read = CountingRead()
    cache = FrameCache(2**30, read)
    first, again = cache.read(videos[0], EIGHT), cache.read(videos[0], EIGHT)
    assert read.calls == {(videos[0], EIGHT): 1} and (cache.hits, cache.misses) == (1, 1)
    direct = read_video_frames(videos[0], EIGHT)
    assert again is first and np.array_equal(first.frames, direct.frames) and first.timestamps_s == direct.timestamps_s
    with pytest.raises(ValueError, match="read-only"):
        first.frames[0, 0, 0, 0] = 1
    # Another sampling of the same video is another entry, decoded on its own.
    four = FrameSampling(num_frames=4)
    assert len(cache.read(videos[0], four)) == 4 and read.calls[(videos[0], four)] == 1 and len(cache) == 2


def test_the_least_recently_used_video_is_dropped_past_the_byte_budget(videos):
    a, b, c = videos
    size = one_video_bytes(a)
    assert {one_video_bytes(b), one_video_bytes(c)} == {size}  # same frame size and count: the budget holds two
    read = CountingRead()
    cache = FrameCache(2 * size, read)
    for uri in (a, b, a, c):  # c pushes out b, the least recently used; a stays
        cache.read(uri, EIGHT)
    assert cache.bytes == 2 * size and len(cache) == 2
    cache.read(a, EIGHT)
    cache.read(b, EIGHT)
    assert read.calls == {(a, EIGHT): 1, (b, EIGHT): 2, (c, EIGHT): 1}


def test_a_video_larger_than_the_budget_is_read_every_time_and_not_kept(videos):
    read = CountingRead()
    cache = FrameCache(one_video_bytes(videos[0]) - 1, read)
    for _ in range(2):
        assert len(cache.read(videos[0], EIGHT)) == 8
    assert read.calls[(videos[0], EIGHT)] == 2 and len(cache) == 0 and cache.bytes == 0
    off = FrameCache(0, read)  # sft.frame_cache_mb: 0
    off.read(videos[1], EIGHT)
    off.read(videos[1], EIGHT)
    assert read.calls[(videos[1], EIGHT)] == 2


def test_frames_kept_for_a_model_are_resized_once_and_give_the_model_the_same_inputs(videos):
    """With the model's preprocessing, the cache keeps the frames at the size `preprocess_video` gives
    them under the budget: read and resized once, smaller than decoded, and normalized to exactly the
    pixels of the frames read and preprocessed directly. Another budget is another entry."""
    cfg, budget = VideoPreprocessConfig(), VideoTokenBudget(tokens_per_frame=4)
    read = CountingRead()
    cache = FrameCache(2**30, read)
    first, again = cache.read(videos[0], EIGHT, cfg, budget), cache.read(videos[0], EIGHT, cfg, budget)
    assert again is first and read.calls == {(videos[0], EIGHT): 1}
    direct = read_video_frames(videos[0], EIGHT)
    sized = budgeted_preprocess(cfg, len(direct), budget)
    assert first.frames.shape[1:3] == frame_size(*direct.frames.shape[1:3], sized) != direct.frames.shape[1:3]
    assert cache.bytes == first.frames.nbytes < direct.frames.nbytes
    assert first.timestamps_s == direct.timestamps_s and first.sampled_fps == direct.sampled_fps
    ours, theirs = preprocess_video(first, cfg, budget), preprocess_video(direct, cfg, budget)
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)
    larger = cache.read(videos[0], EIGHT, cfg, VideoTokenBudget(tokens_per_frame=16))
    assert larger.frames.shape[1] > first.frames.shape[1] and read.calls[(videos[0], EIGHT)] == 2 and len(cache) == 2
