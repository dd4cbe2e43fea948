"""A small workdir that has been through clip (real), filter (published by a stand-in stage with the
FILTER schema, so manifests and fingerprints are real) and eval with the tiny model; shared by the
eval and report tests, and built once per test session (the tiny model's answers are the slow part)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from data_schemas import FILTER, TRAIN_METRICS, VIDEOS
from tasks.clip.stage import ClipStage
from tasks.config import load_config
from tasks.engine.run import run_stage
from tasks.engine.stage import StageContext, StageReport, read_stage_table
from tasks.engine.store import Workdir
from tasks.eval.stage import EvalStage
from tasks.grading.prompts import user_prompt
from tests.support.stand_ins import Published
from tests.support.videos import make_video

OPTIONS = ["the red car", "the blue car", "a dog", "nobody"]
EVAL_CONFIG = {
    "eval.models": ["base", "sft"], "eval.num_frames": 4, "eval.frames_sweep": [2], "eval.max_new_tokens": 16,
    "eval.batch_size": 4, "eval.shard_size": 3,
}


def filter_row(qa_id: str, video_id: str, video_uri: str, category: str, qtype: str, answer: str, split: str = "eval") -> dict[str, Any]:
    options = OPTIONS if qtype == "multiple_choice" else None
    question = f"In {qa_id}, which vehicle leaves the street first?"
    return {
        "qa_id": qa_id, "video_id": video_id, "video_uri": video_uri, "category": category, "question_type": qtype,
        "question": question, "options": options, "answer": answer, "prompt": user_prompt(question, qtype, options),
        "target": f"<think>At 00:01 the red car enters; at 00:02 the blue car leaves.</think><answer>{answer}</answer>",
        "n_runs": 10, "n_correct": 4, "n_format_ok": 10, "pass_rate": 0.4, "difficulty": "medium", "reasoning_words": 12,
        "quality": 0.75, "split": split, "model": "tiny", "num_frames": 4,
    }


def filter_rows(uris: dict[str, str]) -> list[dict[str, Any]]:
    """Four good eval items (Temporal 2, Spatial 1, Goal and Purpose 1), one SFT item (never
    evaluated) and two eval items that fail: a bad answer letter and a video that is gone."""
    a, b = sorted(uris)
    return [
        filter_row("e0", a, uris[a], "Temporal", "multiple_choice", "B"),
        filter_row("e1", b, uris[b], "Temporal", "open_ended", "the blue car"),
        filter_row("e2", a, uris[a], "Spatial", "multiple_choice", "A"),
        filter_row("e3", b, uris[b], "Goal and Purpose", "multiple_choice", "C"),
        filter_row("s0", a, uris[a], "Plot and Narrative", "multiple_choice", "D", split="sft"),
        filter_row("x-bad-answer", a, uris[a], "Spatial", "multiple_choice", "E"),
        filter_row("x-gone", "vgone", "/nonexistent/lvr-test/gone.mp4", "Temporal", "multiple_choice", "A"),
    ]


EXPECTED_PER_CATEGORY = {"Temporal": 2, "Spatial": 1, "Goal and Purpose": 1}


def sft_metrics() -> list[dict[str, Any]]:
    return [
        {"stage": "sft", "step": s, "name": name, "value": value, "time_s": float(s)}
        for s in range(1, 6)
        for name, value in (("loss", 3.0 / s), ("lr", 1e-4), ("grad_norm", 1.0), ("tokens_per_s", 100.0))
    ]


def make_sources(root: Path) -> Path:
    source = root / "videos"
    make_video(source / "a.mp4", 3, audio=False)
    make_video(source / "b.mp4", 2, audio=False, source="smptebars")
    (source / "bad.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42 this is not a video")
    return source


def publish_filter(ctx: StageContext, rows_for: Any = filter_rows) -> list[dict[str, Any]]:
    """The filter table over the clip stage's videos, published by a stand-in named "filter"."""
    uris = {r["video_id"]: r["uri"] for r in read_stage_table(ctx.workdir, "clip", VIDEOS, "_videos").to_pylist()}
    rows = rows_for(uris)
    run_stage(Published("filter", FILTER, rows), ctx)
    return rows


@dataclass
class EvalWorkdir:
    root: Path
    ctx: StageContext
    filter_rows: list[dict[str, Any]]
    stage: EvalStage
    report: StageReport


_BUILT: dict[str, EvalWorkdir] = {}


def eval_workdir(tmp_path_factory) -> EvalWorkdir:
    """Built on first use and shared by every test module of the session."""
    if "wd" not in _BUILT:
        root = tmp_path_factory.mktemp("eval-workdir")
        ctx = StageContext(Workdir(str(root / "wd")), load_config("tiny", EVAL_CONFIG), source=str(make_sources(root)))
        run_stage(ClipStage(), ctx)
        rows = publish_filter(ctx)
        run_stage(Published("sft", TRAIN_METRICS, sft_metrics()), ctx)  # metrics only: no sft/model, so eval skips sft
        stage = EvalStage()
        _BUILT["wd"] = EvalWorkdir(root / "wd", ctx, rows, stage, run_stage(stage, ctx))
    return _BUILT["wd"]
