"""The filter stage end to end through the real engine: qa/ and clip/_videos in; filter/, its rollouts,
exports and report out.

Upstream tables are published by stand-in stages run with `run_stage`, so the filter stage reads
genuine `qa/` and `clip/` directories and manifests; videos are real files. Labels are checked on
scripted answers (a sampler that replays chosen responses), the model path with the tiny model.
"""

from __future__ import annotations

import base64
import json
from collections import Counter
from pathlib import Path
from typing import Any

import datasets
import jinja2
import pandas as pd
import pyarrow as pa
import pytest

from data_schemas import CLIPS, FILTER, FILTER_ROLLOUTS, QA, VIDEOS, TableSchema
from models.vlm import Generation
from tasks.config import load_config
from tasks.engine.run import run_stage
from tasks.engine.stage import ShardResult, Stage, StageContext, StageError, WorkItem
from tasks.engine.store import Workdir, stable_hash
from tasks.filter.rollouts import RolloutRequest
from tasks.filter.stage import FilterStage
from tasks.grading.prompts import user_prompt
from tests.support.openai_server import Fault, OpenAITestServer, Reply
from tests.support.videos import make_video

CATEGORIES = ["Temporal", "Goal and Purpose", "Spatial", "Plot and Narrative"]
OPTIONS = ["the red car", "the blue car", "a dog", "nobody"]
TARGET = "<think>At 00:05 the red car enters; at 00:12 the blue car leaves the street.</think><answer>{}</answer>"
RIGHT = "<think>At 00:05 I see it.</think><answer>{}</answer>"
WRONG = "<think>Hmm.</think><answer>{}</answer>"


def schema_row(schema: TableSchema, **given: Any) -> dict[str, Any]:
    """A row of `schema` with the given values; the other columns null where allowed, else a plain value."""
    row = {}
    for f in schema.schema:
        if f.name in given:
            row[f.name] = given[f.name]
        elif f.nullable:
            row[f.name] = None
        elif pa.types.is_integer(f.type):
            row[f.name] = 0
        elif pa.types.is_floating(f.type):
            row[f.name] = 0.0
        elif pa.types.is_boolean(f.type):
            row[f.name] = False
        elif pa.types.is_list(f.type):
            row[f.name] = []
        else:
            row[f.name] = "x"
    return row


class Published(Stage):
    """Stands in for an upstream stage: run with `run_stage`, it publishes the given tables as complete."""

    code_version = "test"

    def __init__(self, name: str, output: TableSchema, tables: dict[str, list[dict[str, Any]]], side_outputs=()) -> None:
        self.name, self.output, self.side_outputs, self.tables = name, output, tuple(side_outputs), tables

    def settings(self, ctx):
        return {"tables": stable_hash(self.tables)}

    def list_items(self, ctx):
        return [WorkItem("all", stable_hash(self.tables))]

    def process_shard(self, ctx, items):
        return ShardResult({s.name: s.from_rows(self.tables.get(s.name, [])) for s in self.all_outputs}, [])


def qa_item(qa_id: str, video_id: str, category: str, qtype: str, answer: str, options=OPTIONS, question: str | None = None) -> dict:
    opts = list(options) if qtype == "multiple_choice" else None
    return schema_row(
        QA, qa_id=qa_id, video_id=video_id, category=category, question_type=qtype, question=question or f"What happens in {qa_id}?",
        options=opts, answer=answer, reasoning="r", refined_reasoning="rr", target=TARGET.format(answer),
    )


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("filter-videos")
    corrupt = root / "corrupt.mp4"
    corrupt.write_bytes(b"\x00\x00\x00\x18ftypmp42 this is not a video")
    return {
        "va": str(make_video(root / "a.mp4", 3, audio=False)),
        "vb": str(make_video(root / "b.mp4", 2, audio=False, source="smptebars")),
        "vbad": str(corrupt),
    }


def make_workdir(root: Path, videos: dict[str, str], qa_rows: list[dict], **overrides: Any) -> StageContext:
    config = {"filter.runs": 10, "filter.num_frames": 4, "filter.max_new_tokens": 12, **overrides}
    ctx = StageContext(Workdir(str(root)), load_config("tiny", config))
    video_rows = [schema_row(VIDEOS, video_id=v, uri=uri) for v, uri in videos.items()]
    run_stage(Published("clip", CLIPS, {VIDEOS.name: video_rows}, side_outputs=[VIDEOS]), ctx)
    run_stage(Published("qa", QA, {QA.name: qa_rows}), ctx)
    return ctx


# ------------------------------------------------------------------------------------------------
# Labels, splits, failures, exports and report on scripted answers
# ------------------------------------------------------------------------------------------------
class ScriptedSampler:
    backend = "scripted"

    def __init__(self, script: dict[str, list[str]]) -> None:
        self.script = script
        self.requests: list[RolloutRequest] = []

    def sample(self, requests):
        self.requests += requests
        return [[Generation(t, 100, len(t.split()), len(set(t.split())), True) for t in self.script[r.qa_id]] for r in requests]


class ScriptedFilterStage(FilterStage):
    def __init__(self, script: dict[str, list[str]]) -> None:
        super().__init__()
        self._sampler = ScriptedSampler(script)


def scripted(n_right: int, right: str, wrong: str) -> list[str]:
    return [RIGHT.format(right)] * n_right + [WRONG.format(wrong)] * (10 - n_right)


# 16 good items: per category, one easy, one medium (4/10) and two hard; and 3 bad ones.
GOOD = []
SCRIPT: dict[str, list[str]] = {}
for c, category in enumerate(CATEGORIES):
    for k, n_right in enumerate((10, 4, 0, 0)):
        qa_id = f"q{c}{k}"
        if k == 3:  # open-ended, graded by normalised match: "The blue car!" == "blue car"
            GOOD.append(qa_item(qa_id, "va" if c % 2 else "vb", category, "open_ended", "The blue car!"))
            SCRIPT[qa_id] = scripted(n_right, "blue car", "a red car")
        else:
            GOOD.append(qa_item(qa_id, "va" if c % 2 else "vb", category, "multiple_choice", "B"))
            SCRIPT[qa_id] = scripted(n_right, "B", "C")
BAD = [
    qa_item("x-unknown", "v-missing", "Temporal", "multiple_choice", "A"),
    qa_item("x-corrupt", "vbad", "Spatial", "multiple_choice", "A"),
    qa_item("x-bad-answer", "va", "Spatial", "multiple_choice", "E"),
]
EXPECTED_DIFFICULTY = {"0": "easy", "1": "medium", "2": "hard", "3": "hard"}


def test_scripted_rollouts_give_labels_splits_exports_and_report(tmp_path, videos):
    # The paper's split rules (RL takes medium items, eval 20 %), not the tiny profile's.
    ctx = make_workdir(tmp_path / "wd", videos, GOOD + BAD, **{"filter.shard_size": 5, "filter.rl_difficulties": ["medium"], "filter.eval_fraction": 0.2})
    stage = ScriptedFilterStage(SCRIPT)
    report = run_stage(stage, ctx)
    wd = tmp_path / "wd"
    assert report.status == "done" and report.rows == 16 and report.failures == 3

    table = pd.read_parquet(wd / "filter")  # exactly the main table: exports and rollouts stay out
    assert list(table.columns) == FILTER.columns and len(table) == 16
    rows = table.set_index("qa_id")
    for qa_id, row in rows.iterrows():
        n_right = {"0": 10, "1": 4, "2": 0, "3": 0}[qa_id[2]]
        assert (row.n_runs, row.n_correct, row.pass_rate, row.n_format_ok) == (10, n_right, n_right / 10, 10)
        assert row.difficulty == EXPECTED_DIFFICULTY[qa_id[2]]
        assert row.prompt == user_prompt(row.question, row.question_type, None if row.options is None else list(row.options))
        assert row.video_uri == videos["va" if int(qa_id[1]) % 2 else "vb"] and row.num_frames == 4 and row.model == "tiny-captioner"
    assert len(stage._sampler.requests) == 16  # bad items never reach the model

    failures = pd.read_parquet(wd / "filter" / "_failures.parquet").set_index("item_id")
    assert failures.loc["x-unknown", "error_kind"] == "unknown_video"
    assert failures.loc["x-corrupt", "error_kind"] == "unreadable_video" and "corrupt.mp4" in failures.loc["x-corrupt", "message"]
    assert failures.loc["x-bad-answer", "error_kind"] == "bad_item"

    rollouts = pd.read_parquet(wd / "filter" / "_rollouts")
    assert list(rollouts.columns) == FILTER_ROLLOUTS.columns and len(rollouts) == 160
    assert (rollouts.groupby("qa_id")["run"].apply(sorted) == pd.Series({q: list(range(10)) for q in rows.index})).all()
    assert set(rollouts.loc[rollouts.qa_id.str.endswith("3"), "grader"]) == {"match"}
    assert rollouts.groupby("qa_id")["correct"].sum().to_dict() == rows["n_correct"].to_dict()
    assert rollouts.loc[rollouts.qa_id == "q01"].sort_values("run")["predicted"].tolist() == ["B"] * 4 + ["C"] * 6

    # Splits: eval 1 of 4 per category (20%); SFT round(0.33 * 16) = 5 easy/hard items; RL every other medium.
    splits = Counter(table["split"])
    assert (table[table.split == "eval"].groupby("category").size() == 1).all() and splits["eval"] == 4
    assert splits["sft"] == 5 and (table[table.split == "sft"]["difficulty"] != "medium").all()
    assert set(table[(table.difficulty == "medium") & (table.split != "eval")]["split"]) == {"rl"}
    assert splits["rl"] == len(table[(table.difficulty == "medium") & (table.split != "eval")])

    exports = wd / "filter" / "_exports"  # each layout's consumer reads it in tests/filter/test_exports.py
    for split in ("sft", "rl", "eval"):
        members = sorted(table[table.split == split]["qa_id"])
        trl = datasets.load_dataset("parquet", data_files=str(exports / "trl" / f"{split}.parquet"), split="train")
        assert sorted(trl["qa_id"]) == members
        llava = json.loads((exports / "llava" / f"{split}.json").read_text())
        assert sorted(r["id"] for r in llava) == members
    for name, split in {"train": "rl", "validation": "eval", "test": "eval"}.items():
        members = sorted(table[table.split == split]["qa_id"])
        for fmt in ("longvideo-reason", "easyr1"):
            exported = datasets.load_dataset("parquet", data_dir=str(exports / fmt), split=name)
            assert sorted(exported["qa_id"]) == members
    sft = datasets.load_dataset("parquet", data_files=str(exports / "trl" / "sft.parquet"), split="train")
    first = rows.loc[sft[0]["qa_id"]]
    user, assistant = sft[0]["messages"]
    assert user == {"role": "user", "content": [{"type": "video", "video": first.video_uri}, {"type": "text", "text": first.prompt}]}
    assert assistant == {"role": "assistant", "content": [{"type": "text", "text": first.target}]}
    assert sft[0]["videos"] == [first.video_uri]

    report_dir = wd / "report"
    for png in ("filter_difficulty.png", "filter_splits.png"):
        assert (report_dir / png).read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    markdown = (report_dir / "filter.md").read_text()
    assert "| Temporal | 1 | 1 | 2 | 4 |" in markdown and "![difficulty per category](filter_difficulty.png)" in markdown
    assert "unknown_video: 1" in markdown and "#### medium" in markdown
    artifact = stage.report_markdown(ctx, report.manifest)
    image = artifact.split("](data:image/png;base64,", 1)[1].split(")", 1)[0]
    assert base64.b64decode(image).startswith(b"\x89PNG")

    # Same config: cached. New split rules: the stage reruns, every answer is reused.
    assert run_stage(ScriptedFilterStage(SCRIPT), ctx).status == "cached"
    base = {"filter.runs": 10, "filter.num_frames": 4, "filter.max_new_tokens": 12, "filter.shard_size": 5,
            "filter.rl_difficulties": ["medium"]}

    def relabel(**changes) -> pd.DataFrame:
        ctx.config = load_config("tiny", {**base, **changes})
        again_stage = ScriptedFilterStage(SCRIPT)
        again = run_stage(again_stage, ctx)
        assert again.status == "done" and again.manifest["items_computed"] == 0 and again_stage._sampler.requests == []
        relabelled = pd.read_parquet(wd / "filter")
        assert relabelled.drop(columns="split").equals(table.drop(columns="split"))  # only the splits move
        return relabelled.set_index("qa_id")["split"]

    wider = relabel(**{"filter.eval_fraction": 0.5})  # one change at a time: the eval share...
    assert Counter(wider)["eval"] == 8
    salted = relabel(**{"filter.eval_fraction": 0.5, "filter.split_salt": "v2"})  # ...then the draw
    assert Counter(salted)["eval"] == 8 and set(salted[salted == "eval"].index) != set(wider[wider == "eval"].index)


def test_exported_easyr1_prompt_renders_to_the_training_prompt(tmp_path, videos):
    ctx = make_workdir(tmp_path / "wd", videos, GOOD, **{"filter.eval_fraction": 0.0, "filter.sft_fraction": 1.0})
    run_stage(ScriptedFilterStage(SCRIPT), ctx)
    exports = tmp_path / "wd" / "filter" / "_exports" / "easyr1"
    template = jinja2.Template((exports.parent / "easyr1_format_prompt.jinja").read_text())
    table = pd.read_parquet(tmp_path / "wd" / "filter").set_index("qa_id")
    video_dir = json.loads((exports.parent / "manifest.json").read_text())["video_dir"]
    rows = pd.read_parquet(exports / "train.parquet")
    assert len(rows) == len(table[table.split == "rl"]) > 0
    for row in rows.itertuples():
        assert row.problem.startswith("<video>") and [f"{video_dir}/{v}" for v in row.videos] == [table.loc[row.qa_id, "video_uri"]]
        assert template.render(content=row.problem.removeprefix("<video>")).strip() == table.loc[row.qa_id, "prompt"]
        expected_type = "multiple choice" if table.loc[row.qa_id, "question_type"] == "multiple_choice" else "free-form"
        assert row.problem_type == expected_type and row.answer == table.loc[row.qa_id, "answer"]
    # Empty splits still get their files: no rows, the right columns.
    assert pd.read_parquet(exports / "test.parquet").empty and list(pd.read_parquet(exports / "test.parquet").columns) == list(rows.columns)
    together = datasets.load_dataset("parquet", data_files=str(exports / "*.parquet"), split="train")
    assert together.num_rows == len(rows) and together.column_names == list(rows.columns)
    assert json.loads((tmp_path / "wd" / "filter" / "_exports" / "llava" / "eval.json").read_text()) == []


def test_a_stage_whose_items_all_fail_still_publishes_empty_splits_and_a_report(tmp_path, videos):
    ctx = make_workdir(tmp_path / "wd", videos, BAD)
    report = run_stage(ScriptedFilterStage({}), ctx)
    assert report.status == "done" and report.rows == 0 and report.failures == 3
    assert pd.read_parquet(tmp_path / "wd" / "filter").empty
    assert json.loads((tmp_path / "wd" / "filter" / "_exports" / "llava" / "sft.json").read_text()) == []
    markdown = (tmp_path / "wd" / "report" / "filter.md").read_text()
    assert "bad_item: 1" in markdown and "No items." in markdown


# ------------------------------------------------------------------------------------------------
# The LLM judge on an OpenAI-compatible endpoint
# ------------------------------------------------------------------------------------------------
JUDGE_KEY_ENV = "LVR_TEST_JUDGE_KEY"


def test_judge_grades_open_ended_answers(tmp_path, videos, monkeypatch):
    monkeypatch.setenv(JUDGE_KEY_ENV, "sk-judge")
    items = [qa_item("open", "va", "Temporal", "open_ended", "the blue car"), qa_item("mc", "vb", "Spatial", "multiple_choice", "B")]
    script = {
        "open": [RIGHT.format("blue car")] * 2 + [RIGHT.format("the car that is blue")] * 5 + [WRONG.format("a red bus")] * 3,
        "mc": scripted(3, "B", "A"),
    }

    def responder(info):
        return Reply("<think>compare</think>yes" if "car that is blue" in info.text else "no")

    with OpenAITestServer(responder, api_key="sk-judge") as server:
        overrides = {"judge.model": "judge", "judge.base_url": server.base_url, "judge.api_key_env": JUDGE_KEY_ENV}
        ctx = make_workdir(tmp_path / "wd", videos, items, **overrides)
        report = run_stage(ScriptedFilterStage(script), ctx)
        assert report.rows == 2 and server.total_requests == 2  # one per distinct unmatched prediction of "open"
    rows = pd.read_parquet(tmp_path / "wd" / "filter").set_index("qa_id")
    assert rows.loc["open", "n_correct"] == 7 and rows.loc["mc", "n_correct"] == 3
    rollouts = pd.read_parquet(tmp_path / "wd" / "filter" / "_rollouts")
    assert Counter(zip(rollouts.qa_id, rollouts.grader)) == {("open", "match"): 2, ("open", "judge"): 8, ("mc", "choice"): 10}

    # A judge that refuses us stops the stage (every item would fail alike); nothing is published.
    with OpenAITestServer(responder, api_key="another-key") as server:
        ctx = make_workdir(tmp_path / "wd2", videos, items, **{**overrides, "judge.base_url": server.base_url})
        with pytest.raises(StageError, match="judge endpoint refused"):
            run_stage(ScriptedFilterStage(script), ctx)
    assert not (tmp_path / "wd2" / "filter" / "_manifest.json").exists()


def test_the_judge_model_keys_the_stage_but_its_endpoint_does_not(tmp_path, videos, monkeypatch):
    monkeypatch.setenv(JUDGE_KEY_ENV, "sk-judge")
    items = [qa_item("open", "va", "Temporal", "open_ended", "the blue car")]
    script = {"open": [RIGHT.format("the car that is blue")] * 10}
    first, moved = OpenAITestServer(lambda info: Reply("yes"), api_key="sk-judge"), OpenAITestServer(lambda info: Reply("no"), api_key="sk-judge")
    with first, moved:
        judge = {"judge.model": "judge", "judge.base_url": first.base_url, "judge.api_key_env": JUDGE_KEY_ENV}
        assert run_stage(ScriptedFilterStage(script), make_workdir(tmp_path / "wd", videos, items, **judge)).status == "done"
        fingerprint = json.loads((tmp_path / "wd" / "filter" / "_manifest.json").read_text())["fingerprint"]

        # Another endpoint serving the same judge, more concurrency or retries: the finished stage stands.
        same = {**judge, "judge.base_url": moved.base_url, "judge.concurrency": 2, "judge.max_retries": 1, "judge.timeout_s": 5}
        assert run_stage(ScriptedFilterStage(script), make_workdir(tmp_path / "wd", videos, items, **same)).status == "cached"
        assert moved.total_requests == 0

        # Another judge model: every answer is judged again (its verdicts are the grades).
        report = run_stage(ScriptedFilterStage(script), make_workdir(tmp_path / "wd", videos, items, **{**same, "judge.model": "judge-2"}))
        assert report.status == "done" and report.manifest["fingerprint"] != fingerprint
        assert moved.total_requests == 1 and moved.requests[0].body["model"] == "judge-2"
    assert pd.read_parquet(tmp_path / "wd" / "filter").loc[0, "n_correct"] == 0


def test_a_judge_outage_fails_the_shard_instead_of_recording_verdicts(tmp_path, videos, monkeypatch):
    """An unreachable judge is no verdict on the item: no failure row to reuse; the rerun judges."""
    from models.openai_client import ChatRequestError

    monkeypatch.setenv(JUDGE_KEY_ENV, "sk-judge")
    items = [qa_item("open", "va", "Temporal", "open_ended", "the blue car")]
    script = {"open": [RIGHT.format("the car that is blue")] * 10}
    down = {"on": True}

    def faults(info):
        return Fault.server_error(503) if down["on"] else None

    with OpenAITestServer(lambda info: Reply("yes"), faults=faults, api_key="sk-judge") as server:
        overrides = {
            "judge.model": "judge", "judge.base_url": server.base_url, "judge.api_key_env": JUDGE_KEY_ENV,
            "judge.max_retries": 1,
        }
        ctx = make_workdir(tmp_path / "wd", videos, items, **overrides)
        with pytest.raises(ChatRequestError, match="503"):
            run_stage(ScriptedFilterStage(script), ctx)
        assert not (tmp_path / "wd" / "filter" / "_manifest.json").exists()
        down["on"] = False
        report = run_stage(ScriptedFilterStage(script), ctx)  # no --retry-failures needed
    assert report.rows == 1 and report.failures == 0
    assert pd.read_parquet(tmp_path / "wd" / "filter").loc[0, "n_correct"] == 10


def test_a_judge_that_refuses_every_request_fails_the_stage(tmp_path, videos, monkeypatch):
    monkeypatch.setenv(JUDGE_KEY_ENV, "sk-judge")
    items = [qa_item("open", "va", "Temporal", "open_ended", "the blue car"), qa_item("mc", "vb", "Spatial", "multiple_choice", "B")]
    script = {"open": [RIGHT.format("the car that is blue")] * 10, "mc": scripted(3, "B", "A")}
    refuse = Fault(status=400, message="unknown parameter")
    with OpenAITestServer(lambda info: Reply("yes"), faults=lambda info: refuse, api_key="sk-judge") as server:
        overrides = {"judge.model": "judge", "judge.base_url": server.base_url, "judge.api_key_env": JUDGE_KEY_ENV}
        ctx = make_workdir(tmp_path / "wd", videos, items, **overrides)
        with pytest.raises(StageError, match=r"filter: every request to the judge failed \(1 items; first: .*400"):
            run_stage(ScriptedFilterStage(script), ctx)
    assert not (tmp_path / "wd" / "filter" / "_manifest.json").exists()


# ------------------------------------------------------------------------------------------------
# The tiny model for real
# ------------------------------------------------------------------------------------------------
def test_tiny_model_answers_every_question_ten_times_with_one_encoding_per_batch(tmp_path, videos):
    items = [
        qa_item("t0", "va", "Temporal", "multiple_choice", "A"),
        qa_item("t1", "va", "Spatial", "open_ended", "a red ball"),
        qa_item("t2", "vb", "Goal and Purpose", "multiple_choice", "C"),
    ]
    ctx = make_workdir(tmp_path / "wd", videos, items, **{"filter.batch_size": 4})
    stage = FilterStage()
    report = run_stage(stage, ctx)
    assert report.status == "done" and report.rows == 3 and report.failures == 0
    lm = stage._sampler.lm
    assert lm.encoder_calls == 1  # one batch, two distinct videos, one tower pass
    rollouts = pd.read_parquet(tmp_path / "wd" / "filter" / "_rollouts")
    assert rollouts.groupby("qa_id").size().to_dict() == {"t0": 10, "t1": 10, "t2": 10}
    assert (rollouts["tokens_out"] <= 12).all() and rollouts["response"].nunique() > 1
    table = pd.read_parquet(tmp_path / "wd" / "filter")
    assert set(table["difficulty"]) <= {"easy", "medium", "hard"} and set(table["split"]) <= {"sft", "rl", "eval", "unused"}
    assert (table["pass_rate"] == table["n_correct"] / 10).all()


def test_frames_read_ahead_of_the_model_give_the_same_rows_as_frames_read_in_line(tmp_path, videos):
    # Two batches over two readable videos and a corrupt one: the prefetch workers read and resize what
    # the model would, so answers, seeds (per batch of questions) and failure rows are those of reading in line.
    items = [
        qa_item("p0", "va", "Temporal", "multiple_choice", "A"),
        qa_item("p1", "vbad", "Spatial", "multiple_choice", "B"),
        qa_item("p2", "vb", "Goal and Purpose", "open_ended", "a red ball"),
        qa_item("p3", "va", "Spatial", "multiple_choice", "C"),
    ]
    outputs = []
    for workers in (0, 1):
        wd = tmp_path / f"wd{workers}"
        ctx = make_workdir(wd, videos, items, **{"filter.batch_size": 2, "filter.runs": 3, "filter.prefetch_workers": workers})
        stage = FilterStage()
        report = run_stage(stage, ctx)
        assert report.status == "done" and report.rows == 3 and report.failures == 1
        assert stage._sampler.lm.encoder_calls == 2 and (stage._prefetcher is None) == (workers == 0)
        outputs.append([pd.read_parquet(path).sort_index(axis=1) for path in (wd / "filter", wd / "filter" / "_rollouts")])
        outputs[-1].append(pd.read_parquet(wd / "filter" / "_failures.parquet")[["item_id", "error_kind"]])
    for in_line, ahead in zip(*outputs):
        pd.testing.assert_frame_equal(in_line, ahead)
