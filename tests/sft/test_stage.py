"""The SFT stage end to end through the real engine: filter/ in, torchrun with SP=2 on gloo,
SIGKILL mid-training, rerun resumes from the checkpoint, sft/ out, the loss went down.

The filter input is published by a stand-in filter stage run by `run_stage`, from videos made
with ffmpeg and hand-written targets, so the SFT stage reads a genuine `filter/` and manifest.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pandas as pd
import pytest
import torch

from data_schemas import FILTER, TRAIN_METRICS
from models.video import FrameSampling
from tasks.config import ConfigError, SFTConfig, load_config
from tasks.engine.manifest import read_manifest
from tasks.engine.run import run_stage
from tasks.engine.stage import StageContext
from tasks.engine.store import Workdir, stable_hash
from tasks.grading.prompts import user_prompt
from tasks.media.frames import read_video_frames
from tasks.sft.data import SFTExample, collate, encode_example, load_sft_examples
from tasks.sft.stage import SFTStage
from tasks.training.checkpoints import (
    TrainerState,
    checkpoints,
    prune,
    step_dir,
    write_state,
)
from tasks.training.schedule import TrainSchedule
from tests.support.processes import trainer_pids, wait_for
from tests.support.stand_ins import Published
from tests.support.videos import make_video

MAX_STEPS = 8
OVERRIDES = {
    "sft.max_steps": MAX_STEPS, "sft.save_every": 2, "sft.learning_rate": 2e-3, "sft.warmup_ratio": 0.25,
    "sft.num_frames": 8, "sft.sp_degree": 2, "sft.nproc_per_node": 2, "sft.zero_stage": 2,
}

QUESTIONS = [
    ("Temporal", "multiple_choice", "What happens first in the video?", ["the colours change", "a counter appears", "the screen goes dark", "nothing"],
     "<think>The frames start with colour bars, then the counter moves.</think><answer>B</answer>", "sft"),
    ("Spatial", "open_ended", "Where is the moving box?", None,
     "<think>I follow the box across the frames. It stays near the centre.</think><answer>in the centre</answer>", "sft"),
    ("Goal and Purpose", "open_ended", "Why is the pattern shown?", None,
     "<think>Test patterns are used to check a screen.</think><answer>to test the display</answer>", "sft"),
    ("Plot and Narrative", "multiple_choice", "What comes after the bars?", ["a cut", "a fade", "a title", "a zoom"],
     "<think>After the bars the video cuts.</think><answer>A</answer>", "rl"),
]


def filter_rows(video_uris: list[str]) -> list[dict]:
    """FILTER rows of hand-written items (split as given) about the test videos."""
    rows = []
    for i, (category, qtype, question, options, target, split) in enumerate(QUESTIONS):
        uri = video_uris[i % len(video_uris)]
        answer = target.split("<answer>")[1].split("</answer>")[0]
        rows.append({
            "qa_id": stable_hash([uri, question]), "video_id": Path(uri).stem, "video_uri": uri, "category": category,
            "question_type": qtype, "question": question, "options": options, "answer": answer,
            "prompt": user_prompt(question, qtype, options), "target": target, "n_runs": 10, "n_correct": 0,
            "n_format_ok": 0, "pass_rate": 0.0, "difficulty": "hard", "reasoning_words": len(target.split()),
            "quality": 1.0, "split": split, "model": "tiny", "num_frames": 8,
        })
    return rows


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> list[str]:
    root = tmp_path_factory.mktemp("sft-videos")
    return [str(make_video(root / "bars.mp4", 3, source="smptebars", audio=False)), str(make_video(root / "test.mp4", 2, audio=False))]


def make_ctx(root: Path, videos: list[str], extra_rows: list[dict] = ()) -> StageContext:
    ctx = StageContext(workdir=Workdir(str(root)), config=load_config("tiny", OVERRIDES))
    run_stage(Published("filter", FILTER, filter_rows(videos) + list(extra_rows)), ctx)
    return ctx


def split_loss(model_dir: str, examples: list[SFTExample]) -> float:
    """Mean token loss of a checkpoint on the examples (transformers forward with the positions SFT
    trains with, one process)."""
    from transformers import AutoModelForImageTextToText, AutoTokenizer

    from models.positions import use_trained_positions
    from models.vlm import load_preprocess_config

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = use_trained_positions(AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32)).eval()
    preprocess = load_preprocess_config(model_dir)
    batch = collate([encode_example(tokenizer, preprocess, e, read_video_frames(e.video_uri, FrameSampling(num_frames=8))) for e in examples], tokenizer.pad_token_id)
    with torch.no_grad():
        return float(model(**batch).loss)


def test_sigkill_then_rerun_resumes_and_sft_lowers_the_loss(tmp_path, videos):
    root = tmp_path / "wd"
    lost = {**filter_rows([str(tmp_path / "deleted.mp4")])[0], "qa_id": "lost"}
    ctx = make_ctx(root, videos, [lost])
    examples = [e for e in load_sft_examples(ctx.workdir) if e.qa_id != "lost"]
    assert len(examples) == 3  # the rl item is not trained on

    # 1. The stage in its own process group, killed with SIGKILL once the first checkpoint exists.
    script = textwrap.dedent(f"""
        from tasks.engine.store import Workdir
        from tasks.config import load_config
        from tasks.sft.stage import SFTStage
        from tasks.engine.stage import StageContext
        from tasks.engine.run import run_stage
        run_stage(SFTStage(), StageContext(Workdir({str(root)!r}), load_config("tiny", {OVERRIDES!r})))
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    ckpt_root = root / "sft" / "_checkpoints"
    try:
        wait_for(lambda: list(ckpt_root.glob("step-*")), 240, "the first checkpoint", proc)
        job_file = next((root / "sft" / "_work" / "train").glob("*/job.json"))
        workers = wait_for(lambda: trainer_pids(job_file), 10, "the worker processes")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    # The workers are not in the killed group (torchrun gives them their own sessions): the
    # orphan guard must end them before they write anything else.
    wait_for(lambda: not trainer_pids(job_file), 15, "the orphaned workers to exit")
    assert workers
    newest = max(int(p.name.split("-")[1]) for p in ckpt_root.glob("step-*"))
    assert 2 <= newest < MAX_STEPS and read_manifest(ctx.workdir, "sft") is None

    # 2. Rerun: resumes from the newest checkpoint and finishes.
    report = run_stage(SFTStage(), ctx)
    assert report.status == "done"
    result = json.loads(next((root / "sft" / "_work" / "train").glob("*/result.json")).read_text())
    assert result["resumed_from_step"] == newest and result["steps"] == MAX_STEPS
    assert result["world_size"] == 2 and result["sp_degree"] == 2 and result["examples"] == 3

    # Metrics: every step exactly once, the first run's rows up to the checkpoint kept.
    metrics = pd.read_parquet(root / "sft" / "metrics.parquet")
    assert list(metrics.columns) == TRAIN_METRICS.columns
    assert sorted(metrics.groupby("name").step.apply(list).to_dict().items()) == [
        (name, list(range(1, MAX_STEPS + 1))) for name in sorted(["loss", "tokens_per_s", "lr", "grad_norm"])
    ]
    loss = metrics[metrics.name == "loss"].set_index("step").value
    lr = metrics[metrics.name == "lr"].set_index("step").value
    assert lr[1] < lr[2] and lr[MAX_STEPS] < lr[2]  # warmup, then cosine decay
    assert loss[MAX_STEPS] < loss[1]

    # The trained model: loadable by the VLM adapter the next stages use, and better on the split.
    from models.tiny import ensure_tiny_model
    from models.vlm import HFVideoLM

    model_dir = root / "sft" / "model"
    assert {"config.json", "model.safetensors", "tokenizer.json", "chat_template.jinja", "lvr_video_preprocessor.json"} <= {
        p.name for p in model_dir.iterdir()
    }
    HFVideoLM(str(model_dir), device="cpu")
    before, after = split_loss(str(ensure_tiny_model()), examples), split_loss(str(model_dir), examples)
    assert after < before - 0.1, (before, after)

    manifest = read_manifest(ctx.workdir, "sft")
    assert manifest["rows"] == 4 * MAX_STEPS and manifest["tables"]["train_metrics"]["files"] == ["metrics.parquet"]
    failures = pd.read_parquet(root / "sft" / "_failures.parquet")
    assert failures.item_id.tolist() == ["lost"] and failures.error_kind.tolist() == ["missing_video"]
    assert len(list(ckpt_root.glob("step-*"))) <= ctx.config.sft.keep_checkpoints
    assert not list(ckpt_root.glob(".tmp-*"))
    markdown = SFTStage().report_markdown(ctx, manifest)
    assert "SFT loss" in markdown and "data:image/png;base64," in markdown
    assert run_stage(SFTStage(), ctx).status == "cached"


def test_worker_failure_fails_the_stage_with_its_traceback(tmp_path, videos, monkeypatch):
    """The stage launches through `launch_spec`; here its workers are ones whose rank 1 raises."""
    from parallel.launch import WorkerFailed
    from tests.parallel.test_launch import boom_spec

    ctx = make_ctx(tmp_path / "wd", videos)
    monkeypatch.setattr(SFTStage, "launch_spec", lambda self, ctx, job_file: boom_spec(tmp_path))
    with pytest.raises(WorkerFailed, match="boom from rank 1") as info:
        run_stage(SFTStage(), ctx)
    assert info.value.rank == 1 and "Traceback" in info.value.worker_traceback
    assert read_manifest(ctx.workdir, "sft") is None


def test_a_training_run_over_its_time_limit_fails_the_stage_naming_the_limit(tmp_path, videos, monkeypatch):
    """Workers that sleep for minutes under `sft.launch_timeout_s=3`: stopped, and the error says which limit."""
    from tasks.engine.stage import StageError
    from tests.parallel.test_launch import sleep_spec

    ctx = make_ctx(tmp_path / "wd", videos)
    fingerprint_settings = ctx.config.sft.output_settings()
    ctx.config.sft.launch_timeout_s = 3
    assert ctx.config.sft.output_settings() == fingerprint_settings  # a runtime key: it trains the same model
    monkeypatch.setattr(SFTStage, "launch_spec", lambda self, ctx, job_file: sleep_spec(tmp_path))
    with pytest.raises(StageError, match=r"sft: training did not finish within sft.launch_timeout_s=3 s"):
        run_stage(SFTStage(), ctx)
    assert not trainer_pids(tmp_path / "job", "sleep_worker") and read_manifest(ctx.workdir, "sft") is None


def test_missing_videos_bad_sp_degree_and_empty_split_are_errors(tmp_path, videos):
    from tasks.engine.stage import StageError

    root = tmp_path / "wd"
    ctx = StageContext(workdir=Workdir(str(root)), config=load_config("tiny", OVERRIDES))
    run_stage(Published("filter", FILTER, filter_rows([str(tmp_path / "gone.mp4")])), ctx)
    with pytest.raises(StageError, match="none of the 3 sft examples has its source video"):
        run_stage(SFTStage(), ctx)
    run_stage(Published("filter", FILTER, filter_rows(videos)), ctx)
    ctx.config = load_config("tiny", {**OVERRIDES, "sft.sp_degree": 8, "sft.nproc_per_node": 8})
    with pytest.raises(StageError, match="sp_degree=8 does not fit .* pick an SP degree that divides 4"):
        run_stage(SFTStage(), ctx)
    rows = [{**r, "split": "rl"} for r in filter_rows(videos)]
    run_stage(Published("filter", FILTER, rows), ctx)
    with pytest.raises(StageError, match="no item in the sft split"):
        run_stage(SFTStage(), ctx)


def test_labels_score_only_the_assistant_turn(videos):
    from transformers import AutoTokenizer

    from models.tiny import ensure_tiny_model
    from models.vlm import load_preprocess_config

    model_dir = ensure_tiny_model()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    target = "<think>The bars come first.</think><answer>B</answer>"
    example = SFTExample("q", videos[0], user_prompt("What is first?", "open_ended", None), target)
    enc = encode_example(tokenizer, load_preprocess_config(model_dir), example, read_video_frames(videos[0], FrameSampling(num_frames=8)))
    scored = enc["labels"][enc["labels"] != -100]
    assert tokenizer.decode(scored) == target + "<|im_end|>\n"
    assert int((enc["input_ids"] == tokenizer.convert_tokens_to_ids("<|video_pad|>")).sum()) == enc["video_grid_thw"].prod() // 4
    batch = collate([enc, {**enc, **{k: enc[k][:, :-5] for k in ("input_ids", "attention_mask", "mm_token_type_ids", "labels")}}], 0)
    assert batch["attention_mask"][1, -5:].sum() == 0 and (batch["labels"][1, -5:] == -100).all()


def test_schedule_is_a_pure_function_of_the_step():
    cfg = SFTConfig(model="tiny", micro_batch_size=2, grad_accum=2, epochs=3, warmup_ratio=0.25, nproc_per_node=4, sp_degree=2)
    schedule = TrainSchedule.plan(10, cfg, dp_size=2)
    assert schedule.total_steps == 3 * 2 and schedule.warmup_steps == 2  # ceil(10 / (2*2*2)) steps per epoch
    seen = [i for step in range(2) for dp in range(2) for mb in schedule.micro_batches(step, dp) for i in mb]
    assert sorted(seen[:10]) == list(range(10))  # one epoch: every example once, then the next epoch begins
    assert schedule.micro_batches(1, 1) == TrainSchedule.plan(10, cfg, dp_size=2).micro_batches(1, 1)
    factors = [schedule.lr_factor(s) for s in range(schedule.total_steps)]
    assert factors[:3] == [0.5, 1.0, 1.0] and factors[-1] < factors[3] < 1.0
    assert TrainSchedule.plan(10, SFTConfig(model="tiny", max_steps=7), 1).total_steps == 7


def test_sft_config_checks_the_topology():
    with pytest.raises(ConfigError, match=r"sp_degree \(3\) must divide the number of processes \(2\)"):
        load_config("tiny", {"sft.sp_degree": 3, "sft.nproc_per_node": 2})
    with pytest.raises(ConfigError, match=r"nnodes > 1 needs master_addr \(the address of node 0\)"):
        load_config("tiny", {"sft.nnodes": 2})


def test_prune_keeps_the_newest_checkpoints_of_the_run(tmp_path):
    for step, key in [(2, "a"), (4, "a"), (6, "a"), (8, "b")]:
        step_dir(tmp_path, step).mkdir()
        write_state(step_dir(tmp_path, step), TrainerState(key, step, 10, 1.0))
    (tmp_path / ".tmp-step-10").mkdir()
    prune(tmp_path, "a", keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-4", "step-6"]
    assert [s.step for _, s in checkpoints(tmp_path, "a")] == [6, 4]
