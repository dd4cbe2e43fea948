"""The one stage list: every place that enumerates stages agrees with `tasks.stages.STAGES`."""

from __future__ import annotations

import yaml

from flows.cli import _parser, main
from flows.pipeline import STAGE_FLOWS
from tasks.config import PipelineConfig, StageName
from tasks.stages import STAGE_NAMES, STAGES, TRAINING_STAGES, get_stage
from tasks.training.stage import TrainingStage
from tests.support.paths import REPO


def test_each_entry_loads_the_stage_it_names():
    for spec in STAGES:
        stage = get_stage(spec.name)
        assert stage.name == spec.name
        assert isinstance(stage, TrainingStage) == spec.trains == (spec.name in TRAINING_STAGES)
        assert all(upstream in STAGE_NAMES[: STAGE_NAMES.index(spec.name)] for upstream in stage.inputs)


def test_config_flows_and_cli_derive_from_the_list():
    assert [s.value for s in StageName] == list(STAGE_NAMES)
    assert list(STAGE_FLOWS) == list(STAGE_NAMES)
    assert [flow.name for flow in STAGE_FLOWS.values()] == [f"lvr-{name}" for name in STAGE_NAMES]
    assert all(name in PipelineConfig.model_fields for name in STAGE_NAMES)
    run = _parser()._subparsers._group_actions[0].choices["run"]
    choices = {action.dest: action.choices for action in run._actions if action.dest in ("from_stage", "to_stage")}
    assert choices == {"from_stage": STAGE_NAMES, "to_stage": STAGE_NAMES}


def test_lvr_stages_lists_them_in_order(capsys):
    assert main(["stages"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[1] for line in lines] == list(STAGE_NAMES)
    assert all(spec.description in line for spec, line in zip(STAGES, lines))


def test_prefect_yaml_has_one_deployment_per_stage():
    deployments = yaml.safe_load((REPO / "prefect.yaml").read_text())["deployments"]
    per_stage = {d["name"]: d["entrypoint"] for d in deployments if d["entrypoint"] != "flows.pipeline.lvr_pipeline"}
    assert per_stage == {f"lvr-{name}": f"flows.pipeline.{name}_flow" for name in STAGE_NAMES}
