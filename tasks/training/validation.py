"""Validation while training: rank 0 of an SFT or GRPO run answers a few questions of the eval split
with the model being trained, every `tracking.validate_every` steps and after the last one.

The stage reads the questions from the workdir (`validation_examples`) and puts them in the job
file, so the workers never read the workdir. Each question is posed as the eval stage poses it (the
row's training prompt after the video, the run's own frame count, greedy decoding) and graded with
`tasks.grading.answers.grade`; `val_accuracy` and `val_format` are the fractions correct and well
formatted. Questions go one at a time, so no padding makes an answer differ from what
`models.vlm.HFVideoLM` generates from the saved model.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from data_schemas import EVAL_SPLIT, FILTER
from models.video import (
    FrameSampling,
    VideoPreprocessConfig,
    VideoTokenBudget,
    build_video_inputs,
)
from models.qwen_sp import generation_attention
from models.vlm import VideoPrompt, video_messages
from tasks.engine.stage import read_stage_table
from tasks.engine.store import Workdir
from tasks.grading.answers import AnswerKey, grade
from tasks.media.frames import read_video_frames

VALIDATION_METRICS = ("val_accuracy", "val_format")


@dataclass(frozen=True)
class ValidationExample:
    """One eval question: where its video is, the prompt it is posed with, and its answer key."""

    qa_id: str
    video_uri: str
    prompt: str
    question_type: str
    question: str
    answer: str
    options: tuple[str, ...] | None = None

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ValidationExample:
        options = data.get("options")
        return cls(**{**data, "options": tuple(options) if options is not None else None})

    def key(self) -> AnswerKey:
        return AnswerKey(self.question, self.question_type, self.answer, self.options)


def validation_examples(workdir: Workdir, limit: int) -> tuple[ValidationExample, ...]:
    """The first `limit` questions (by qa_id) of the filter table's eval split."""
    if limit <= 0:
        return ()
    rows = [r for r in read_stage_table(workdir, "filter", FILTER).to_pylist() if r["split"] == EVAL_SPLIT]
    examples = sorted(
        (
            ValidationExample(
                r["qa_id"], r["video_uri"], r["prompt"], r["question_type"], r["question"], r["answer"],
                tuple(r["options"]) if r["options"] is not None else None,
            )
            for r in rows
        ),
        key=lambda e: e.qa_id,
    )
    return tuple(examples[:limit])


@contextlib.contextmanager
def generation_mode(module: torch.nn.Module, model: torch.nn.Module) -> Iterator[None]:
    """`module` (what the engine trains) in eval mode without gradients, and `model` (the
    `save_pretrained` model inside it) with the attention a saved checkpoint loads with; both
    restored afterwards."""
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad(), generation_attention(model):
            yield
    finally:
        module.train(was_training)


def answer(
    model: torch.nn.Module, tokenizer: Any, preprocess: VideoPreprocessConfig, prompt: VideoPrompt, max_new_tokens: int,
    budget: VideoTokenBudget | None = None,
) -> str:
    """The greedy answer to one prompt (its video under `budget`), decoded as `HFVideoLM` decodes (up
    to the first EOS or pad)."""
    device = next(model.parameters()).device
    built = build_video_inputs(tokenizer, [prompt.messages], [prompt.frames], preprocess, budget=budget)
    inputs = {k: v.to(device) for k, v in built.items()}
    if "pixel_values_videos" in inputs:
        inputs["pixel_values_videos"] = inputs["pixel_values_videos"].to(model.dtype)
    output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, num_return_sequences=1, pad_token_id=tokenizer.pad_token_id)
    eos = model.generation_config.eos_token_id
    stop = set(eos if isinstance(eos, list) else [eos]) if eos is not None else set()
    if tokenizer.pad_token_id is not None:
        stop.add(tokenizer.pad_token_id)
    new = output[0, inputs["input_ids"].shape[1] :].tolist()
    end = next((k for k, t in enumerate(new) if t in stop), len(new))
    return tokenizer.decode(new[:end], skip_special_tokens=True).strip()


def validate(
    module: torch.nn.Module, model: torch.nn.Module, tokenizer: Any, preprocess: VideoPreprocessConfig,
    examples: Sequence[ValidationExample], sampling: FrameSampling, budget: VideoTokenBudget | None, max_new_tokens: int,
) -> dict[str, float]:
    """`val_accuracy` and `val_format` of `model` (inside the trained `module`) on `examples`, their
    videos sampled and sized as the stage being trained sees them (`sampling`, `budget`)."""
    frames: dict[str, Any] = {}
    correct = formatted = 0
    with generation_mode(module, model):
        for example in examples:
            if example.video_uri not in frames:
                frames = {example.video_uri: read_video_frames(example.video_uri, sampling)}
            prompt = VideoPrompt(video_messages(example.prompt), frames[example.video_uri])
            text = answer(model, tokenizer, preprocess, prompt, max_new_tokens, budget)
            verdict = grade(text, example.key())
            correct += verdict.correct
            formatted += verdict.format_ok
    n = max(len(examples), 1)
    return {"val_accuracy": correct / n, "val_format": formatted / n}
