"""The eval stage through the real engine: filter/ (and sft/ when trained) in; eval/, eval/_summary/,
report/eval.md and its charts out. The tiny model answers for real; majority voting and model
bookkeeping are checked on scripted answers."""

from __future__ import annotations

import base64
import os
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest

from data_schemas import EVAL_ITEMS, EVAL_SUMMARY, FILTER, TRAIN_METRICS
from models.vlm import Generation
from tasks.config import ConfigError, load_config
from tasks.engine.run import run_stage
from tasks.engine.stage import StageContext
from tasks.engine.store import Workdir
from tasks.eval.stage import EvalStage, eval_examples, resolve_models
from tasks.grading.answers import AnswerKey, accuracy_reward, grade, normalize_answer
from tests.support.eval_workdir import EXPECTED_PER_CATEGORY, eval_workdir, sft_metrics
from tests.support.stand_ins import Published

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    return eval_workdir(tmp_path_factory)


def test_tiny_model_answers_the_eval_split_and_the_summary_counts_each_category(built):
    assert built.report.status == "done"
    items = pd.read_parquet(built.root / "eval")
    assert list(items.columns) == EVAL_ITEMS.columns
    # Four good eval questions at 4 frames and at the swept 2; sft has no model yet, so base only.
    assert len(items) == 8 and set(items.model) == {"base"} and sorted(set(items.num_frames)) == [2, 4]
    assert set(items.qa_id) == {"e0", "e1", "e2", "e3"} and (items.frames_used == items.num_frames).all()
    assert (items.samples == 1).all() and (items.response_length <= 16).all()

    keys = {r["qa_id"]: AnswerKey.from_row(r) for r in built.filter_rows}
    for row in pq.read_table(built.root / "eval").to_pylist():  # pandas would turn a null prediction into NaN
        assert row["correct"] == (accuracy_reward(row["response"], keys[row["qa_id"]]) == 1.0)
        # One sample: its own grade's prediction, unless that is no answer at all (an open-ended
        # prediction that normalises to nothing casts no vote, so the row has none).
        predicted = grade(row["response"], keys[row["qa_id"]]).predicted
        if predicted is not None and row["question_type"] == "open_ended" and not normalize_answer(predicted):
            predicted = None
        assert row["prediction"] == predicted

    summary = pd.read_parquet(built.root / "eval" / "_summary")
    assert list(summary.columns) == EVAL_SUMMARY.columns
    for frames in (2, 4):
        cell = summary[(summary.model == "base") & (summary.num_frames == frames)].set_index("category")
        assert list(cell.index) == ["Temporal", "Goal and Purpose", "Spatial", "Overall"]
        assert cell["n"].drop("Overall").to_dict() == EXPECTED_PER_CATEGORY and cell.loc["Overall", "n"] == 4
        answered = items[items.num_frames == frames]
        assert cell["correct"].drop("Overall").to_dict() == answered.groupby("category")["correct"].sum().to_dict()
        assert cell.loc["Overall", "correct"] == answered["correct"].sum()
        assert (cell["accuracy"] == cell["correct"] / cell["n"]).all()

    failures = pd.read_parquet(built.root / "eval" / "_failures.parquet").set_index("item_id")
    assert built.report.failures == 4
    for frames in ("00002", "00004"):
        assert failures.loc[f"base::{frames}::x-bad-answer", "error_kind"] == "bad_item"
        assert failures.loc[f"base::{frames}::x-gone", "error_kind"] == "unreadable_video"

    manifest = built.report.manifest
    assert set(manifest["input_fingerprints"]) == {"filter"}  # sft/ is complete but has no model
    assert len(manifest["config"]["skipped"]) == 1 and manifest["config"]["skipped"][0].startswith("sft: skipped")

    report_dir = built.root / "report"
    for png in ("eval_accuracy.png", "eval_frames.png"):
        data = (report_dir / png).read_bytes()
        assert data.startswith(PNG) and len(data) > 2000
    markdown = (report_dir / "eval.md").read_text()
    assert "| base | 4 |" in markdown and "Overall" in markdown and "sft: skipped" in markdown
    # Chance over the 4 questions scored (3 multiple-choice of 4 options, 1 open-ended): 0.75 / 4.
    assert "scores 18.8% overall" in markdown
    artifact = built.stage.report_markdown(built.ctx, manifest)
    assert base64.b64decode(artifact.split("](data:image/png;base64,", 1)[1].split(")", 1)[0]).startswith(PNG)
    table = built.stage.report_table(built.ctx, manifest)
    assert [(r["model"], r["frames"]) for r in table] == [("base", "2"), ("base", "4")] and "Overall" in table[0]

    assert run_stage(EvalStage(), built.ctx).status == "cached"


# ------------------------------------------------------------------------------------------------
# Majority vote, trained models appearing and being retrained (scripted answers)
# ------------------------------------------------------------------------------------------------
RIGHT = "<think>At 00:01 it moves.</think><answer>{}</answer>"
SCRIPTS = {
    "base": {
        "e0": [RIGHT.format("B"), RIGHT.format("C"), RIGHT.format("B")],  # B by 2 of 3: right
        "e1": ["<answer>a red car</answer>", RIGHT.format("Blue car!"), RIGHT.format("the blue car")],  # same normalised answer
        "e2": ["I cannot tell.", "no idea", "hmm"],  # no sample has an answer
        "e3": [RIGHT.format("A"), RIGHT.format("C"), "nothing"],  # a tie goes to the answer given first: A, wrong
    },
    "sft": {q: [RIGHT.format(a)] * 3 for q, a in (("e0", "B"), ("e1", "blue car"), ("e2", "A"), ("e3", "C"))},
}


class ScriptedAnswerer:
    def __init__(self, script: dict[str, list[str]]) -> None:
        self.script = script

    def answer(self, requests):
        return [[Generation(t, 50, len(t.split()), 3, True) for t in self.script[r.qa_id]] for r in requests]


class ScriptedEvalStage(EvalStage):
    def __init__(self) -> None:
        super().__init__()
        self.loads: list[str] = []

    def load_answerer(self, ctx, model):
        self.loads.append(model.label)
        return ScriptedAnswerer(SCRIPTS[model.label])


def test_majority_vote_and_models_that_appear_or_are_retrained(tmp_path, built):
    config = {"eval.models": ["base", "sft"], "eval.num_frames": 2, "eval.samples": 3, "eval.shard_size": 2}
    ctx = StageContext(Workdir(str(tmp_path / "wd")), load_config("tiny", config))
    run_stage(Published("filter", FILTER, built.filter_rows[:5]), ctx)  # the good items and the sft one

    first = ScriptedEvalStage()
    assert run_stage(first, ctx).rows == 4 and first.loads == ["base"]
    rows = {r["qa_id"]: r for r in pq.read_table(tmp_path / "wd" / "eval").to_pylist()}
    verdicts = {q: (r["prediction"], r["correct"], r["votes"], r["n_correct"]) for q, r in rows.items()}
    assert verdicts == {"e0": ("B", True, 2, 2), "e1": ("Blue car!", True, 2, 2), "e2": (None, False, 0, 0), "e3": ("A", False, 1, 1)}
    assert rows["e1"]["response"] == RIGHT.format("Blue car!") and rows["e1"]["format_ok"]
    assert rows["e2"]["response"] == "I cannot tell." and not rows["e2"]["format_ok"]

    # sft trains: only its items are computed, base answers are reused.
    run_stage(Published("sft", TRAIN_METRICS, sft_metrics()), ctx)
    (tmp_path / "wd" / "sft" / "model").mkdir()
    second = ScriptedEvalStage()
    report = run_stage(second, ctx)
    assert report.status == "done" and report.manifest["items_computed"] == 4 and second.loads == ["sft"]
    assert set(report.manifest["input_fingerprints"]) == {"filter", "sft"}
    summary = pd.read_parquet(tmp_path / "wd" / "eval" / "_summary")
    overall = summary[summary.category == "Overall"].set_index("model")["accuracy"]
    assert list(overall.index) == ["base", "sft"] and overall.to_dict() == {"base": 0.5, "sft": 1.0}
    # Paired on the 4 questions: sft right on 2 that base misses (differences 0, 0, 1, 1; the interval
    # 0.5 +- 1.96 * sqrt(1/3) / 2, clipped at +100 points).
    assert "| sft - base | 2 | 4 | +50.0 [-6.6, +100.0] | sft 2, base 0 | within noise |" in (tmp_path / "wd" / "report" / "eval.md").read_text()

    # sft retrains (a new sft fingerprint): sft's items again, nothing else.
    run_stage(Published("sft", TRAIN_METRICS, sft_metrics()[:-4]), ctx)
    third = ScriptedEvalStage()
    report = run_stage(third, ctx)
    assert report.status == "done" and report.manifest["items_computed"] == 4 and third.loads == ["sft"]
    assert run_stage(ScriptedEvalStage(), ctx).status == "cached"


# ------------------------------------------------------------------------------------------------
# Pure pieces
# ------------------------------------------------------------------------------------------------
def test_eval_examples_take_the_eval_split_only(built):
    examples = eval_examples(built.filter_rows)
    assert [e.qa_id for e in examples] == ["e0", "e1", "e2", "e3", "x-bad-answer", "x-gone"]
    assert examples[1].options is None and examples[0].prompt == built.filter_rows[0]["prompt"]


def test_explicit_checkpoint_folders_change_identity_when_rewritten(tmp_path):
    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"1")
    cfg = load_config("tiny", {"eval.models": [str(folder), "grpo"]}).eval
    wd = Workdir(str(tmp_path / "wd"))
    (model,), notes = resolve_models(wd, cfg, "tiny")
    assert model.path == str(folder) and notes[0].startswith("grpo: skipped")
    (folder / "model.safetensors").write_bytes(b"22")
    os.utime(folder / "model.safetensors", ns=(1, 1))
    assert resolve_models(wd, cfg, "tiny")[0][0].identity != model.identity


def test_eval_config_validation():
    cfg = load_config("tiny", {"eval.num_frames": 8, "eval.frames_sweep": [32, 4, 8]}).eval
    assert cfg.frame_counts == [4, 8, 32]
    with pytest.raises(ConfigError, match="more than once"):
        load_config("tiny", {"eval.models": ["base", "base"]})
    with pytest.raises(ConfigError, match="frames_sweep"):
        load_config("tiny", {"eval.frames_sweep": [0]})
    with pytest.raises(ConfigError, match="at least one"):
        load_config("tiny", {"eval.models": []})


def test_a_model_that_cannot_load_stops_the_stage_with_its_name(tmp_path, built):
    from tasks.engine.stage import StageError

    ctx = StageContext(Workdir(str(tmp_path / "wd")), load_config("tiny", {"eval.models": [str(Path(tmp_path / "no-such-model"))]}))
    run_stage(Published("filter", FILTER, built.filter_rows[:1]), ctx)
    with pytest.raises(StageError, match="cannot load model"):
        run_stage(EvalStage(), ctx)
    assert not (tmp_path / "wd" / "eval" / "_manifest.json").exists()
