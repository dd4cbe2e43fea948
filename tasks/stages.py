"""The one stage list: every stage of the DAG, in execution order.

Everything that enumerates stages derives from `STAGES`: the config's stage enum, the CLI's
choices and `lvr stages`, the flows, multi-node training, eval's model keywords and the report;
a test checks that `prefect.yaml` has a deployment for each. Stages are named by class path and
imported only when used, so this list imports no stage. Adding a stage: one package under
`tasks/` and one line here.
"""

from __future__ import annotations

from dataclasses import dataclass

from tasks.engine.stage import Stage, load_stage


@dataclass(frozen=True)
class StageSpec:
    name: str
    class_path: str  # module:Class of its `Stage`
    description: str
    trains: bool = False  # writes a model under <workdir>/<name>/model (multi-node capable)


STAGES: tuple[StageSpec, ...] = (
    StageSpec("clip", "tasks.clip.stage:ClipStage", "probe source videos and cut ~10 s clips with ffmpeg, recording true boundaries"),
    StageSpec("caption", "tasks.caption.stage:CaptionStage", "describe each clip with a VLM"),
    StageSpec(
        "qa", "tasks.qa.stage:QAStage",
        "reasoning LLM writes questions with reasoning over all captions of a video, then refines the reasoning",
    ),
    StageSpec(
        "filter", "tasks.filter.stage:FilterStage",
        "answer each question N times with the base VLM; difficulty labels and SFT / RL / eval splits",
    ),
    StageSpec("sft", "tasks.sft.stage:SFTStage", "chain-of-thought SFT with multi-modal sequence parallelism", trains=True),
    StageSpec("grpo", "tasks.grpo.stage:GRPOStage", "GRPO with MR-SP (cached video embeddings, sequence-parallel prefill)", trains=True),
    StageSpec("eval", "tasks.eval.stage:EvalStage", "accuracy per reasoning category, charts and report"),
)

STAGE_NAMES: tuple[str, ...] = tuple(s.name for s in STAGES)
TRAINING_STAGES: tuple[str, ...] = tuple(s.name for s in STAGES if s.trains)


def stage_spec(name: str) -> StageSpec:
    for spec in STAGES:
        if spec.name == name:
            return spec
    raise KeyError(f"unknown stage {name!r}; stages: {', '.join(STAGE_NAMES)}")


def get_stage(name: str) -> Stage:
    return load_stage(stage_spec(name).class_path)
