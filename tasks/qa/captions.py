"""A video as the QA stage sees it: its clips' time ranges and captions, and how times are written."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

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


def mmss(seconds: float) -> str:
    """MM:SS as in the paper's prompts; minutes keep counting past 59 (long videos: 75:10)."""
    total = int(round(seconds))
    return f"{total // 60:02d}:{total % 60:02d}"


def time_range(start_s: float, end_s: float) -> str:
    return f"{mmss(start_s)}-{mmss(end_s)}"


def one_line(text: str) -> str:
    return _SPACE.sub(" ", text).strip()


def caption_lines(video: VideoCaptions) -> str:
    """The model's whole view of the video: `From MM:SS to MM:SS: caption`, one clip a line."""
    return "\n".join(f"From {mmss(c.start_s)} to {mmss(c.end_s)}: {c.caption}" for c in video.clips)


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
