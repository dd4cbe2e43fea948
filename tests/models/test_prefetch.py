"""Frames read and resized in worker processes ahead of the model: order, bounded read-ahead, per-item
errors, and captions identical to reading the frames in line."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from models.captioners import UNREADABLE_CLIP, CaptionSettings, ClipRequest, HFCaptioner
from models.prefetch import FrameJob, Prefetcher, read_resized_frames
from models.video import (
    FrameSampling,
    VideoPreprocessConfig,
    VideoTokenBudget,
    preprocess_video,
    read_frames,
)
from tests.support.videos import make_video


def slow_square(x: int) -> int:
    import time

    time.sleep(0.05 * (x % 3 == 0))  # early items finish last: order must not follow completion
    return x * x


def fail_on_three(x: int) -> int:
    if x == 3:
        raise ValueError(f"item {x} is broken")
    return x


def die(x: int) -> int:
    import os

    os._exit(1)


@pytest.fixture(scope="module")
def pool():
    with Prefetcher(workers=2, depth=3) as prefetcher:
        yield prefetcher


def test_results_come_back_in_input_order(pool):
    assert [f.result() for f in pool.map(slow_square, range(10))] == [x * x for x in range(10)]


def test_never_more_than_depth_items_read_ahead(pool):
    pulled = []

    def items():
        for x in range(10):
            pulled.append(x)
            yield x

    handed = 0
    for future in pool.map(slow_square, items()):
        handed += 1
        assert len(pulled) - handed <= pool.depth  # submitted and not yet handed back
        future.result()
    assert handed == 10 and len(pulled) == 10


def test_a_worker_exception_fails_its_item_only(pool):
    outcomes = []
    for future in pool.map(fail_on_three, range(6)):
        try:
            outcomes.append(future.result())
        except ValueError as exc:
            outcomes.append(str(exc))
    assert outcomes == [0, 1, 2, "item 3 is broken", 4, 5]


def test_a_dead_worker_breaks_the_pool_not_an_item_and_close_recovers():
    """A killed worker is a fault of the machine (the captioner lets it fail the shard), and the next
    map after `close()` runs on a fresh pool."""
    from concurrent.futures.process import BrokenProcessPool

    with Prefetcher(workers=1, depth=2) as prefetcher:
        with pytest.raises(BrokenProcessPool):
            for future in prefetcher.map(die, range(3)):
                future.result()
        prefetcher.close()
        assert [f.result() for f in prefetcher.map(abs, [-1, -2])] == [1, 2]


def test_resized_frames_need_no_second_resize(tmp_path):
    """The worker's frames give the same pixel values as the original frames, under a budget too."""
    make_video(tmp_path / "v.mp4", 2, fps=25, gop=25)
    sampling = FrameSampling(num_frames=6)
    cfg, budget = VideoPreprocessConfig(), VideoTokenBudget(max_video_tokens=60)
    prepared = read_resized_frames(FrameJob(str(tmp_path / "v.mp4"), sampling, cfg, budget))
    original = read_frames(tmp_path / "v.mp4", sampling)
    assert prepared.frames.shape[1:3] != original.frames.shape[1:3]  # it did resize
    assert prepared.timestamps_s == original.timestamps_s and prepared.sampled_fps == original.sampled_fps
    a, b = preprocess_video(prepared, cfg, budget), preprocess_video(original, cfg, budget)
    assert np.array_equal(a["video_grid_thw"], b["video_grid_thw"])
    assert np.array_equal(a["pixel_values_videos"].numpy(), b["pixel_values_videos"].numpy())


def test_prefetched_captions_equal_in_line_captions(tmp_path):
    from tasks.config import load_config

    paths = []
    for i, source in enumerate(("testsrc", "smptebars", "testsrc2")):
        paths.append(tmp_path / f"c{i}.mp4")
        make_video(paths[-1], 2, fps=25, gop=25, source=source)
    (tmp_path / "broken.mp4").write_bytes(b"not a video")
    clips = [ClipRequest(f"c{i}", str(p)) for i, p in enumerate(paths)]
    clips.insert(1, ClipRequest("broken", str(tmp_path / "broken.mp4")))

    cfg = load_config("tiny").caption
    serial = CaptionSettings(
        prompt=cfg.prompt, sampling=FrameSampling(num_frames=4), max_new_tokens=8, temperature=cfg.temperature,
        top_p=cfg.top_p, batch_size=2, seed=cfg.seed, budget=VideoTokenBudget(max_video_tokens=40),
    )
    in_line = HFCaptioner(cfg.model, serial).caption(clips)
    prefetched_captioner = HFCaptioner(cfg.model, dataclasses.replace(serial, prefetch_workers=1, prefetch_depth=1))
    try:
        prefetched = prefetched_captioner.caption(clips)
    finally:
        prefetched_captioner.close()

    strip = [dataclasses.replace(r, latency_s=0.0) for r in prefetched]
    assert strip == [dataclasses.replace(r, latency_s=0.0) for r in in_line]
    assert [r.clip_id for r in prefetched] == ["c0", "broken", "c1", "c2"]
    assert prefetched[1].error_kind == UNREADABLE_CLIP and all(r.caption for r in prefetched if r.clip_id != "broken")


_KEPT: list[Prefetcher] = []


def _use_a_prefetcher_and_return_without_closing_it() -> None:
    prefetcher = Prefetcher(workers=1, depth=2)
    assert [f.result() for f in prefetcher.map(slow_square, range(3))] == [0, 1, 4]
    _KEPT.append(prefetcher)  # alive at exit, as a stage object holding it for its next shard


def test_a_process_started_by_multiprocessing_exits_with_a_prefetcher_left_open():
    """A shard in a worker process (`execution.task_runner=processes`) keeps its stage's prefetcher
    for the next shard, so nothing closes it there. multiprocessing joins a child's children before
    Python's exit hooks run, and the pool's workers wait for work until shut down: filter's and eval's
    shard workers never exited, and the run hung once every shard was done."""
    import multiprocessing

    child = multiprocessing.get_context("spawn").Process(target=_use_a_prefetcher_and_return_without_closing_it)
    child.start()
    child.join(timeout=60)
    if child.exitcode is None:
        child.kill()
    assert child.exitcode == 0
