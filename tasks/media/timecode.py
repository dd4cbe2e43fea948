"""How times in a video are written for people and prompts: MM:SS, as in the paper's prompts."""

from __future__ import annotations


def mmss(seconds: float) -> str:
    """MM:SS as in the paper's prompts; minutes keep counting past 59 (long videos: 75:10)."""
    total = int(round(seconds))
    return f"{total // 60:02d}:{total % 60:02d}"


def time_range(start_s: float, end_s: float) -> str:
    return f"{mmss(start_s)}-{mmss(end_s)}"
