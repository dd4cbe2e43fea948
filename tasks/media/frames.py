"""The one way to read a video's frames by URI: the frame sampling of `models.video.read_frames`
over the whole video, local or remote (through the media cache).

`FrameCache` keeps recently read videos' frames in memory, resized for the model, for a trainer that
shows the same videos step after step.

`iter_frames_by_video` reads the videos of a shard lazily, optionally in a `models.prefetch.Prefetcher`'s
worker processes ahead of the caller (resized as the model's preprocessing would, `tasks.media.frame_jobs`), so
filter and eval run the model on one batch while the next ones are read.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures.process import BrokenProcessPool
from itertools import islice
from typing import TypeVar

from models.prefetch import Prefetcher
from models.video import (
    FrameSampling,
    SampledFrames,
    VideoPreprocessConfig,
    VideoTokenBudget,
    presized_frames,
    read_frames,
)
from tasks.engine.stage import WorkItem, is_environment_fault
from tasks.engine.store import Failure
from tasks.media.cache import local_copy
from tasks.media.frame_jobs import VideoFrameJob, read_video_job

A = TypeVar("A")


def read_video_frames(uri: str, sampling: FrameSampling) -> SampledFrames:
    """The frames `sampling` takes across the whole video at `uri`."""
    with local_copy(uri) as path:
        return read_frames(str(path), sampling)


class FrameCache:
    """`read_video_frames` with the frames of recently read videos kept in memory, the least recently
    used dropped first once they pass `max_bytes` (a video larger than that is read and not kept).

    SFT shows a video once per question about it at every epoch (the sample: ~20 questions on each of 6
    videos), and reading is most of the input cost. `read(..., preprocess, budget)` keeps the frames
    resized as that model's preprocessing would (`models.video.presized_frames`): the resize is done
    once per video instead of once per question and step (on the sample: ~45 % of a step's input time,
    ~20 % of the tiny profile's SFT step), and a resized video (a few hundred pixels a side) takes a
    fraction of the decoded one's bytes. The cached arrays are read-only, so a caller that modified
    what it was given would fail loudly instead of changing the next caller's frames."""

    def __init__(self, max_bytes: int, read: Callable[[str, FrameSampling], SampledFrames] = read_video_frames):
        self.max_bytes = max_bytes
        self._read = read
        self._entries: OrderedDict[tuple, SampledFrames] = OrderedDict()
        self.bytes = 0
        self.hits = 0
        self.misses = 0

    def read(
        self, uri: str, sampling: FrameSampling, preprocess: VideoPreprocessConfig | None = None, budget: VideoTokenBudget | None = None
    ) -> SampledFrames:
        """The frames `sampling` takes from the video at `uri`; with `preprocess`, resized for that model under `budget`."""
        key = (uri, sampling, preprocess, budget)
        if key in self._entries:
            self._entries.move_to_end(key)
            self.hits += 1
            return self._entries[key]
        self.misses += 1
        sampled = self._read(uri, sampling)
        if preprocess is not None:
            sampled = presized_frames(sampled, preprocess, budget)
        size = sampled.frames.nbytes
        if size <= self.max_bytes:
            sampled.frames.setflags(write=False)
            self._entries[key] = sampled
            self.bytes += size
            while self.bytes > self.max_bytes:
                _, dropped = self._entries.popitem(last=False)
                self.bytes -= dropped.frames.nbytes
        return sampled

    def __len__(self) -> int:
        return len(self._entries)


def iter_frames_by_video(
    items: Sequence[WorkItem],
    sampling: FrameSampling,
    failures: list[Failure],
    prefetcher: Prefetcher | None = None,
    preprocess: VideoPreprocessConfig | None = None,
    budget: VideoTokenBudget | None = None,
) -> Iterator[tuple[WorkItem, SampledFrames]]:
    """Each item (payload `video_uri`, `video_id`) with the frames `sampling` takes from its video, read once per video (items
    of one video kept together, so a batch of them shares one encoding), lazily, video after video;
    failure rows for items whose video is unknown or unreadable are appended to `failures` as their
    video comes up. With a `prefetcher`, its workers read the next videos while the caller uses these
    (`preprocess` and `budget`: resize them as that model would); without, each is read when reached."""
    by_video: dict[str | None, list[WorkItem]] = {}
    for item in items:
        by_video.setdefault(item.payload["video_uri"], []).append(item)
    readable = [uri for uri in by_video if uri is not None]
    if prefetcher is None:
        reads = (lambda uri=uri: read_video_frames(uri, sampling) for uri in readable)
    else:
        jobs = (VideoFrameJob(uri, sampling, preprocess, budget) for uri in readable)
        reads = (future.result for future in prefetcher.map(read_video_job, jobs))
    for uri, group in by_video.items():
        if uri is None:
            failures += [Failure(it.item_id, "unknown_video", f"video {it.payload['video_id']} is not in clip/_videos") for it in group]
            continue
        read = next(reads)
        try:
            frames = read()
        except BrokenProcessPool:  # a worker died (killed, out of memory): the machine's fault, not the video's
            raise
        except Exception as exc:  # a missing or corrupt video fails its questions, not the shard
            if is_environment_fault(exc):
                raise
            failures += [Failure(it.item_id, "unreadable_video", f"{uri}: {type(exc).__name__}: {exc}") for it in group]
            continue
        yield from ((it, frames) for it in group)


def frames_by_video(items: Sequence[WorkItem], sampling: FrameSampling) -> tuple[list[tuple[WorkItem, SampledFrames]], list[Failure]]:
    """`iter_frames_by_video` read in line, whole: the items with their frames, and the failure rows."""
    failures: list[Failure] = []
    ready = list(iter_frames_by_video(items, sampling, failures))
    return ready, failures


def answer_in_batches(
    pairs: Iterator[tuple[WorkItem, SampledFrames]],
    batch_size: int,
    answer: Callable[[list[tuple[WorkItem, SampledFrames]]], list[A]],
    prefetcher: Prefetcher,
) -> tuple[list[tuple[WorkItem, SampledFrames]], list[A]]:
    """`answer` over `batch_size` items at a time as their frames arrive from `iter_frames_by_video`:
    the same batches a model would make of the whole list (so the same sampling seeds), while the
    prefetcher's workers read the next videos. A dead worker closes the pool (the next shard starts a
    fresh one) and fails the shard: the machine's fault, not the items'."""
    ready: list[tuple[WorkItem, SampledFrames]] = []
    answers: list[A] = []
    try:
        while batch := list(islice(pairs, batch_size)):
            ready += batch
            answers += answer(batch)
    except BrokenProcessPool:
        prefetcher.close()
        raise
    finally:
        pairs.close()
    return ready, answers

