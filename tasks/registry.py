"""Which `Stage` implements each DAG stage."""

from __future__ import annotations

from collections.abc import Callable

from tasks.config import STAGE_ORDER
from tasks.stage import Stage, StageNotImplemented

# The issue that builds each stage not implemented yet, named in the error users see.
PENDING_ISSUES: dict[str, int] = {}


def _clip() -> Stage:
    from tasks.clip import ClipStage

    return ClipStage()


def _caption() -> Stage:
    from tasks.caption import CaptionStage

    return CaptionStage()


def _qa() -> Stage:
    from tasks.qa.stage import QAStage

    return QAStage()


def _filter() -> Stage:
    from tasks.filter import FilterStage

    return FilterStage()


def _sft() -> Stage:
    from tasks.sft.stage import SFTStage

    return SFTStage()


def _grpo() -> Stage:
    from tasks.grpo.stage import GRPOStage

    return GRPOStage()


def _eval() -> Stage:
    from tasks.eval import EvalStage

    return EvalStage()


STAGE_FACTORIES: dict[str, Callable[[], Stage]] = {
    "clip": _clip, "caption": _caption, "qa": _qa, "filter": _filter, "sft": _sft, "grpo": _grpo, "eval": _eval,
}


def is_implemented(name: str) -> bool:
    return name in STAGE_FACTORIES


def get_stage(name: str) -> Stage:
    if name not in STAGE_ORDER:
        raise KeyError(f"unknown stage {name!r}; stages: {', '.join(STAGE_ORDER)}")
    factory = STAGE_FACTORIES.get(name)
    if factory is None:
        issue = PENDING_ISSUES.get(name)
        raise StageNotImplemented(
            f"stage {name!r} is not implemented yet" + (f" (tracked in issue #{issue})" if issue else "")
            + "; nothing was written for it. Run with --to "
            + STAGE_ORDER[STAGE_ORDER.index(name) - 1]
            + " to stop before it."
        )
    return factory()
