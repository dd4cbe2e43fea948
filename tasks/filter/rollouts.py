"""Drawing the base model's answers: `filter.runs` samples per question in one batched generation.

- `hf`: transformers on this machine (CUDA when present). `filter.batch_size` questions per call;
  each call encodes its videos once (`HFVideoLM.encode`: one vision-tower pass per distinct
  video, shared by the questions about it) and draws all samples from those embeddings
  (`HFVideoLM.generate_encoded(num_return_sequences=runs)`). Seeded per batch (from its qa ids),
  so the same shard gives the same answers on every machine and after a crash.
- `vllm`: offline `vllm.LLM` (GPU machines; imported only when selected): one request per
  question with `SamplingParams(n=runs)`, so vLLM prefills (and encodes the video) once and forks
  the samples; seeded per question. vLLM resizes the frames by its own settings: the video token
  budget applies to the `hf` backend.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from models.video import SampledFrames, engine_video
from models.vlm import (
    Generation,
    GenerationTiming,
    HFVideoLM,
    VideoPrompt,
    load_preprocess_config,
    resolve_model_ref,
)
from tasks.config import FilterConfig
from tasks.grading.prompts import sampling_seed


@dataclass(frozen=True)
class RolloutRequest:
    qa_id: str
    messages: list[dict[str, Any]]
    frames: SampledFrames


class Sampler(Protocol):
    backend: str

    def sample(self, requests: Sequence[RolloutRequest]) -> list[list[Generation]]:
        """`filter.runs` generations per request, in request order."""
        ...


@dataclass
class HFSampler:
    cfg: FilterConfig
    device: str = "auto"
    backend: str = "hf"
    lm: HFVideoLM = field(init=False)
    timing: GenerationTiming = field(init=False, default_factory=GenerationTiming)

    def __post_init__(self) -> None:
        self.lm = HFVideoLM(
            self.cfg.model, device=self.device, trust_remote_code=self.cfg.trust_remote_code, revision=self.cfg.revision,
            budget=self.cfg.video_budget(),
        )

    def sample(self, requests: Sequence[RolloutRequest]) -> list[list[Generation]]:
        cfg = self.cfg
        results: list[list[Generation]] = []
        for start in range(0, len(requests), cfg.batch_size):
            batch = requests[start : start + cfg.batch_size]
            encoded = self.lm.encode([VideoPrompt(r.messages, r.frames) for r in batch], timing=self.timing)
            results += self.lm.generate_encoded(
                encoded, max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
                num_return_sequences=cfg.runs, seed=sampling_seed([r.qa_id for r in batch], cfg.seed), timing=self.timing,
            )
        return results


class VLLMSampler:  # pragma: no cover - GPU machines only
    backend = "vllm"

    def __init__(self, cfg: FilterConfig) -> None:
        try:
            from vllm import LLM
        except ImportError as exc:
            raise RuntimeError("filter.backend=vllm needs vLLM: install the `gpu` extra on a CUDA machine") from exc
        self.cfg = cfg
        self.llm = LLM(
            model=resolve_model_ref(cfg.model), trust_remote_code=cfg.trust_remote_code, revision=cfg.revision,
            tokenizer_revision=cfg.revision, limit_mm_per_prompt={"video": 1}, seed=cfg.seed,
        )
        self.tokenizer = self.llm.get_tokenizer()
        self.preprocess = load_preprocess_config(resolve_model_ref(cfg.model))

    def sample(self, requests: Sequence[RolloutRequest]) -> list[list[Generation]]:
        from vllm import SamplingParams

        cfg = self.cfg
        prompts = []
        for r in requests:
            # Resized under the budget here, pinned there: vLLM's processor would resize to its own limits.
            video = engine_video(r.frames, self.preprocess, cfg.video_budget())
            prompts.append({
                "prompt": self.tokenizer.apply_chat_template(r.messages, tokenize=False, add_generation_prompt=True),
                "multi_modal_data": {"video": video.frames},
                "mm_processor_kwargs": video.processor_kwargs,
            })
        params = [
            SamplingParams(
                n=cfg.runs, temperature=cfg.temperature, top_p=cfg.top_p, max_tokens=cfg.max_new_tokens,
                seed=sampling_seed([r.qa_id], cfg.seed),
            )
            for r in requests
        ]
        outputs = self.llm.generate(prompts, params) if prompts else []
        return [
            [
                Generation(c.text.strip(), len(out.prompt_token_ids), len(c.token_ids), len(set(c.token_ids)), c.finish_reason == "stop")
                for c in out.outputs
            ]
            for out in outputs
        ]


def make_sampler(cfg: FilterConfig) -> Sampler:
    if cfg.backend == "hf":
        return HFSampler(cfg)
    return VLLMSampler(cfg)
