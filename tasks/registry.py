"""Which `Stage` implements each DAG stage."""

from __future__ import annotations

from collections.abc import Callable

from tasks.config import STAGE_ORDER
from tasks.stage import Stage



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


def get_stage(name: str) -> Stage:
    if name not in STAGE_FACTORIES:
        raise KeyError(f"unknown stage {name!r}; stages: {', '.join(STAGE_ORDER)}")
    return STAGE_FACTORIES[name]()
