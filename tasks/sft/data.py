"""SFT examples: where they come from (the filter stage's sft split) and their token/pixel encoding."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from data_schemas import FILTER
from models.video import (
    SampledFrames,
    VideoPreprocessConfig,
    VideoTokenBudget,
    build_video_inputs,
)
from models.vlm import video_messages
from parallel.sequence import IGNORE_INDEX
from tasks.config import VideoInputs
from tasks.engine.stage import read_stage_table
from tasks.engine.store import Workdir
from tasks.media.frames import FrameCache, read_video_frames

SFT_SPLIT = "sft"


@dataclass(frozen=True)
class SFTExample:
    """One chain-of-thought SFT sample: a question about a whole source video.

    `prompt`: the user turn's text after the video, as `tasks.grading.prompts.user_prompt` writes it
    (the filter stage stores it per item); `target`: `<think>...</think><answer>...</answer>`.
    """

    qa_id: str
    video_uri: str
    prompt: str
    target: str

    def messages(self) -> list[dict[str, Any]]:
        return video_messages(self.prompt)


def load_sft_examples(workdir: Workdir) -> list[SFTExample]:
    """The SFT split of a workdir, sorted by qa_id: the only place that maps the filter table's
    columns to training examples."""
    rows = read_stage_table(workdir, "filter", FILTER).to_pylist()
    return sorted(
        (SFTExample(r["qa_id"], r["video_uri"], r["prompt"], r["target"]) for r in rows if r["split"] == SFT_SPLIT),
        key=lambda e: e.qa_id,
    )


def encode_example(
    tokenizer, preprocess: VideoPreprocessConfig, example: SFTExample, frames: SampledFrames, budget: VideoTokenBudget | None = None
) -> dict[str, torch.Tensor]:
    """Model inputs of one example (batch of one), with `labels` scoring the assistant turn only;
    the video preprocessed under `budget`.

    The assistant turn is what the chat template appends after the generation prompt for an
    assistant message holding the target (for Qwen: the target, `<|im_end|>` and a newline), so
    the model learns to stop the way the template ends a turn.
    """
    messages = example.messages()
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template(
        [*messages, {"role": "assistant", "content": example.target}], tokenize=False, add_generation_prompt=False
    )
    if not full.startswith(prompt):
        raise ValueError("the chat template renders the prompt differently once an assistant turn follows it")
    completion = tokenizer(full[len(prompt) :], add_special_tokens=False, return_tensors="pt")["input_ids"]
    inputs = build_video_inputs(tokenizer, prompt, [frames], preprocess, budget=budget)
    n_prompt = inputs["input_ids"].shape[1]
    inputs["input_ids"] = torch.cat([inputs["input_ids"], completion], dim=1)
    inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
    inputs["mm_token_type_ids"] = torch.cat([inputs["mm_token_type_ids"], torch.zeros_like(completion)], dim=1)
    labels = inputs["input_ids"].clone()
    labels[:, :n_prompt] = IGNORE_INDEX
    inputs["labels"] = labels
    return inputs


def example_inputs(
    tokenizer, preprocess: VideoPreprocessConfig, example: SFTExample, cfg: VideoInputs, cache: FrameCache | None = None
) -> dict[str, torch.Tensor]:
    """`encode_example` of the frames `cfg` samples from the example's video, under `cfg`'s token
    budget. Through `cache` when given: a video is read and resized for the model once while it stays
    there (the same inputs: `preprocess_video` finds the frames at size)."""
    sampling, budget = cfg.frame_sampling(), cfg.video_budget()
    if cache is not None:
        frames = cache.read(example.video_uri, sampling, preprocess, budget)
    else:
        frames = read_video_frames(example.video_uri, sampling)
    return encode_example(tokenizer, preprocess, example, frames, budget)


def collate(encoded: list[dict[str, torch.Tensor]], pad_id: int) -> dict[str, torch.Tensor]:
    """Batch encoded examples, padding on the right (the layout sequence-parallel causal
    attention needs no mask for) with `pad_id`, label -100 and attention mask 0."""
    length = max(e["input_ids"].shape[1] for e in encoded)
    fill = {"input_ids": pad_id, "attention_mask": 0, "mm_token_type_ids": 0, "labels": IGNORE_INDEX}
    batch: dict[str, torch.Tensor] = {}
    for name, value in fill.items():
        rows = [torch.nn.functional.pad(e[name], (0, length - e[name].shape[1]), value=value) for e in encoded]
        batch[name] = torch.cat(rows)
    for name in ("pixel_values_videos", "video_grid_thw", "second_per_grid_ts"):
        batch[name] = torch.cat([e[name] for e in encoded])
    return batch
