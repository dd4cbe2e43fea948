"""The GRPO stage end to end through the real engine: a synthetic `filter/` in, torchrun with the
DeepSpeed worker, SIGKILL after the first checkpoint, the rerun resumes, `grpo/` out.

The initial model is the tiny model after a few SFT steps on the synthetic SFT split, so that its
rollouts earn varied rewards and the updates really happen.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pandas as pd
import pytest
import torch

from data_schemas import FILTER, TRAIN_METRICS
from tasks.config import load_config
from tasks.engine.manifest import read_manifest
from tasks.engine.run import run_stage
from tasks.engine.stage import StageContext, StageError, read_stage_table
from tasks.engine.store import Workdir
from tasks.grpo.stage import GRPOStage, init_model
from tasks.samples.synth import SynthSpec, write_synth
from tests.support.processes import trainer_pids, wait_for

STEPS = 4
SPEC = SynthSpec(videos=6)  # 1 eval, 2 sft and 3 rl videos; 3 questions each


def prime_model(workdir: Workdir, out: Path) -> Path:
    """The tiny model after 12 AdamW steps on two SFT targets: it writes the answer format often
    enough for a group's rewards to differ."""
    from transformers import AutoModelForImageTextToText, AutoTokenizer

    from models.positions import use_trained_positions
    from models.tiny import ensure_tiny_model
    from models.video import FrameSampling
    from models.vlm import load_preprocess_config
    from tasks.media.frames import read_video_frames
    from tasks.sft.data import collate, encode_example, load_sft_examples
    from tasks.training.checkpoints import copy_processor_files

    torch.manual_seed(0)
    base = ensure_tiny_model()
    tokenizer = AutoTokenizer.from_pretrained(base)
    model = use_trained_positions(AutoModelForImageTextToText.from_pretrained(base, dtype=torch.float32))
    examples = load_sft_examples(workdir)[:2]
    batch = collate([encode_example(tokenizer, load_preprocess_config(base), e, read_video_frames(e.video_uri, FrameSampling(num_frames=SPEC.num_frames))) for e in examples],
                    tokenizer.pad_token_id)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(12):
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    copy_processor_files(base, out)
    return out


def overrides(model: Path) -> dict:
    return {
        "grpo.model": str(model), "grpo.nproc_per_node": 1, "grpo.steps": STEPS, "grpo.save_every": 2, "grpo.prompts_per_step": 3, "grpo.group_size": 4,
        "grpo.max_new_tokens": 16, "grpo.num_frames": SPEC.num_frames, "grpo.learning_rate": 1e-3, "grpo.updates_per_step": 2,
        "grpo.micro_batch_size": 6, "grpo.shuffle_options": True, "tracking.backend": "tensorboard", "tracking.samples_every": 1,
    }


def test_sigkill_then_rerun_resumes_and_publishes(tmp_path):
    root = tmp_path / "wd"
    write_synth(str(root), SPEC)
    model = prime_model(Workdir(str(root)), tmp_path / "primed")
    ctx = StageContext(Workdir(str(root)), load_config("tiny", overrides(model)))

    script = textwrap.dedent(f"""
        from tasks.engine.store import Workdir
        from tasks.config import load_config
        from tasks.grpo.stage import GRPOStage
        from tasks.engine.stage import StageContext
        from tasks.engine.run import run_stage
        run_stage(GRPOStage(), StageContext(Workdir({str(root)!r}), load_config("tiny", {overrides(model)!r})))
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    ckpt_root = root / "grpo" / "_checkpoints"
    try:
        wait_for(lambda: list(ckpt_root.glob("step-*")), 240, "the first checkpoint", proc)
        job_file = next((root / "grpo" / "_work" / "train").glob("*/job.json"))
        workers = wait_for(lambda: trainer_pids(job_file, "tasks.grpo.trainer"), 10, "the worker process")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    wait_for(lambda: not trainer_pids(job_file, "tasks.grpo.trainer"), 15, "the orphaned worker to exit")
    assert workers and read_manifest(ctx.workdir, "grpo") is None
    assert [p.name for p in ckpt_root.glob("step-*")] == ["step-2"]

    report = run_stage(GRPOStage(), ctx)
    assert report.status == "done"
    result = json.loads(next((root / "grpo" / "_work" / "train").glob("*/result.json")).read_text())
    assert result["resumed_from_step"] == 2 and result["steps"] == STEPS and result["world_size"] == 1

    metrics = pd.read_parquet(root / "grpo" / "metrics.parquet")
    assert list(metrics.columns) == TRAIN_METRICS.columns and set(metrics.stage) == {"grpo"}
    by_name = metrics.groupby("name").step.apply(list).to_dict()
    for name in ("reward", "accuracy_reward", "format_reward", "response_length", "groups_kept", "encoder_calls", "step_time_s",
                 "judge_failures"):
        assert by_name[name] == list(range(1, STEPS + 1)), name  # every step once, the first run's kept
    assert "kl" in by_name and "clip_fraction" in by_name and "loss" in by_name  # some step kept a group and updated
    value = metrics.set_index(["name", "step"]).value
    assert value["reward"].between(0, 1).all() and value["format_reward"].max() > 0
    # MR-SP stage 1 with the disk cache: each of the 3 rl videos went through the tower at most once in
    # the whole run (the rerun found the first run's embeddings), one tower call per step at most.
    assert value["videos_encoded"].sum() <= 3 and value["encoder_calls"].max() <= 1 and value["cache_hits"].sum() > 0
    assert len(list((root / "grpo" / "_embeddings").glob("*/*.safetensors"))) == value["videos_encoded"].sum()

    # Tracking across the kill: the sampled rollouts of the steps before the checkpoint came back with it, and
    # TensorBoard holds every step once (what the killed run logged past the checkpoint was purged).
    samples = pd.read_parquet(root / "grpo" / "_samples")
    assert samples.groupby("step").size().to_dict() == {s: 3 * 4 for s in range(1, STEPS + 1)}  # prompts_per_step x G
    # grpo.shuffle_options: the palette's options were put in other orders than the filter's, the same
    # way to all G rollouts of a group.
    put = samples[samples.prompt.str.contains("\nA. ")].groupby(["step", "qa_id"]).prompt.agg(set)
    assert len(put) and all(len(prompts) == 1 for prompts in put)
    assert len({p for prompts in put for p in prompts} - set(read_stage_table(ctx.workdir, "filter", FILTER).to_pandas().prompt)) > 0
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(next((root / "grpo" / "_tensorboard").iterdir())), size_guidance={"scalars": 0})
    events.Reload()
    logged = events.Scalars("grpo/reward")
    assert [e.step for e in logged] == list(range(1, STEPS + 1))
    assert [e.value for e in logged] == pytest.approx(value["reward"].tolist(), rel=1e-6)  # float32 events

    from models.vlm import HFVideoLM

    trained = HFVideoLM(str(root / "grpo" / "model"), device="cpu")
    info = json.loads((root / "grpo" / "model" / "lvr_train.json").read_text())
    assert info["step"] == STEPS and info["base_model"] == str(model)
    primed = HFVideoLM(str(model), device="cpu")
    changed = [n for (n, p), q in zip(trained.model.named_parameters(), primed.model.parameters()) if not torch.equal(p, q)]
    assert changed and not any(".visual." in n for n in changed)  # trained, vision tower frozen

    manifest = read_manifest(ctx.workdir, "grpo")
    assert manifest["rows"] == len(metrics) and manifest["tables"]["train_metrics"]["files"] == ["metrics.parquet"]
    assert not list(ckpt_root.glob(".tmp-*"))
    markdown = GRPOStage().report_markdown(ctx, manifest)
    assert "GRPO rewards" in markdown and "data:image/png;base64," in markdown
    assert run_stage(GRPOStage(), ctx).status == "cached"


def test_initial_model_is_sft_once_complete_and_the_rl_split_is_required(tmp_path):
    """grpo.model=sft needs a finished SFT model (never a silent start from the base model);
    grpo.model=base is the base model; and an empty rl split stops the stage."""
    root = tmp_path / "wd"
    write_synth(str(root), SynthSpec(videos=4, eval_fraction=0.25, sft_fraction=0.75))  # no rl video
    ctx = StageContext(Workdir(str(root)), load_config("tiny"))
    with pytest.raises(StageError, match="grpo.model is 'sft' but .*sft/model does not exist.*grpo.model=base"):
        init_model(ctx)
    base = StageContext(Workdir(str(root)), load_config("tiny", ["grpo.model=base"]))
    assert not init_model(base).from_sft and init_model(base).path == ctx.config.filter.model
    with pytest.raises(StageError, match="no item in the rl split"):
        run_stage(GRPOStage(), base)

    sft = root / "sft"
    (sft / "model").mkdir(parents=True)
    (sft / "_manifest.json").write_text(json.dumps({"status": "complete", "fingerprint": "sft-fp"}))
    init = init_model(ctx)
    assert init.from_sft and init.path == str(sft / "model") and GRPOStage().input_fingerprints(ctx)["sft"] == "sft-fp"
    shutil.rmtree(sft)
