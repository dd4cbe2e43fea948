"""The one way to read a video's frames by URI: the frame sampling of `models.video.read_frames`
over the whole video, local or remote (through the media cache)."""

from __future__ import annotations

from collections.abc import Sequence

from models.video import FrameSampling, SampledFrames, read_frames
from tasks.engine.stage import WorkItem, is_environment_fault
from tasks.engine.store import Failure
from tasks.media.cache import local_copy


def read_video_frames(uri: str, sampling: FrameSampling) -> SampledFrames:
    """The frames `sampling` takes across the whole video at `uri`."""
    with local_copy(uri) as path:
        return read_frames(str(path), sampling)


def frames_by_video(items: Sequence[WorkItem], sampling: FrameSampling) -> tuple[list[tuple[WorkItem, SampledFrames]], list[Failure]]:
    """Each item (payload `video_uri`, `video_id`) with the frames `sampling` takes from its video, read once per video (items
    of one video kept together, so a batch of them shares one encoding), and failure rows for items
    whose video is unknown or unreadable."""
    failures: list[Failure] = []
    by_video: dict[str | None, list[WorkItem]] = {}
    for item in items:
        by_video.setdefault(item.payload["video_uri"], []).append(item)
    ready: list[tuple[WorkItem, SampledFrames]] = []
    for uri, group in by_video.items():
        if uri is None:
            failures += [Failure(it.item_id, "unknown_video", f"video {it.payload['video_id']} is not in clip/_videos") for it in group]
            continue
        try:
            frames = read_video_frames(uri, sampling)
        except Exception as exc:  # a missing or corrupt video fails its questions, not the shard
            if is_environment_fault(exc):
                raise
            failures += [Failure(it.item_id, "unreadable_video", f"{uri}: {type(exc).__name__}: {exc}") for it in group]
            continue
        ready += [(it, frames) for it in group]
    return ready, failures
