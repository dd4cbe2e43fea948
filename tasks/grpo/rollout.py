"""Rollout engines: G sampled responses per prompt from the current policy, behind one interface.

Both engines start from MR-SP stage 1's `EncodedVideoBatch`, so drawing rollouts never runs the
vision tower:

- `hf`: transformers' `generate` on the policy model itself, fed the cached embeddings
  (`EncodedVideoBatch.model_kwargs`: `mm_encoder_outputs`), all samples of all prompts in one
  batched call (`num_return_sequences`). It shares the policy's weights: nothing to sync.
- `vllm` (GPU machines; imported only when selected): a colocated `vllm.LLM` given the video
  embeddings as multimodal embedding inputs, one request per prompt with `n` samples. It sleeps
  (weights offloaded, KV cache freed) while the trainer runs and wakes up with the policy's new
  weights loaded after every optimizer step.

A `Rollout` keeps the sampled token ids (what the log-probs are computed on) and the decoded text
(what is graded).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from models.qwen_sp import generation_attention
from models.vlm import EncodedVideoBatch
from tasks.config import GRPOConfig


@dataclass(frozen=True)
class Rollout:
    token_ids: tuple[int, ...]  # the response as sampled, its end-of-turn token included when it has one
    text: str  # decoded without special tokens, stripped: what the rewards read
    finished: bool  # ended with an end-of-turn token rather than at max_new_tokens


class RolloutEngine(Protocol):
    def generate(self, batch: EncodedVideoBatch, messages: Sequence[list[dict[str, Any]]], n: int, seed: int) -> list[list[Rollout]]:
        """`n` rollouts for each prompt of `batch` (whose chats are `messages`), in prompt order."""
        ...

    def sync_weights(self, model: torch.nn.Module) -> None:
        """Make the next `generate` sample from `model`'s current weights."""
        ...


def stop_token_ids(model: torch.nn.Module, tokenizer: Any) -> set[int]:
    """Tokens that end a response: the generation config's EOS ids and the pad token."""
    eos = model.generation_config.eos_token_id
    ids = set(eos if isinstance(eos, list) else [eos]) if eos is not None else set()
    if tokenizer.pad_token_id is not None:
        ids.add(tokenizer.pad_token_id)
    return ids


def make_rollout(tokens: Sequence[int], stops: set[int], tokenizer: Any) -> Rollout:
    """A sampled continuation cut after its first stop token (what follows is padding)."""
    end = next((k for k, t in enumerate(tokens) if t in stops), None)
    kept = tuple(int(t) for t in (tokens if end is None else tokens[: end + 1]))
    body = kept if end is None else kept[:-1]
    return Rollout(kept, tokenizer.decode(list(body), skip_special_tokens=True).strip(), end is not None)


@dataclass
class HFRolloutEngine:
    model: torch.nn.Module
    tokenizer: Any
    max_new_tokens: int
    temperature: float
    top_p: float

    def generate(self, batch: EncodedVideoBatch, messages: Sequence[list[dict[str, Any]]], n: int, seed: int) -> list[list[Rollout]]:
        stops = stop_token_ids(self.model, self.tokenizer)
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.inference_mode(), generation_attention(self.model):
                torch.manual_seed(seed)
                output = self.model.generate(
                    **batch.model_kwargs(), max_new_tokens=self.max_new_tokens, do_sample=True, temperature=self.temperature,
                    top_p=self.top_p, num_return_sequences=n, pad_token_id=self.tokenizer.pad_token_id,
                )
        finally:
            self.model.train(was_training)
        new = output[:, batch.input_ids.shape[1] :].tolist()
        return [[make_rollout(new[i * n + j], stops, self.tokenizer) for j in range(n)] for i in range(len(batch))]

    def sync_weights(self, model: torch.nn.Module) -> None:
        """Nothing to do: rollouts are drawn from the policy module itself."""


class VLLMRolloutEngine:  # pragma: no cover - GPU machines only (tests/grpo/test_rollout_vllm.py, marked gpu)
    """A colocated vLLM engine sharing the GPU with the trainer (sleep mode between rollouts)."""

    def __init__(
        self, model_path: str, tokenizer: Any, stops: set[int], eos_id: int, cfg: GRPOConfig, seed: int, revision: str | None = None
    ):
        # The engine must live in this process for `sync_weights` to reach its model.
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        try:
            from vllm import LLM
        except ImportError as exc:
            raise RuntimeError("grpo.rollout_engine=vllm needs vLLM: install the `gpu` extra on a CUDA machine") from exc
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.stops, self.eos_id = stops, eos_id
        self.llm = LLM(
            model=model_path, revision=revision, tokenizer_revision=revision, seed=seed, enable_sleep_mode=True, gpu_memory_utilization=cfg.vllm_gpu_memory_utilization,
            limit_mm_per_prompt={"video": 1}, enable_mm_embeds=True, max_model_len=cfg.vllm_max_model_len,
        )
        self.llm.sleep(level=1)
        self.asleep = True

    def generate(self, batch: EncodedVideoBatch, messages: Sequence[list[dict[str, Any]]], n: int, seed: int) -> list[list[Rollout]]:
        from vllm import SamplingParams

        if self.asleep:
            self.llm.wake_up()
            self.asleep = False
        prompts = [
            {
                "prompt": self.tokenizer.apply_chat_template(m, tokenize=False, add_generation_prompt=True),
                "multi_modal_data": {"video": {"video_embeds": embeds.to("cpu"), "video_grid_thw": batch.video_grid_thw[i : i + 1].to("cpu")}},
            }
            for i, (m, embeds) in enumerate(zip(messages, batch.video_embeds))
        ]
        params = SamplingParams(
            n=n, temperature=self.cfg.temperature, top_p=self.cfg.top_p, max_tokens=self.cfg.max_new_tokens, seed=seed,
            detokenize=False,
        )
        outputs = self.llm.generate(prompts, params, use_tqdm=False)
        self.llm.sleep(level=1)  # give the KV cache's memory back to the trainer
        self.asleep = True
        return [[make_rollout(self._tokens(c), self.stops, self.tokenizer) for c in out.outputs] for out in outputs]

    def _tokens(self, completion: Any) -> list[int]:
        """The sampled ids with the end-of-turn token that stopped them (scored like any other)."""
        tokens = list(completion.token_ids)
        if completion.finish_reason == "stop" and not (tokens and tokens[-1] in self.stops):
            tokens.append(self.eos_id)
        return tokens

    def sync_weights(self, model: torch.nn.Module) -> None:
        """Load the trainable weights (the frozen vision tower never changes) into the engine."""
        if self.asleep:
            self.llm.wake_up(tags=["weights"])
        runner_model = self.llm.llm_engine.model_executor.driver_worker.worker.model_runner.model
        runner_model.load_weights((name, p.detach()) for name, p in model.named_parameters() if p.requires_grad)
        self.llm.sleep(level=1)
        self.asleep = True


def make_rollout_engine(
    cfg: GRPOConfig, model: torch.nn.Module, tokenizer: Any, model_path: str, seed: int, revision: str | None = None
) -> RolloutEngine:
    if cfg.rollout_engine == "hf":
        return HFRolloutEngine(model, tokenizer, cfg.max_new_tokens, cfg.temperature, cfg.top_p)
    eos = model.generation_config.eos_token_id
    eos_id = eos[0] if isinstance(eos, list) else eos
    return VLLMRolloutEngine(model_path, tokenizer, stop_token_ids(model, tokenizer), eos_id, cfg, seed, revision)
