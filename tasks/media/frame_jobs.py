"""The job of the processes that read a video's frames ahead of filter's and eval's model
(`tasks.media.frames.iter_frames_by_video`).

Kept light to import: a worker of a new `models.prefetch.Prefetcher` pool imports this module before
its first video, so it imports neither the config nor torch (`tasks.media.cache` does; only a remote
video needs it).
"""

from __future__ import annotations

from dataclasses import dataclass

from models.prefetch import FrameJob, read_resized_frames
from models.video import (
    FrameSampling,
    SampledFrames,
    VideoPreprocessConfig,
    VideoTokenBudget,
    read_frames,
)
from tasks.engine.store import is_local_uri, url_to_fs


@dataclass(frozen=True)
class VideoFrameJob:
    """One video to read; with `preprocess` (the model's), its frames come resized as that model's
    `preprocess_video` would resize them under `budget` (`models.prefetch.read_resized_frames`)."""

    uri: str
    sampling: FrameSampling
    preprocess: VideoPreprocessConfig | None = None
    budget: VideoTokenBudget | None = None


def _read(path: str, job: VideoFrameJob) -> SampledFrames:
    if job.preprocess is None:
        return read_frames(path, job.sampling)
    return read_resized_frames(FrameJob(path, job.sampling, job.preprocess, job.budget))


def read_video_job(job: VideoFrameJob) -> SampledFrames:
    """The frames `job.sampling` takes across the whole video at `job.uri`, as `read_video_frames` reads them."""
    if is_local_uri(job.uri):
        return _read(url_to_fs(job.uri)[1], job)
    from tasks.media.cache import local_copy

    with local_copy(job.uri) as path:
        return _read(str(path), job)
