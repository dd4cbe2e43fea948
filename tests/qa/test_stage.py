"""The QA stage end to end through the real engine: captions in, qa/ out, against a real HTTP server.

The caption input is written by a stand-in caption stage (`stand_ins.Published`) run by `run_stage`, so
the QA stage reads a genuine `caption/` table and manifest.
"""

from __future__ import annotations

import json
import logging
import shutil
import uuid
from pathlib import Path

import pandas as pd
import pytest

from data_schemas import CAPTIONS, QA
from tasks.config import load_config
from tasks.engine.manifest import read_manifest
from tasks.engine.run import run_stage
from tasks.engine.stage import StageContext, StageError
from tasks.engine.store import Workdir
from tasks.grading.answers import FORMAT_PATTERN
from tasks.qa import parser as P
from tasks.qa import template
from tasks.qa.stage import QAStage, qa_id
from tests.support.openai_server import (
    KITCHEN_CAPTIONS,
    Fault,
    OpenAITestServer,
    Reply,
    caption_rows,
    is_refine_request,
    r1_responder,
    request_kind,
)
from tests.support.stand_ins import Published

KEY_ENV = "LVR_TEST_QA_KEY"
SECRET = f"sk-secret-{uuid.uuid4().hex}"
GARDEN = [
    (0.0, 12.0, "An old man kneels by a raised bed and pulls weeds, dropping them into a tin bucket."),
    (12.0, 24.0, "He fills a green watering can from a rain barrel beside the shed."),
    (24.0, 36.0, "He waters a row of young lettuces, moving slowly from left to right."),
    (36.0, 48.0, "A robin lands on the handle of his spade while he rests on a bench."),
]


def make_ctx(root: Path, rows: list[dict], server: OpenAITestServer | None = None, **over) -> StageContext:
    overrides = {"qa.timeout_s": 10.0, "qa.backoff_s": 0.01, "qa.concurrency": 4, **over}
    if server is not None:
        overrides = {"qa.backend": "openai", "qa.base_url": server.base_url, "qa.api_key_env": KEY_ENV, "qa.model": "deepseek-r1", **overrides}
    ctx = StageContext(workdir=Workdir(str(root)), config=load_config("tiny", overrides))
    run_stage(Published("caption", CAPTIONS, rows), ctx)
    return ctx


def qa_table(root: Path) -> pd.DataFrame:
    return pd.read_parquet(root / "qa")


def failures(root: Path) -> pd.DataFrame:
    return pd.read_parquet(root / "qa" / "_failures.parquet")


def cache_files(root: Path) -> list[Path]:
    return sorted((root / "qa" / "_llm_cache").rglob("*.json"))


def reset_stage(root: Path) -> None:
    """What forcing a rerun of a finished stage takes: its manifest and shard results go, the cache stays."""
    (root / "qa" / "_manifest.json").unlink()
    shutil.rmtree(root / "qa" / "_work")


@pytest.fixture
def key(monkeypatch):
    monkeypatch.setenv(KEY_ENV, SECRET)


# Every kind of fault a real endpoint throws, each on a known request of the kitchen video.
TRUNCATED_TEXT = '<think>\nLet me read the scenes. At 00:00-00:10 the woman rinses tomatoes. Then at 00:10-00:20 she dices them. So a good question'
MALFORMED_TEXT = "I'm sorry, but I can't produce questions in that format. Would you like a summary instead?"


def kitchen_faults(info):
    if is_refine_request(info):
        if "Which piece of kitchen equipment" in info.text:
            return Fault(reply=Reply("1. The captions at 00:00-00:10 show the board.\n2. So the white bowl."))
        if "turning point" in info.text and info.attempt == 0:
            return Fault.server_error(503)
        return None
    kind = request_kind(info)
    if kind == ("Temporal", "multiple_choice") and info.attempt == 0:
        return Fault.server_error(500)
    if kind == ("Temporal", "open_ended"):
        return Fault.truncated(TRUNCATED_TEXT)
    if kind == ("Goal and Purpose", "multiple_choice") and info.attempt == 0:
        return Fault.rate_limited(0.3)
    if kind == ("Goal and Purpose", "open_ended"):
        return Fault.malformed(MALFORMED_TEXT)
    if kind == ("Spatial", "multiple_choice") and info.attempt == 0:
        return Fault.hang(4.0)  # past the test's 1 s timeout: retried
    return None


def test_faults_become_rows_or_failure_rows_and_reruns_are_free(tmp_path, key, caplog, monkeypatch):
    caplog.set_level(logging.DEBUG)
    rows = caption_rows("kitchen", KITCHEN_CAPTIONS) + caption_rows("single", KITCHEN_CAPTIONS[:1])
    root = tmp_path / "wd"
    with OpenAITestServer(r1_responder, faults=kitchen_faults, api_key=SECRET) as server:
        ctx = make_ctx(root, rows, server, **{"qa.timeout_s": 1.0})
        report = run_stage(QAStage(), ctx)
        assert report.status == "done"

        table = qa_table(root)
        assert sorted(table["category"] + "/" + table["question_type"]) == [
            "Goal and Purpose/multiple_choice", "Plot and Narrative/multiple_choice", "Spatial/multiple_choice", "Temporal/multiple_choice",
        ]
        assert dict(zip(table["category"], table["answer"])) == {"Temporal": "B", "Goal and Purpose": "C", "Spatial": "B", "Plot and Narrative": "B"}
        for row in table.itertuples():
            assert row.qa_id == qa_id("kitchen", row.category, row.question_type, row.question)
            assert len(row.options) == 4 and FORMAT_PATTERN.match(row.target)
            assert row.target == f"<think>{row.refined_reasoning}</think><answer>{row.answer}</answer>"
            assert "caption" not in row.refined_reasoning.lower() and "Checking the video" in row.refined_reasoning
            assert row.generator_model == row.refiner_model == "deepseek-r1"
            assert row.prompt_version.startswith("v1-") and row.refine_prompt_version.startswith("v1-")
            assert row.prompt_tokens > 100 and row.completion_tokens > 0 and row.refine_prompt_tokens > 0
            assert len(row.generation_key) == 32 and (root / "qa" / "_llm_cache" / "generate" / row.generation_key[:2] / f"{row.generation_key}.json").exists()
        # Reasoning tokens are reported (completion_tokens_details) when the thinking came as reasoning_content.
        assert table["reasoning_tokens"].isna().all() and table["refine_reasoning_tokens"].notna().all()

        fails = failures(root)
        kinds = sorted(fails["error_kind"])
        assert kinds == sorted([P.TRUNCATED, P.MALFORMED, P.REFINE_MENTIONS_CAPTIONS, P.MENTIONS_CAPTIONS, "too_few_clips"])
        detail = dict(zip(fails["error_kind"], fails["detail"]))
        assert detail[P.TRUNCATED] == TRUNCATED_TEXT and detail[P.MALFORMED] == MALFORMED_TEXT  # raw text kept
        assert "The captions at 00:00-00:10" in detail[P.REFINE_MENTIONS_CAPTIONS]
        assert "According to the captions" in detail[P.MENTIONS_CAPTIONS]
        # Keyed by video like the rows; the message names the request, and the qa id when there is a question.
        assert dict(zip(fails["error_kind"], fails["item_id"])) == {k: "single" if k == "too_few_clips" else "kitchen" for k in kinds}
        # What R1 wrote was unusable (a retry may draw better); a video with too few clips never will be.
        assert dict(zip(fails["error_kind"], fails["failure_class"])) == {k: "input" if k == "too_few_clips" else "output" for k in kinds}
        msg = dict(zip(fails["error_kind"], fails["message"]))
        assert msg[P.TRUNCATED].startswith("kitchen/Temporal/open_ended: ")
        caption_qa = qa_id("kitchen", "Plot and Narrative", "open_ended", "According to the captions, what is the story arc of the video?")
        assert msg[P.MENTIONS_CAPTIONS].startswith(f"kitchen/Plot and Narrative/open_ended qa {caption_qa}: ")

        statuses = server.statuses()
        assert statuses[500] == 1 and statuses[429] == 1 and statuses[503] == 1
        assert statuses[499] >= 1  # the hang (a loaded machine may time out another request too: it is retried)
        generation = [r for r in server.requests if not is_refine_request(r)]
        assert len({json.dumps(r.body, sort_keys=True) for r in generation}) == 8  # 4 categories x 2 types, once each
        assert all(r.headers["authorization"] == f"Bearer {SECRET}" for r in server.requests)
        assert {r.body["temperature"] for r in server.requests} == {0.6}

        # A rerun: cached by fingerprint, nothing sent.
        server.reset_counters()
        assert run_stage(QAStage(), ctx).status == "cached" and server.total_requests == 0

        # Forced rerun (manifest and shards gone): every answer comes from the disk cache, the bad
        # ones included, and the output is identical; the key is not even needed.
        before = qa_table(root)
        reset_stage(root)
        monkeypatch.delenv(KEY_ENV)
        assert run_stage(QAStage(), ctx).status == "done"
        assert server.total_requests == 0
        pd.testing.assert_frame_equal(qa_table(root), before)
        assert sorted(failures(root)["error_kind"]) == kinds
        monkeypatch.setenv(KEY_ENV, SECRET)

        # A new refinement model reruns the stage but not one generation request.
        ctx.config.qa.refine_model = "refiner-2"
        report = run_stage(QAStage(), ctx)
        assert report.status == "done" and server.total_requests > 0
        assert not [r for r in server.requests if not is_refine_request(r)]
        assert {r.body["model"] for r in server.requests} == {"refiner-2"}
        assert set(qa_table(root)["refiner_model"]) == {"refiner-2"}

    # The key is nowhere on disk and nowhere in the logs.
    secret = SECRET.encode()
    scanned = [p for p in root.rglob("*") if p.is_file()]
    assert any(p.name == "_manifest.json" for p in scanned) and any("_llm_cache" in p.parts for p in scanned)
    assert [p for p in scanned if secret in p.read_bytes()] == []
    assert SECRET not in caplog.text
    manifest = read_manifest(Workdir(str(root)), "qa")
    assert "api_key_env" not in manifest["config"] and "base_url" not in manifest["config"]  # transport, not content
    assert manifest["schema"] == {"name": "qa", "version": QA.version}


def test_concurrency_limit_holds_across_videos_and_streaming(tmp_path, key):
    videos = [caption_rows(f"video{i}", KITCHEN_CAPTIONS[i % 3 :] + GARDEN) for i in range(6)]
    with OpenAITestServer(r1_responder, latency_s=0.03, api_key=SECRET) as server:
        ctx = make_ctx(tmp_path / "wd", [r for v in videos for r in v], server, **{"qa.concurrency": 5, "qa.stream": True, "qa.shard_size": 3})
        report = run_stage(QAStage(), ctx)
        assert server.max_in_flight == 5  # reached, never exceeded
        assert all(r.body["stream"] for r in server.requests)
    assert report.rows == 6 * 7 and report.manifest["shards"]["total"] == 2
    table = qa_table(tmp_path / "wd")
    # Usage arrives in the stream's last chunk.
    assert table["prompt_tokens"].notna().all() and table["refine_reasoning_tokens"].notna().all()
    assert table.loc[table["category"] + table["question_type"] == "Temporalopen_ended", "reasoning_tokens"].notna().all()
    assert table["qa_id"].is_unique
    # Six videos ask the same refinements of identical items: each distinct request was sent once.
    assert server.total_requests == len(cache_files(tmp_path / "wd"))


def test_crash_then_rerun_pays_only_for_unanswered_requests(tmp_path, key):
    rows = caption_rows("kitchen", KITCHEN_CAPTIONS) + caption_rows("garden", GARDEN)
    root = tmp_path / "wd"
    refuse = {"on": True}

    def faults(info):  # after six requests the endpoint starts refusing us (a revoked key, say)
        return Fault.server_error(401) if refuse["on"] and info.index >= 6 else None

    with OpenAITestServer(r1_responder, faults=faults, latency_s=0.02, api_key=SECRET) as server:
        ctx = make_ctx(root, rows, server, **{"qa.concurrency": 2})
        with pytest.raises(StageError, match=rf"refused the generate request.*\${KEY_ENV}") as exc:
            run_stage(QAStage(), ctx)
        assert SECRET not in str(exc.value)
        assert read_manifest(ctx.workdir, "qa") is None  # nothing published
        answered = len(cache_files(root))
        assert 3 <= answered < server.total_requests  # requests cut short by the abort were not cached
        refuse["on"] = False
        server.reset_counters()
        report = run_stage(QAStage(), ctx)
        assert report.status == "done" and report.rows == 7 + 7
        assert server.total_requests == len(cache_files(root)) - answered  # only what was never answered


def test_new_video_costs_only_its_own_requests(tmp_path, key):
    rows = caption_rows("kitchen", KITCHEN_CAPTIONS) + caption_rows("garden", GARDEN)
    with OpenAITestServer(r1_responder, api_key=SECRET) as server:
        ctx = make_ctx(tmp_path / "wd", rows, server, **{"qa.shard_size": 2})
        first = run_stage(QAStage(), ctx)
        server.reset_counters()
        ctx = make_ctx(tmp_path / "wd", caption_rows("allotment", GARDEN[1:]) + rows, server, **{"qa.shard_size": 2})
        report = run_stage(QAStage(), ctx)  # "allotment" sorts first: every shard changes
    assert report.manifest["items_computed"] == 1 and report.rows == first.rows + 7
    assert report.failures == first.failures + 1  # the old videos' failure rows came along with their rows
    generation = [r for r in server.requests if not is_refine_request(r)]
    assert len(generation) == 8 and all("From 00:12 to 00:24: He fills" in r.text and "From 00:00" not in r.text for r in generation)
    assert sorted(set(failures(tmp_path / "wd")["item_id"])) == ["allotment", "garden", "kitchen"]


def test_retry_failures_asks_again_only_for_the_videos_that_failed(tmp_path, key):
    """The endpoint refused one video's requests; a retry sends requests for that video only."""
    rows = caption_rows("kitchen", KITCHEN_CAPTIONS) + caption_rows("garden", GARDEN)
    state = {"down": True}

    def garden_down(info):
        refused = Fault(status=400, message="content refused")  # the request's own fault: a failure row
        return refused if state["down"] and "He fills a green watering can" in info.text else None

    with OpenAITestServer(r1_responder, faults=garden_down, api_key=SECRET) as server:
        ctx = make_ctx(tmp_path / "wd", rows, server, **{"qa.shard_size": 2, "qa.max_retries": 0})
        first = run_stage(QAStage(), ctx)
        kitchen_before = qa_table(tmp_path / "wd").query("video_id == 'kitchen'").reset_index(drop=True)
        failed = failures(tmp_path / "wd")
        assert set(failed.loc[failed["error_kind"].str.startswith("request_"), "item_id"]) == {"garden"}
        assert "garden" not in set(qa_table(tmp_path / "wd")["video_id"])

        state["down"] = False
        server.reset_counters()
        assert run_stage(QAStage(), ctx).status == "cached" and server.total_requests == 0
        ctx.config.execution.retry_failures = True
        retried = run_stage(QAStage(), ctx)
    assert retried.status == "done" and retried.rows > first.rows
    assert server.total_requests > 0 and all("He fills a green watering can" in r.text for r in server.requests if not is_refine_request(r))
    assert "garden" in set(qa_table(tmp_path / "wd")["video_id"])
    assert not failures(tmp_path / "wd")["error_kind"].str.startswith("request_").any()
    kitchen_after = qa_table(tmp_path / "wd").query("video_id == 'kitchen'").reset_index(drop=True)
    assert len(kitchen_before) > 0
    pd.testing.assert_frame_equal(kitchen_after, kitchen_before)  # the finished video was kept as it was


def test_unreachable_endpoint_stops_the_stage(tmp_path, key):
    with OpenAITestServer(r1_responder, faults=lambda info: Fault.server_error(502), api_key=SECRET) as server:
        ctx = make_ctx(tmp_path / "wd", caption_rows("garden", GARDEN), server, **{"qa.max_retries": 1})
        with pytest.raises(StageError, match=r"qa: the endpoint failed \(HTTP 502.*\) after 2 attempt\(s\)"):
            run_stage(QAStage(), ctx)
        assert server.total_requests >= 2
    assert not (tmp_path / "wd" / "qa" / "_manifest.json").exists()
    assert not list((tmp_path / "wd" / "qa" / "_work" / "shards").glob("*/_done.json"))  # no verdict recorded


def test_an_outage_is_redone_by_the_next_run_without_asking_again_what_was_answered(tmp_path, key):
    """A 5xx after retries fails the shard (no failure rows); the rerun asks only what was not answered."""
    rows = caption_rows("kitchen", KITCHEN_CAPTIONS) + caption_rows("garden", GARDEN)
    state = {"down": True}
    answered: list[tuple[bool, str]] = []

    def garden_down(info):
        if state["down"] and "He fills a green watering can" in info.text:
            return Fault.server_error(503)
        answered.append((state["down"], info.text))
        return None

    with OpenAITestServer(r1_responder, faults=garden_down, api_key=SECRET) as server:
        # garden's requests fail slowly (retries with backoff) while kitchen's are answered
        ctx = make_ctx(tmp_path / "wd", rows, server, **{"qa.shard_size": 2, "qa.max_retries": 2, "qa.backoff_s": 0.5})
        with pytest.raises(StageError, match="qa: the endpoint failed"):
            run_stage(QAStage(), ctx)
        assert not list((tmp_path / "wd" / "qa" / "_work" / "shards").glob("*/_done.json"))  # no verdict recorded
        state["down"] = False
        report = run_stage(QAStage(), ctx)  # no retry_failures
    assert report.status == "done"
    assert not failures(tmp_path / "wd")["error_kind"].str.contains("request_").any()  # the outage left no verdict
    assert {"kitchen", "garden"} <= set(qa_table(tmp_path / "wd")["video_id"])
    before = {text for during_outage, text in answered if during_outage}
    again = [text for during_outage, text in answered if not during_outage]
    assert before and not before & set(again)  # what was answered came from the cache
    assert any("He fills a green watering can" in text for text in again)


def test_missing_key_variable_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.delenv(KEY_ENV, raising=False)
    with OpenAITestServer(r1_responder) as server:
        ctx = make_ctx(tmp_path / "wd", caption_rows("garden", GARDEN), server)
        with pytest.raises(StageError, match=rf"{KEY_ENV}.*not set"):
            run_stage(QAStage(), ctx)
        assert server.total_requests == 0


ONE_PER_REQUEST = {"qa.questions_per_request": 1}


def test_template_backend_offline_on_tiny_model_captions(tmp_path):
    gibberish = [(i * 10.0, (i + 1) * 10.0, text) for i, text in enumerate([
        "slow ly the bowl Ġx red ing <think> tom ato", "qu ick she pan steam caption zz 1 2", "green table of es ! sl ow a the",
        "slow ly the bowl Ġx red ing <think> tom ato", "</answer> pan pan table red qu zz", "ato es she green 2 1 ow sl",
    ])]
    rows = [
        *caption_rows("kitchen", KITCHEN_CAPTIONS), *caption_rows("gibberish", gibberish),
        *caption_rows("pair", GARDEN[:2]), *caption_rows("single", GARDEN[:1]),
    ]
    report = run_stage(QAStage(), make_ctx(tmp_path / "a", rows, **ONE_PER_REQUEST))
    table = qa_table(tmp_path / "a")
    assert set(table["category"]) == {"Temporal", "Goal and Purpose", "Spatial", "Plot and Narrative"}
    assert set(table["question_type"]) == {"multiple_choice", "open_ended"}
    # One question per category and type on the kitchen video; the two-clip video supports the open-ended kinds only.
    assert (table[table["video_id"] == "kitchen"].shape[0], table[table["video_id"] == "pair"].shape[0]) == (8, 4)
    assert (table["video_id"] == "gibberish").sum() >= 6
    assert all(FORMAT_PATTERN.match(t) for t in table["target"]) and table["qa_id"].is_unique
    assert set(table["generator_model"]) == {template.GENERATOR_MODEL} and set(table["prompt_version"]) == {template.PROMPT_VERSION}
    assert table["prompt_tokens"].isna().all() and table["generation_key"].isna().all()
    assert list(failures(tmp_path / "a")["error_kind"]) == ["too_few_clips"]
    summary = QAStage().report_markdown(make_ctx(tmp_path / "a", rows, **ONE_PER_REQUEST), report.manifest)
    assert "| Temporal | multiple_choice | 2 |" in summary  # kitchen, gibberish; two clips cannot order three moments
    assert "| `too_few_clips` | 1 |" in summary
    assert not (tmp_path / "a" / "qa" / "_llm_cache").exists()
    # Deterministic: another workdir, same bytes of data.
    run_stage(QAStage(), make_ctx(tmp_path / "b", rows, **ONE_PER_REQUEST))
    pd.testing.assert_frame_equal(qa_table(tmp_path / "b"), table)
    assert report.manifest["schema"] == {"name": "qa", "version": QA.version}


def test_prompt_edits_change_the_fingerprint(tmp_path, monkeypatch):
    import tasks.qa.prompts as prompts

    rows = caption_rows("kitchen", KITCHEN_CAPTIONS)
    ctx = make_ctx(tmp_path / "wd", rows)
    first = QAStage().settings(ctx)
    assert "concurrency" not in first and "base_url" not in first and "api_key_env" not in first
    copy = tmp_path / "prompts"
    shutil.copytree(prompts.PROMPTS_DIR, copy)
    (copy / "refine" / "v1" / "user.txt").write_text((copy / "refine" / "v1" / "user.txt").read_text() + "\nBe brief.\n")
    monkeypatch.setattr(prompts, "PROMPTS_DIR", copy)
    second = QAStage().settings(ctx)
    assert first["prompt_files"]["generate"] == second["prompt_files"]["generate"]
    assert first["prompt_files"]["refine"] != second["prompt_files"]["refine"]
    ctx.config.qa.prompt_version = "v9"
    with pytest.raises(StageError, match="no generate prompt version 'v9'; available: v1"):
        QAStage().settings(ctx)


def test_a_new_template_version_reruns_the_stage(tmp_path, monkeypatch):
    # The template backend's drafts change with its code: a workdir made by an older template must
    # not be reused as "cached" (it was, the version being in no setting the fingerprint reads).
    ctx = make_ctx(tmp_path / "wd", caption_rows("kitchen", KITCHEN_CAPTIONS))
    assert run_stage(QAStage(), ctx).status == "done"
    assert run_stage(QAStage(), ctx).status == "cached"
    monkeypatch.setattr(template, "TEMPLATE_VERSION", template.TEMPLATE_VERSION + 1)
    assert run_stage(QAStage(), ctx).status == "done"
