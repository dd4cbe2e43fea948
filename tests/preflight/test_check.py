"""`lvr check` on the production profile and on the configs it must refuse, and `lvr run` refusing them
before clip starts (nothing is written)."""

from __future__ import annotations

import pytest

from flows.cli import main
from models.tiny import PRETRAIN_STEPS_ENV, TINY, TINY_CAPTIONER, default_tiny_dir, is_complete
from tasks.config import load_config
from tasks.pipeline import run_pipeline
from tasks.preflight.checks import check_config
from tasks.preflight.findings import PreflightError
from tasks.preflight.topology import valid_sp_degrees
from tasks.stages import STAGE_NAMES
from tasks.engine.store import Workdir

PRODUCTION = "longvila-r1"
SECRET = "sk-preflight-do-not-print-0123456789"
KEYS = {"DEEPSEEK_API_KEY": SECRET}


@pytest.fixture
def keys(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in KEYS.items():
        monkeypatch.setenv(name, value)


def test_production_profile_passes_and_prints_its_table(keys: None, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", "--config", PRODUCTION]) == 0
    out = capsys.readouterr().out
    assert SECRET not in out
    assert "Qwen/Qwen2.5-VL-7B-Instruct" in out and "8.29B" in out
    assert "grpo: memory per GPU" in out and "sft: memory per GPU" in out
    assert "lvr check: 0 error(s)" in out
    report = check_config(load_config(PRODUCTION), STAGE_NAMES, env=KEYS)
    assert not report.errors, report.render()
    assert {r.stage for r in report.tokens} == {"caption", "filter", "sft", "grpo", "eval"}
    assert all(r.fits for r in report.tokens)
    assert all(e.fits() for e in report.memory.values())


def test_sp_degree_that_does_not_divide_the_7b_heads_is_refused(keys: None, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", "--config", PRODUCTION, "--set", "grpo.sp_degree=8"]) == 2
    out = capsys.readouterr().out
    line = next(line for line in out.splitlines() if line.startswith("error: [grpo] grpo.sp_degree"))
    assert "sp_degree=8" in line and "28 attention heads" in line
    assert str(valid_sp_degrees(28, 8)) in line and valid_sp_degrees(28, 8) == [1, 2, 4]


def test_long_video_without_a_budget_is_refused_naming_stage_and_tokens(keys: None) -> None:
    cfg = load_config(PRODUCTION, ["eval.num_frames=2048", "eval.max_video_tokens=null", "eval.tokens_per_frame=null"])
    report = check_config(cfg, STAGE_NAMES, env=KEYS)
    row = max((r for r in report.tokens if r.stage == "eval"), key=lambda r: r.frames)
    assert row.frames == 2048 and not row.fits and row.total > row.context == 128_000
    [finding] = [f for f in report.errors if f.stage == "eval" and f.message.startswith("2048 frames")]
    assert finding.key == "eval.max_video_tokens"
    assert f"{row.total:,} tokens" in finding.message and "128,000" in finding.message
    assert {f.stage for f in report.errors} == {"eval"}  # training keeps its budget
    assert main(["check", "--config", PRODUCTION, "--set", "eval.num_frames=2048", "--set", "eval.max_video_tokens=null",
                 "--set", "eval.tokens_per_frame=null"]) == 2


def test_8192_frames_pass_on_the_production_topology_with_the_budget(keys: None) -> None:
    cfg = load_config(PRODUCTION, ["eval.num_frames=8192"])
    report = check_config(cfg, STAGE_NAMES, env=KEYS)
    assert not report.errors, report.render()
    assert max(r.frames for r in report.tokens if r.stage == "eval") == 8192


def test_missing_key_variable_is_named_not_its_value(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.delenv("DEEPSEEK_API_KEY", raising=False)
    monkeypatch.setenv("UNRELATED_SECRET", SECRET)
    assert main(["check", "--config", PRODUCTION]) == 2
    out = capsys.readouterr().out
    assert "error: [qa] DEEPSEEK_API_KEY" in out and "qa.api_key_env" in out
    assert SECRET not in out


def test_lvr_run_refuses_before_clip_starts(keys: None, tmp_path, capsys: pytest.CaptureFixture[str]) -> None:
    workdir = tmp_path / "wd"
    code = main(["run", "--config", PRODUCTION, "--set", "grpo.sp_degree=8", "--workdir", str(workdir), "--engine", "local",
                 "--source", str(tmp_path)])
    assert code == 2
    err = capsys.readouterr().err
    assert "grpo.sp_degree" in err and "nothing ran" in err
    assert not workdir.exists()
    with pytest.raises(PreflightError, match="grpo.sp_degree"):
        run_pipeline(Workdir(str(workdir)), load_config(PRODUCTION, ["grpo.sp_degree=8"]), source=str(tmp_path))
    assert not workdir.exists()


def test_grpo_from_sft_without_an_sft_model_is_refused(tmp_path) -> None:
    cfg = load_config("tiny")
    report = check_config(cfg, ["grpo"], workdir=str(tmp_path / "wd"))
    assert [f.key for f in report.errors] == ["grpo.model"]
    assert "grpo.model=base" in report.errors[0].message
    assert not check_config(load_config("tiny", ["grpo.model=base"]), ["grpo"], workdir=str(tmp_path / "wd")).errors


def test_unknown_model_architecture_names_the_key_and_the_remedy() -> None:
    report = check_config(load_config("tiny", ["sft.model=someone/unknown-model"]), ["sft"])
    [finding] = report.errors
    assert finding.key == "sft.model" and "lvr models architecture someone/unknown-model" in finding.message


def test_tiny_profile_passes_without_pretraining_its_captioner(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    # The full recipe: a check that built the captioner would pretrain for minutes here.
    monkeypatch.setenv("LVR_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv(PRETRAIN_STEPS_ENV, raising=False)
    config = load_config("tiny")
    assert config.caption.model == TINY_CAPTIONER
    report = check_config(config, STAGE_NAMES)
    assert not report.errors, report.render()
    assert report.memory["sft"].total_bytes > 0
    # Described by the random-weight build it starts from, which is all a check needs.
    assert is_complete(default_tiny_dir(TINY)) and not default_tiny_dir(TINY_CAPTIONER).exists()
    [caption] = [m for m in report.models if m.stage == "caption"]
    assert caption.ref == TINY_CAPTIONER and caption.architecture.num_heads > 0


def test_probe_sends_one_tiny_request_to_each_endpoint(monkeypatch: pytest.MonkeyPatch) -> None:
    from tests.support.openai_server import OpenAITestServer, Reply

    monkeypatch.setenv("LVR_PROBE_KEY", SECRET)
    with OpenAITestServer(lambda info: Reply("ok"), api_key=SECRET) as server:
        cfg = load_config("tiny", ["qa.backend=openai", f"qa.base_url={server.base_url}", "qa.api_key_env=LVR_PROBE_KEY"])
        assert not check_config(cfg, ["qa"], probe=True).errors
        assert len(server.requests) == 1 and server.requests[0].body["max_tokens"] == 1
        url = server.base_url
    report = check_config(cfg, ["qa"], probe=True)  # the server is gone
    [finding] = report.errors
    assert finding.key == "qa.base_url" and url in finding.message and SECRET not in finding.message


def test_an_unreachable_endpoint_url_or_an_unset_one_is_an_error() -> None:
    cfg = load_config("tiny", ["qa.backend=openai", "judge.model=judge"])
    keys = {f.key for f in check_config(cfg, ["qa", "filter"]).errors}
    assert keys == {"qa.base_url", "judge.base_url"}


def test_workdir_and_source_are_checked(tmp_path) -> None:
    blocked = tmp_path / "file"
    blocked.write_text("not a folder")
    report = check_config(load_config("tiny"), ["clip"], workdir=str(blocked / "wd"), source=str(tmp_path / "missing"))
    assert {f.key for f in report.errors} == {"--workdir", "--source"}
    assert not check_config(load_config("tiny"), ["clip"], workdir=str(tmp_path / "new" / "wd"), source=str(tmp_path)).errors


def test_a_stage_flow_run_alone_is_checked_before_it_starts(tmp_path) -> None:
    """A stage deployment run from the UI gets the same check as the pipeline (here: the flow's body)."""
    from flows.pipeline import grpo_flow

    with pytest.raises(PreflightError, match="grpo.model is 'sft'"):
        grpo_flow.fn(workdir=str(tmp_path / "wd"), config="tiny", source=str(tmp_path))
    assert not (tmp_path / "wd" / "grpo").exists()
