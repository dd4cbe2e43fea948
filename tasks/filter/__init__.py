"""Filter stage: the base model answers every question `filter.runs` times; difficulty labels, splits, exports."""

from tasks.filter.stage import FilterStage

__all__ = ["FilterStage"]
