"""A video as the QA stage sees it: its clips' time ranges and captions, and how times are written."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from tasks.media.timecode import mmss, time_range

_SPACE = re.compile(r"\s+")


@dataclass(frozen=True)
class Clip:
    clip_id: str
    start_s: float
    end_s: float
    caption: str

    @property
    def span(self) -> str:
        return time_range(self.start_s, self.end_s)


@dataclass(frozen=True)
class VideoCaptions:
    video_id: str
    clips: tuple[Clip, ...]  # in time order, captions non-empty

    @property
    def duration_s(self) -> float:
        return max((c.end_s for c in self.clips), default=0.0)


def one_line(text: str) -> str:
    return _SPACE.sub(" ", text).strip()


def caption_line(clip: Clip) -> str:
    return f"From {mmss(clip.start_s)} to {mmss(clip.end_s)}: {clip.caption}"


def caption_lines(video: VideoCaptions) -> str:
    """The model's whole view of the video: `From MM:SS to MM:SS: caption`, one clip a line."""
    return "\n".join(caption_line(c) for c in video.clips)


@dataclass(frozen=True)
class Window:
    """Consecutive clips `first` to `stop - 1` of a video: what one generation request is shown.

    A video whose captions fit one prompt is one window of all its clips (`whole`); a longer one is
    split (`tasks.qa.windows`). Questions record their window's index and time range.
    """

    video: VideoCaptions
    index: int
    first: int
    stop: int

    @classmethod
    def whole_video(cls, video: VideoCaptions) -> Window:
        return cls(video, 0, 0, len(video.clips))

    @property
    def whole(self) -> bool:
        return self.first == 0 and self.stop == len(self.video.clips)

    @property
    def clips(self) -> tuple[Clip, ...]:
        return self.video.clips[self.first : self.stop]

    @property
    def view(self) -> VideoCaptions:
        """The window as a video of its own clips (same id)."""
        return self.video if self.whole else VideoCaptions(self.video.video_id, self.clips)

    @property
    def start_s(self) -> float:
        return self.clips[0].start_s

    @property
    def end_s(self) -> float:
        return max(c.end_s for c in self.clips)


def videos_from_rows(rows: list[dict[str, Any]]) -> list[VideoCaptions]:
    """Caption rows grouped by video, clips in time order; blank captions dropped (nothing to ask about)."""
    by_video: dict[str, list[Clip]] = {}
    for row in rows:
        caption = one_line(row["caption"] or "")
        clips = by_video.setdefault(row["video_id"], [])
        if caption:
            clips.append(Clip(row["clip_id"], float(row["start_s"]), float(row["end_s"]), caption))
    return [
        VideoCaptions(video_id, tuple(sorted(clips, key=lambda c: (c.start_s, c.clip_id))))
        for video_id, clips in sorted(by_video.items())
    ]
