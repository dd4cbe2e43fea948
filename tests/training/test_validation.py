"""Validation while training: an SFT run with `tracking.validate_every` answers the eval split with
the model it trains and records `val_accuracy` / `val_format` in `metrics.parquet`; the values are
those a separate scoring of the published model gives, and validation never changes the recipe.
"""

from __future__ import annotations

import pandas as pd
import torch

from data_schemas import EVAL_SPLIT, FILTER
from models.video import FrameSampling
from models.vlm import HFVideoLM, VideoPrompt, video_messages
from tasks.config import load_config
from tasks.engine.manifest import read_manifest
from tasks.engine.run import run_stage
from tasks.engine.stage import StageContext, read_stage_table
from tasks.engine.store import Workdir
from tasks.grading.answers import AnswerKey, grade
from tasks.media.frames import read_video_frames
from tasks.samples.synth import SynthSpec, write_synth
from tasks.sft.stage import SFTStage
from tasks.sft.trainer import TrainJob
from tasks.training.validation import validation_examples

SPEC = SynthSpec(videos=6)  # 1 eval, 2 sft and 3 rl videos; 3 questions each
SFT = {
    "sft.max_steps": 2, "sft.sp_degree": 1, "sft.nproc_per_node": 1, "sft.num_frames": SPEC.num_frames, "sft.save_every": 10,
    "sft.learning_rate": 1e-3,
}
VALIDATE = {"tracking.validate_every": 1, "tracking.validate_examples": 2, "tracking.validate_max_new_tokens": 12}


def test_sft_records_validation_accuracy_of_the_model_it_trains_without_changing_its_fingerprint(tmp_path):
    root = tmp_path / "wd"
    write_synth(str(root), SPEC)
    workdir = Workdir(str(root))
    assert run_stage(SFTStage(), StageContext(workdir, load_config("tiny", {**SFT, **VALIDATE}))).status == "done"

    metrics = pd.read_parquet(root / "sft" / "metrics.parquet")
    val = {name: dict(zip(group.step, group.value)) for name, group in metrics[metrics.name.str.startswith("val_")].groupby("name")}
    assert sorted(val) == ["val_accuracy", "val_format"]
    assert all(sorted(steps) == [1, 2] and all(0 <= v <= 1 for v in steps.values()) for steps in val.values())

    # The last validation scored the published model: score it again, independently, as the eval stage would.
    rows = sorted((r for r in read_stage_table(workdir, "filter", FILTER).to_pylist() if r["split"] == EVAL_SPLIT), key=lambda r: r["qa_id"])[:2]
    assert len(rows) == 2
    lm = HFVideoLM(str(root / "sft" / "model"))
    grades = []
    for row in rows:
        frames = read_video_frames(row["video_uri"], FrameSampling(num_frames=SPEC.num_frames))
        (generation,), = lm.generate([VideoPrompt(video_messages(row["prompt"]), frames)], max_new_tokens=12)
        grades.append(grade(generation.text, AnswerKey.from_row(row)))
    assert val["val_accuracy"][2] == sum(g.correct for g in grades) / len(grades)
    assert val["val_format"][2] == sum(g.format_ok for g in grades) / len(grades)

    # Validation lives in the tracking section: the same recipe without it is the finished stage.
    fingerprint = read_manifest(workdir, "sft")["fingerprint"]
    assert run_stage(SFTStage(), StageContext(workdir, load_config("tiny", SFT))).status == "cached"
    assert read_manifest(workdir, "sft")["fingerprint"] == fingerprint


def test_the_job_file_carries_the_validation_questions(tmp_path):
    root = tmp_path / "wd"
    write_synth(str(root), SPEC)
    examples = validation_examples(Workdir(str(root)), 32)
    assert len(examples) == 3 and examples == tuple(sorted(examples, key=lambda e: e.qa_id))
    assert validation_examples(Workdir(str(root)), 2) == examples[:2]
    job = TrainJob("key", "tiny", (), load_config("tiny").sft, str(tmp_path), str(tmp_path), validation=examples)
    job.save(tmp_path / "job.json")
    assert TrainJob.load(tmp_path / "job.json") == job


def test_a_validation_answer_is_what_hfvideolm_generates_even_from_a_model_set_up_for_ulysses(tmp_path):
    from models.qwen_sp import enable_ulysses
    from tasks.training.validation import answer, generation_mode

    root = tmp_path / "wd"
    write_synth(str(root), SPEC)
    lm, trained = HFVideoLM("tiny"), HFVideoLM("tiny")
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # the same perturbation of both: the tiny model's own first token is an EOS
        for mine, theirs in zip(lm.model.parameters(), trained.model.parameters()):
            noise = torch.randn(mine.shape, generator=generator) * 0.5
            mine.add_(noise)
            theirs.add_(noise)
    enable_ulysses(trained.model)  # as the SFT trainer's MM-SP wrapper leaves it
    trained.model.train()
    texts = []
    for example in validation_examples(Workdir(str(root)), 3):
        prompt = VideoPrompt(video_messages(example.prompt), read_video_frames(example.video_uri, FrameSampling(num_frames=SPEC.num_frames)))
        with generation_mode(trained.model, trained.model):
            texts.append(answer(trained.model, trained.tokenizer, trained.preprocess, prompt, 12))
        assert texts[-1] == lm.generate([prompt], max_new_tokens=12)[0][0].text
    assert any(texts) and trained.model.training  # real answers; the training mode and attention are restored
    assert trained.model.config.text_config._attn_implementation == "lvr_ulysses"
