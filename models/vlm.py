"""Loading a Qwen-VL-style video language model through transformers, and generating from videos.

One adapter serves every stage that asks a VLM about a video (captioning, difficulty filtering,
evaluation, GRPO rollouts): checkpoints load through the normal `from_pretrained` path (the tiny
model included), video inputs come from our own preprocessing (`models/video.py`), and the vision
tower's calls and the patch rows it saw are counted so callers can prove a video was encoded once.

Two ways to generate:

- `HFVideoLM.generate(prompts, ...)`: pixels in, text out; transformers runs the vision tower.
- `HFVideoLM.encode(prompts)` -> `EncodedVideoBatch`, then `HFVideoLM.generate_encoded(batch, ...)`
  any number of times: the tower runs once in `encode` (once per distinct `SampledFrames` object,
  so questions about the same video share it) and never again, however many samples are drawn
  (`num_return_sequences`) or how many times the batch is reused (GRPO reuses it for its rollouts
  and its policy forward passes: MR-SP stage 1, cached video embeddings).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from models.positions import use_trained_positions
from models.tiny import tiny_model_dir
from models.video import (
    VIDEO_PREPROCESSOR_FILE,
    SampledFrames,
    VideoPreprocessConfig,
    VideoTokenBudget,
    build_video_inputs,
)

log = logging.getLogger("lvr.vlm")


class ModelLoadError(RuntimeError):
    """A checkpoint that cannot be loaded as asked; the message says what to change."""


def resolve_model_ref(ref: str) -> str:
    """`tiny` is our locally built tiny Qwen2.5-VL (built on first use); anything else is a
    checkpoint folder or a model id that `from_pretrained` resolves."""
    built = tiny_model_dir(ref)
    if built is not None:
        return str(built)
    path = Path(ref).expanduser()
    return str(path.resolve()) if path.exists() else ref


def needs_remote_code(model_dir: str) -> bool:
    config = Path(model_dir) / "config.json"
    if not config.is_file():
        return False
    return "auto_map" in json.loads(config.read_text())


def load_preprocess_config(model_dir: str) -> VideoPreprocessConfig:
    """Our preprocessing settings for a checkpoint: lvr's own file (tiny models) or the fields of a
    Qwen2-VL `preprocessor_config.json` (released checkpoints); defaults otherwise."""
    folder = Path(model_dir)
    if (folder / VIDEO_PREPROCESSOR_FILE).is_file():
        return VideoPreprocessConfig.from_pretrained(folder)
    qwen = folder / "preprocessor_config.json"
    if not qwen.is_file():
        return VideoPreprocessConfig()
    data = json.loads(qwen.read_text())
    size = data.get("size") or {}
    fields: dict[str, Any] = {
        "patch_size": data.get("patch_size"),
        "merge_size": data.get("merge_size"),
        "temporal_patch_size": data.get("temporal_patch_size"),
        "min_pixels": data.get("min_pixels", size.get("shortest_edge")),
        "max_pixels": data.get("max_pixels", size.get("longest_edge")),
        "image_mean": tuple(data["image_mean"]) if "image_mean" in data else None,
        "image_std": tuple(data["image_std"]) if "image_std" in data else None,
    }
    return VideoPreprocessConfig(**{k: v for k, v in fields.items() if v is not None})


@dataclass(frozen=True)
class VideoPrompt:
    """One request: a conversation whose user turn holds one `{"type": "video"}` part, and its frames."""

    messages: list[dict[str, Any]]
    frames: SampledFrames


@dataclass(frozen=True)
class Generation:
    text: str
    tokens_in: int
    tokens_out: int
    distinct_tokens: int
    finished: bool  # ended with EOS rather than by hitting max_new_tokens


@dataclass
class GenerationTiming:
    preprocess_s: float = 0.0
    model_s: float = 0.0


@dataclass(frozen=True)
class EncodedVideoBatch:
    """Prompts whose videos have been through the vision tower, reusable without the pixels.

    Text inputs are those of `build_video_inputs` (left-padded, each `<|video_pad|>` expanded to
    the video's token count). `video_embeds[i]` is prompt i's video in the language model's
    embedding space, `(tokens_i, hidden)`; prompts built on the same `SampledFrames` object share
    one tensor. `patch_rows` is how many patch rows the tower processed to make them.
    """

    input_ids: Any
    attention_mask: Any
    mm_token_type_ids: Any
    video_grid_thw: Any
    second_per_grid_ts: Any
    video_embeds: tuple[Any, ...]
    patch_rows: int

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    def model_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for the model's `generate` (or `forward`): the text inputs and the
        precomputed video features as `mm_encoder_outputs`, transformers' own entry point for them.

        Why not `inputs_embeds`: without `input_ids`, Qwen2.5-VL's generation falls back to 1-D
        text positions (and zero `rope_deltas`) for the whole prompt, so the video tokens would lose
        their 3-D mRoPE positions. With `input_ids` kept, positions and the `rope_deltas` the decode
        steps rely on are computed exactly as for pixel inputs, and `generate` expands the
        embeddings (not the pixels) for `num_return_sequences`. The wrapper is built fresh on every
        call because `generate` rewrites it in place when it expands a batch.
        """
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        return {
            "input_ids": self.input_ids,
            "attention_mask": self.attention_mask,
            "mm_token_type_ids": self.mm_token_type_ids,
            "video_grid_thw": self.video_grid_thw,
            "second_per_grid_ts": self.second_per_grid_ts,
            "mm_encoder_outputs": {"video": BaseModelOutputWithPooling(pooler_output=list(self.video_embeds))},
        }


def video_messages(prompt: str, system: str | None = None) -> list[dict[str, Any]]:
    messages: list[dict[str, Any]] = []
    if system:
        messages.append({"role": "system", "content": system})
    messages.append({"role": "user", "content": [{"type": "video"}, {"type": "text", "text": prompt}]})
    return messages


def pick_device(device: str = "auto") -> str:
    import torch

    if device != "auto":
        return device
    return "cuda" if torch.cuda.is_available() else "cpu"


@dataclass
class HFVideoLM:
    """A transformers VLM with its tokenizer and video preprocessing settings.

    `budget`: the stage's video token budget; each video is preprocessed under it for the frames it
    has (`models.video.budgeted_preprocess`), `preprocess` stays the checkpoint's own settings."""

    model_ref: str
    device: str = "auto"
    dtype: str = "auto"
    trust_remote_code: bool = False
    revision: str | None = None  # the pinned commit of a hub model id (ignored for local folders)
    budget: VideoTokenBudget | None = None
    model: Any = field(init=False, repr=False)
    tokenizer: Any = field(init=False, repr=False)
    preprocess: VideoPreprocessConfig = field(init=False)
    encoder_calls: int = field(init=False, default=0)
    encoder_patch_rows: int = field(init=False, default=0)
    _lock: threading.Lock = field(init=False, repr=False, default_factory=threading.Lock)

    def __post_init__(self) -> None:
        import torch
        from transformers import AutoModelForImageTextToText, AutoTokenizer

        path = resolve_model_ref(self.model_ref)
        if needs_remote_code(path) and not self.trust_remote_code:
            raise ModelLoadError(
                f"{self.model_ref} ships its own modelling code (NVILA/VILA checkpoints do); loading it runs that code, "
                "so it is refused unless `trust_remote_code: true` is set for this stage"
            )
        self.device = pick_device(self.device)
        torch_dtype = {"auto": "auto", "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[self.dtype]
        if torch_dtype == "auto":
            torch_dtype = torch.bfloat16 if self.device.startswith("cuda") else torch.float32
        self.tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=self.trust_remote_code, revision=self.revision)
        self.model = use_trained_positions(AutoModelForImageTextToText.from_pretrained(
            path, dtype=torch_dtype, trust_remote_code=self.trust_remote_code, revision=self.revision
        )).to(self.device)
        self.model.eval()
        self.preprocess = load_preprocess_config(path)
        visual = getattr(self.model, "visual", None) or getattr(getattr(self.model, "model", None), "visual", None)
        if visual is not None:
            visual.register_forward_hook(self._count_encoder_call, with_kwargs=True)
        self.name = self.model_ref

    def _count_encoder_call(self, _module: Any, args: tuple, kwargs: dict[str, Any], _output: Any) -> None:
        self.encoder_calls += 1
        pixels = args[0] if args else kwargs.get("hidden_states")
        self.encoder_patch_rows += int(pixels.shape[0]) if pixels is not None else 0

    def _inputs(self, prompts: Sequence[VideoPrompt]) -> dict[str, Any]:
        return build_video_inputs(
            self.tokenizer, [p.messages for p in prompts], [p.frames for p in prompts], self.preprocess, budget=self.budget
        )

    def _generation_kwargs(self, max_new_tokens: int, temperature: float, top_p: float, num_return_sequences: int) -> dict[str, Any]:
        sampling = temperature > 0
        kwargs: dict[str, Any] = {
            "max_new_tokens": max_new_tokens,
            "do_sample": sampling,
            "num_return_sequences": num_return_sequences,
            "pad_token_id": self.tokenizer.pad_token_id,
        }
        if sampling:
            kwargs.update(temperature=temperature, top_p=top_p)
        return kwargs

    def _run_generate(self, model_inputs: dict[str, Any], kwargs: dict[str, Any], seed: int | None) -> Any:
        import torch

        with self._lock, torch.inference_mode():
            if seed is not None:
                torch.manual_seed(seed)
            return self.model.generate(**model_inputs, **kwargs)

    def _decode(self, output: Any, input_ids: Any, attention_mask: Any, num_return_sequences: int) -> list[list[Generation]]:
        prompt_len = input_ids.shape[1]
        eos_ids = self._eos_ids()
        results: list[list[Generation]] = []
        for i in range(input_ids.shape[0]):
            tokens_in = int(attention_mask[i].sum())
            samples = []
            for j in range(num_return_sequences):
                new = output[i * num_return_sequences + j, prompt_len:].tolist()
                end = next((k for k, t in enumerate(new) if t in eos_ids), None)
                body = new if end is None else new[:end]
                text = self.tokenizer.decode(body, skip_special_tokens=True)
                samples.append(Generation(text.strip(), tokens_in, len(body), len(set(body)), end is not None))
            results.append(samples)
        return results

    def generate(
        self,
        prompts: Sequence[VideoPrompt],
        *,
        max_new_tokens: int,
        temperature: float = 0.0,
        top_p: float = 1.0,
        num_return_sequences: int = 1,
        seed: int | None = None,
        timing: GenerationTiming | None = None,
    ) -> list[list[Generation]]:
        """Batched generation; `num_return_sequences` samples per prompt. Greedy when temperature is 0."""
        started = time.perf_counter()
        inputs = {k: v.to(self.device) for k, v in self._inputs(prompts).items()}
        if "pixel_values_videos" in inputs:
            inputs["pixel_values_videos"] = inputs["pixel_values_videos"].to(self.model.dtype)
        prepared = time.perf_counter()
        output = self._run_generate(inputs, self._generation_kwargs(max_new_tokens, temperature, top_p, num_return_sequences), seed)
        if timing is not None:
            timing.preprocess_s += prepared - started
            timing.model_s += time.perf_counter() - prepared
        return self._decode(output, inputs["input_ids"], inputs["attention_mask"], num_return_sequences)

    def encode(self, prompts: Sequence[VideoPrompt], *, timing: GenerationTiming | None = None) -> EncodedVideoBatch:
        """Tokenize the prompts and run the vision tower once per distinct video (by `SampledFrames`
        identity: prompts that share a frames object share its embeddings)."""
        import torch

        started = time.perf_counter()
        inputs = self._inputs(prompts)
        rows = inputs["video_grid_thw"].prod(-1).tolist()  # patch rows of each prompt's video
        offsets = [sum(rows[:i]) for i in range(len(rows))]
        distinct: dict[int, int] = {}  # id(frames) -> index among the videos actually encoded
        encoded_prompts: list[int] = []
        for i, prompt in enumerate(prompts):
            if id(prompt.frames) not in distinct:
                distinct[id(prompt.frames)] = len(encoded_prompts)
                encoded_prompts.append(i)
        pixels = torch.cat([inputs["pixel_values_videos"][offsets[i] : offsets[i] + rows[i]] for i in encoded_prompts])
        grid = inputs["video_grid_thw"][encoded_prompts]
        prepared = time.perf_counter()
        with self._lock, torch.inference_mode():
            features = self.model.get_video_features(
                pixels.to(self.device, self.model.dtype), grid.to(self.device), return_dict=True
            ).pooler_output
        if timing is not None:
            timing.preprocess_s += prepared - started
            timing.model_s += time.perf_counter() - prepared
        on_device = {k: inputs[k].to(self.device) for k in ("input_ids", "attention_mask", "mm_token_type_ids", "video_grid_thw", "second_per_grid_ts")}
        return EncodedVideoBatch(
            **on_device,
            video_embeds=tuple(features[distinct[id(p.frames)]] for p in prompts),
            patch_rows=int(pixels.shape[0]),
        )

    def generate_encoded(
        self,
        batch: EncodedVideoBatch,
        *,
        max_new_tokens: int,
        temperature: float = 0.0,
        top_p: float = 1.0,
        num_return_sequences: int = 1,
        seed: int | None = None,
        timing: GenerationTiming | None = None,
    ) -> list[list[Generation]]:
        """`generate` for an encoded batch: `num_return_sequences` samples per prompt in one call,
        the vision tower untouched. Same tokens as `generate` on the same prompts and seed."""
        started = time.perf_counter()
        output = self._run_generate(batch.model_kwargs(), self._generation_kwargs(max_new_tokens, temperature, top_p, num_return_sequences), seed)
        if timing is not None:
            timing.model_s += time.perf_counter() - started
        return self._decode(output, batch.input_ids, batch.attention_mask, num_return_sequences)

    def _eos_ids(self) -> set[int]:
        eos = self.model.generation_config.eos_token_id
        ids = set(eos if isinstance(eos, list) else [eos]) if eos is not None else set()
        if self.tokenizer.pad_token_id is not None:
            ids.add(self.tokenizer.pad_token_id)
        return ids
