"""The eval stage grades open-ended answers with the LLM judge, through the OpenAI-protocol test server,
as filter and GRPO do: the judge's verdict replaces normalised matching; a judge failure is a failure
row (or a failed shard, or a stopped stage), never the exact-match verdict."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow.parquet as pq
import pytest

from data_schemas import FILTER
from models.openai_client import ChatRequestError
from models.vlm import Generation
from tasks.config import load_config
from tasks.engine.run import run_stage
from tasks.engine.stage import StageContext, StageError
from tasks.engine.store import Workdir
from tasks.eval.stage import EvalStage
from tasks.grading.answers import AnswerKey, grade
from tests.support.eval_workdir import filter_row
from tests.support.openai_server import Fault, OpenAITestServer, Reply
from tests.support.stand_ins import Published
from tests.support.videos import make_video

JUDGE_KEY_ENV = "LVR_TEST_EVAL_JUDGE_KEY"
RIGHT = "<think>At 00:01 it moves.</think><answer>{}</answer>"
# What the model answers: right in other words (the judge says yes), wrong, and a multiple-choice letter.
ANSWERS = {"e-mc": "B", "e-open": "the car that is blue", "e-other": "a bus coloured red"}


@pytest.fixture(scope="module")
def video(tmp_path_factory) -> str:
    return str(make_video(tmp_path_factory.mktemp("eval-judge") / "a.mp4", 2, audio=False))


def filter_rows(uri: str) -> list[dict[str, Any]]:
    return [
        filter_row("e-mc", "va", uri, "Temporal", "multiple_choice", "B"),
        filter_row("e-open", "va", uri, "Spatial", "open_ended", "the blue car"),
        filter_row("e-other", "va", uri, "Spatial", "open_ended", "the blue car"),
    ]


class ScriptedAnswerer:
    def answer(self, requests):
        return [[Generation(RIGHT.format(ANSWERS[r.qa_id]), 50, 8, 3, True)] for r in requests]


class ScriptedEvalStage(EvalStage):
    def load_answerer(self, ctx, model):
        return ScriptedAnswerer()


def judge_says_yes_to_the_blue_car(info) -> Reply:
    return Reply("<think>same vehicle</think>yes" if "car that is blue" in info.text else "no")


def workdir(root: Path, uri: str, server: OpenAITestServer, **overrides: Any) -> StageContext:
    config = {
        "eval.models": ["base"], "eval.num_frames": 2, "eval.shard_size": 8,
        "judge.model": "judge-llm", "judge.base_url": server.base_url, "judge.api_key_env": JUDGE_KEY_ENV, "judge.max_retries": 1,
        **overrides,
    }
    ctx = StageContext(Workdir(str(root)), load_config("tiny", config))
    run_stage(Published("filter", FILTER, filter_rows(uri)), ctx)
    return ctx


def eval_rows(root: Path) -> dict[str, dict[str, Any]]:
    return {r["qa_id"]: r for r in pq.read_table(root / "eval").to_pylist()}


def overall(root: Path) -> tuple[int, int]:
    summary = pd.read_parquet(root / "eval" / "_summary").set_index("category")
    return int(summary.loc["Overall", "n"]), int(summary.loc["Overall", "correct"])


def test_the_judge_decides_open_ended_answers_exact_match_calls_wrong(tmp_path, video, monkeypatch):
    monkeypatch.setenv(JUDGE_KEY_ENV, "sk-judge")
    key = AnswerKey.from_row(filter_rows(video)[1])
    assert not grade(RIGHT.format(ANSWERS["e-open"]), key).correct  # exact match alone calls it wrong

    with OpenAITestServer(judge_says_yes_to_the_blue_car, api_key="sk-judge") as server:
        report = run_stage(ScriptedEvalStage(), workdir(tmp_path / "wd", video, server))
        assert report.status == "done" and report.rows == 3 and report.failures == 0
        assert server.total_requests == 2 and {r.body["model"] for r in server.requests} == {"judge-llm"}  # multiple choice never asks
    rows = eval_rows(tmp_path / "wd")
    assert {q: (r["prediction"], r["correct"], r["grader"]) for q, r in rows.items()} == {
        "e-mc": ("B", True, "choice"), "e-open": ("the car that is blue", True, "judge"), "e-other": ("a bus coloured red", False, "judge"),
    }
    assert overall(tmp_path / "wd") == (3, 2)
    assert "decided by the LLM judge judge-llm" in (tmp_path / "wd" / "report" / "eval.md").read_text()


def test_the_judge_model_keys_the_stage_but_its_endpoint_does_not(tmp_path, video, monkeypatch):
    monkeypatch.setenv(JUDGE_KEY_ENV, "sk-judge")
    root = tmp_path / "wd"
    first = OpenAITestServer(judge_says_yes_to_the_blue_car, api_key="sk-judge")
    moved = OpenAITestServer(lambda info: Reply("no"), api_key="sk-judge")
    with first, moved:
        done = run_stage(ScriptedEvalStage(), workdir(root, video, first))
        assert done.status == "done" and done.manifest["config"]["judge"]["model"] == "judge-llm"

        # Another endpoint serving the same judge, more concurrency or retries: the finished stage stands.
        same = {"judge.base_url": moved.base_url, "judge.concurrency": 2, "judge.max_retries": 3, "judge.timeout_s": 5}
        assert run_stage(ScriptedEvalStage(), workdir(root, video, first, **same)).status == "cached"
        assert moved.total_requests == 0

        # Another judge: its verdicts are the rows, so every answer is graded again.
        again = run_stage(ScriptedEvalStage(), workdir(root, video, first, **same, **{"judge.model": "judge-2"}))
        assert again.status == "done" and again.manifest["fingerprint"] != done.manifest["fingerprint"]
        assert moved.total_requests == 2 and {r.body["model"] for r in moved.requests} == {"judge-2"}
        assert not eval_rows(root)["e-open"]["correct"]

        # No judge: normalised matching only, and a fingerprint of its own.
        plain = run_stage(ScriptedEvalStage(), workdir(root, video, first, **{"judge.model": None}))
        assert plain.status == "done" and "judge" not in plain.manifest["config"] and first.total_requests == 2
    assert {r["grader"] for q, r in eval_rows(root).items() if q != "e-mc"} == {"match"}


def test_a_judge_outage_fails_the_shard_instead_of_recording_verdicts(tmp_path, video, monkeypatch):
    """An unreachable judge is no verdict on the item: no row, no failure row to reuse; the rerun judges."""
    monkeypatch.setenv(JUDGE_KEY_ENV, "sk-judge")
    down = {"on": True}
    with OpenAITestServer(
        judge_says_yes_to_the_blue_car, faults=lambda info: Fault.server_error(503) if down["on"] else None, api_key="sk-judge"
    ) as server:
        ctx = workdir(tmp_path / "wd", video, server)
        with pytest.raises(ChatRequestError, match="503"):
            run_stage(ScriptedEvalStage(), ctx)
        assert not (tmp_path / "wd" / "eval" / "_manifest.json").exists()
        down["on"] = False
        report = run_stage(ScriptedEvalStage(), ctx)  # no --retry-failures needed
    assert report.status == "done" and report.rows == 3 and report.failures == 0
    assert eval_rows(tmp_path / "wd")["e-open"]["correct"] and overall(tmp_path / "wd") == (3, 2)


def test_a_request_the_judge_refuses_is_a_failure_row_not_an_exact_match_verdict(tmp_path, video, monkeypatch):
    monkeypatch.setenv(JUDGE_KEY_ENV, "sk-judge")

    def refuse_the_bus(info):
        return Fault(status=400, message="content policy") if "bus coloured red" in info.text else None

    with OpenAITestServer(judge_says_yes_to_the_blue_car, faults=refuse_the_bus, api_key="sk-judge") as server:
        report = run_stage(ScriptedEvalStage(), workdir(tmp_path / "wd", video, server))
    assert report.status == "done" and report.rows == 2 and report.failures == 1
    assert set(eval_rows(tmp_path / "wd")) == {"e-mc", "e-open"}
    failure = pd.read_parquet(tmp_path / "wd" / "eval" / "_failures.parquet").set_index("item_id").loc["base::00002::e-other"]
    assert (failure.error_kind, failure.failure_class) == ("judge_http_400", "request") and "content policy" in failure.message
    assert overall(tmp_path / "wd") == (2, 2)  # the summary counts judged items only


def test_a_judge_that_refuses_us_stops_the_stage(tmp_path, video, monkeypatch):
    monkeypatch.setenv(JUDGE_KEY_ENV, "sk-judge")
    # Every request refused (a parameter the endpoint does not take): misconfigured, nothing published.
    refuse = Fault(status=400, message="unknown parameter")
    with OpenAITestServer(judge_says_yes_to_the_blue_car, faults=lambda info: refuse, api_key="sk-judge") as server, pytest.raises(
        StageError, match=r"eval: every request to the judge failed \(2 items; first: .*400"
    ):
        run_stage(ScriptedEvalStage(), workdir(tmp_path / "wd", video, server))
    assert not (tmp_path / "wd" / "eval" / "_manifest.json").exists()

    # A wrong key: the endpoint refuses us, so the stage stops at the first answer.
    wrong_key = OpenAITestServer(judge_says_yes_to_the_blue_car, api_key="another-key")
    with wrong_key, pytest.raises(StageError, match="eval: the judge endpoint refused the request"):
        run_stage(ScriptedEvalStage(), workdir(tmp_path / "wd2", video, wrong_key))
    assert not (tmp_path / "wd2" / "eval" / "_manifest.json").exists()
