"""The production-shaped rehearsal (`configs/rehearsal.yaml`) end to end on CPU: the 7B head layout at
tiny width, SP 4 on 4 gloo ranks, ZeRO-3 SFT, gradient checkpointing, bf16, captions and R1 questions
from an OpenAI-protocol server, the judge on, token budgets and fps sampling: `lvr check` passes, then
`lvr run` runs the whole DAG and every stage saw what the profile asked for."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from flows.cli import main
from models.tiny import TINY_7B_LAYOUT
from models.video import max_video_tokens_for
from tasks.config import load_config
from tasks.preflight.tokens import preprocess_for
from tests.support.openai_server import OpenAITestServer, R1_ANSWERS, Reply, is_refine_request, refined_reply, request_kind
from tests.support.videos import make_video

pytestmark = pytest.mark.slow

KEY_ENV = "LVR_REHEARSAL_API_KEY"
SECRET = "sk-rehearsal-0123456789abcdef"
JUDGE_MARKER = "Is the candidate answer correct?"
CAPTION = "A {colour} square slides from left to right over a dark background while the label reads scene {n}."
COLOURS = ("red", "green", "blue", "yellow")


def rehearsal_responder(info) -> Reply:
    """The three endpoints of the profile on one server: the judge, R1 (generation, refinement), captions."""
    text = info.text
    if JUDGE_MARKER in text:
        candidate = text.split("Candidate answer:", 1)[1].split("\n", 1)[0]
        return Reply("yes" if len(candidate) % 2 else "no")
    if is_refine_request(info):
        return refined_reply(info)
    try:
        return R1_ANSWERS[request_kind(info)]
    except ValueError:  # not a QA request: a caption request with the clip's frames as images
        return Reply(CAPTION.format(colour=COLOURS[info.index % len(COLOURS)], n=info.index))


def test_rehearsal_runs_the_whole_dag(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(KEY_ENV, SECRET)
    workdir, source = tmp_path / "wd", tmp_path / "videos"
    make_video(source / "a.mp4", 24, fps=25, gop=50)  # two videos of 2-3 clips: a lean run of every stage
    make_video(source / "b.mp4", 16, fps=25, gop=25, source="smptebars")
    with OpenAITestServer(rehearsal_responder, api_key=SECRET) as server:
        endpoints = [f"{section}.base_url={server.base_url}" for section in ("caption", "qa", "judge")]
        overrides = [arg for item in endpoints for arg in ("--set", item)]
        assert main(["check", "--config", "rehearsal", *overrides]) == 0
        checked = capsys.readouterr().out
        assert "tiny-7b-layout" in checked and "sft: memory per GPU" in checked and SECRET not in checked
        code = main(["run", "--config", "rehearsal", *overrides, "--source", str(source), "--workdir", str(workdir), "--engine", "local"])
        out = capsys.readouterr()
        assert code == 0, out.err[-4000:]
        kinds = {"judge": 0, "caption": 0}
        for info in server.requests:
            if JUDGE_MARKER in info.text:
                kinds["judge"] += 1
            elif "Category:" not in info.text and not is_refine_request(info):
                kinds["caption"] += 1
    assert kinds["caption"] == len(pd.read_parquet(workdir / "clip"))
    assert kinds["judge"] > 0  # open-ended answers were judged

    cfg = load_config("rehearsal")
    statuses = {s: json.loads((workdir / s / "_manifest.json").read_text())["status"] for s in
                ("clip", "caption", "qa", "filter", "sft", "grpo", "eval")}
    assert set(statuses.values()) == {"complete"}, statuses
    questions = pd.read_parquet(workdir / "qa")
    assert set(questions["question_type"]) == {"multiple_choice", "open_ended"}
    assert questions["window_index"].notna().all()

    # Token budgets: what the base model saw in filter never exceeds the budget's prediction.
    rollouts = pd.read_parquet(workdir / "filter")
    preprocess = preprocess_for(TINY_7B_LAYOUT)
    frames = rollouts["num_frames"].max()
    assert frames <= cfg.filter.max_frames
    assert max_video_tokens_for(int(frames), preprocess, cfg.filter.video_budget()) <= cfg.filter.max_video_tokens

    # The training stages ran the production topology: SP 4 on 4 processes, ZeRO-3 / bf16 / checkpointing.
    for stage in ("sft", "grpo"):
        manifest = json.loads((workdir / stage / "_manifest.json").read_text())
        assert manifest["config"]["sp_degree"] == 4 and manifest["config"]["nproc_per_node"] == 4
        assert manifest["config"]["precision"] == "bf16" and manifest["config"]["gradient_checkpointing"]
        assert (workdir / stage / "model" / "config.json").is_file()
    assert json.loads((workdir / "sft" / "_manifest.json").read_text())["config"]["zero_stage"] == 3
    model_config = json.loads((workdir / "grpo" / "model" / "config.json").read_text())
    text = model_config.get("text_config", model_config)
    assert (text["num_attention_heads"], text["num_key_value_heads"]) == (28, 4)

    evaluated = pd.read_parquet(workdir / "eval")
    assert set(evaluated["model"]) == {"base", "sft", "grpo"}
    assert set(evaluated["question_type"]) == {"multiple_choice", "open_ended"}
