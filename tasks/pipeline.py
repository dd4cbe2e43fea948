"""The DAG from the stage list: which stages a run executes, on which source.

The engine (`tasks.engine`) runs any stages it is given; this module names them from
`tasks.stages` and resolves the source, for the flows, the CLI and the tests alike.
"""

from __future__ import annotations

from collections.abc import Sequence

from tasks.config import PipelineConfig
from tasks.engine.run import run_stage
from tasks.engine.runs import RunRecord, StageObserver, StageRunner, run_stages
from tasks.engine.stage import StageContext, StageReport
from tasks.engine.store import Workdir
from tasks.preflight.checks import preflight
from tasks.samples.videos import built_in_sample
from tasks.stages import STAGE_NAMES, get_stage


def resolve_source(source: str | None, config: PipelineConfig, stages: Sequence[str]) -> str | None:
    """The explicit source, else the config's, else the built-in sample (generated on first use).

    Only clip reads a source: a run of later stages gets None rather than the sample written for
    nothing (10 minutes of video, most of a minute of ffmpeg on 2 cores)."""
    given = source or config.source
    if given or "clip" not in stages:
        return given
    return str(built_in_sample())


def select_stages(from_stage: str | None = None, to_stage: str | None = None) -> list[str]:
    first = STAGE_NAMES.index(from_stage) if from_stage else 0
    last = STAGE_NAMES.index(to_stage) if to_stage else len(STAGE_NAMES) - 1
    if first > last:
        raise ValueError(f"--from {from_stage} comes after --to {to_stage}; stages run in order {' > '.join(STAGE_NAMES)}")
    return list(STAGE_NAMES[first : last + 1])


def run_stage_by_name(name: str, ctx: StageContext) -> StageReport:
    return run_stage(get_stage(name), ctx)


def run_pipeline(
    workdir: Workdir,
    config: PipelineConfig,
    source: str | None = None,
    from_stage: str | None = None,
    to_stage: str | None = None,
    run_id: str | None = None,
    stage_runner: StageRunner = run_stage_by_name,
    on_stage_done: StageObserver | None = None,
) -> RunRecord:
    """Check the config for the stages from `from_stage` to `to_stage` (`lvr check`: raises
    `PreflightError` before anything runs), then run them in order; stop at the first failure, recording it."""
    stages = select_stages(from_stage, to_stage)
    preflight(config, stages, workdir=workdir.url, source=source)
    return run_stages(workdir, config, stages, stage_runner, source, run_id, on_stage_done)
