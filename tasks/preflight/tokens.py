"""Does each stage's longest sequence fit its model's context? Video tokens for the worst case the
settings allow (the most frames, any resolution, after the token budget) + the prompt + the response.

Text lengths are bounded without the model's tokenizer: prompts count one token per 3 characters
(English BPE averages ~4), a question with its options is allowed QUESTION_TOKENS, and an SFT target of
W words is at most 2 W tokens (reasoning text averages ~1.3 tokens per word in Qwen's tokenizer).
"""

from __future__ import annotations

from dataclasses import dataclass

from models.architecture import Architecture
from models.video import VideoPreprocessConfig, max_video_tokens_for, worst_case_frames
from tasks.config import PipelineConfig
from tasks.grading.prompts import user_prompt
from tasks.preflight.findings import Finding
from tasks.preflight.topology import StageModel

CHARS_PER_TOKEN = 3
CHAT_TEMPLATE_TOKENS = 64  # system prompt, role markers, vision start/end around the video
QUESTION_TOKENS = 512  # a question, its options and the answer rule
TOKENS_PER_WORD = 2
ANSWER_TOKENS = 64  # `<answer>...</answer>` after the reasoning


@dataclass(frozen=True)
class TokenRow:
    """The longest sequence one stage builds for one model."""

    stage: str
    model: str
    frames: int
    video_tokens: int
    prompt_tokens: int
    response_tokens: int
    context: int

    @property
    def total(self) -> int:
        return self.video_tokens + self.prompt_tokens + self.response_tokens

    @property
    def fits(self) -> bool:
        return self.total <= self.context


def text_tokens(text: str) -> int:
    return -(-len(text) // CHARS_PER_TOKEN)


def preprocess_for(ref: str) -> VideoPreprocessConfig:
    """The video preprocessing a model gets, found the way the stages find it: its checkpoint's
    settings (tiny models, local folders), else Qwen's defaults (a hub id without local files)."""
    from models.tiny import tiny_architecture_dir
    from models.vlm import load_preprocess_config, resolve_model_ref

    built = tiny_architecture_dir(ref)  # a pretrained tiny model is not trained for a check
    return load_preprocess_config(str(built) if built is not None else resolve_model_ref(ref))


def _question_prompt_tokens() -> int:
    return CHAT_TEMPLATE_TOKENS + text_tokens(user_prompt("", "multiple_choice", [])) + QUESTION_TOKENS


def stage_sequences(config: PipelineConfig, stage: str) -> list[tuple[object, int, int]]:
    """(video section, prompt tokens, response tokens) of the longest sequences the stage builds."""
    if stage == "caption":
        c = config.caption
        return [(c, CHAT_TEMPLATE_TOKENS + text_tokens(c.prompt), c.max_new_tokens)]
    if stage == "filter":
        return [(config.filter, _question_prompt_tokens(), config.filter.max_new_tokens)]
    if stage == "sft":
        target = TOKENS_PER_WORD * config.filter.sft_max_reasoning_words + ANSWER_TOKENS
        return [(config.sft, _question_prompt_tokens(), target)]
    if stage == "grpo":
        return [(config.grpo, _question_prompt_tokens(), config.grpo.max_new_tokens)]
    if stage == "eval":
        return [(config.eval, _question_prompt_tokens(), config.eval.max_new_tokens)]
    return []


def video_tokens(section: object, arch: Architecture, preprocess: VideoPreprocessConfig, frames: int) -> int:
    if arch.video_tokens_per_frame:  # a model with its own video processor (NVILA): a fixed count per frame
        return frames * arch.video_tokens_per_frame
    return max_video_tokens_for(frames, preprocess, section.video_budget())


def token_rows(config: PipelineConfig, models: list[StageModel]) -> list[TokenRow]:
    rows: list[TokenRow] = []
    seen: set[tuple[str, str]] = set()
    for m in models:
        if m.architecture is None or (m.stage, m.ref) in seen:
            continue
        seen.add((m.stage, m.ref))
        preprocess = preprocess_for(m.ref)
        for section, prompt, response in stage_sequences(config, m.stage):
            for frames in _frame_counts(section, preprocess):
                rows.append(TokenRow(
                    m.stage, m.ref, frames, video_tokens(section, m.architecture, preprocess, frames), prompt, response,
                    m.architecture.max_position_embeddings,
                ))
    return rows


def _frame_counts(section: object, preprocess: VideoPreprocessConfig) -> list[int]:
    """The frame counts a stage samples at: the most its sampling allows, and eval's sweep points."""
    most = worst_case_frames(section.frame_sampling(), preprocess.temporal_patch_size)
    sweep = getattr(section, "frames_sweep", [])
    return sorted({most, *(worst_case_frames(section.frame_sampling(n), preprocess.temporal_patch_size) for n in sweep)})


def check_tokens(rows: list[TokenRow]) -> list[Finding]:
    findings = []
    for r in rows:
        if not r.fits:
            findings.append(Finding(
                r.stage, f"{r.stage}.max_video_tokens",
                f"{r.frames} frames give up to {r.video_tokens:,} video tokens; with the prompt ({r.prompt_tokens:,}) and the response "
                f"({r.response_tokens:,}) that is {r.total:,} tokens, past {r.model}'s context of {r.context:,}. Set "
                f"{r.stage}.max_video_tokens to at most {max(0, r.context - r.prompt_tokens - r.response_tokens):,} "
                f"(or lower {r.stage}.tokens_per_frame / the frame count)",
            ))
    return findings


def check_response_lengths(config: PipelineConfig, stages: list[str]) -> list[Finding]:
    """GRPO rollouts shorter than the SFT targets are cut before `<answer>`: their format reward is 0."""
    if "grpo" not in stages:
        return []
    longest = TOKENS_PER_WORD * config.filter.sft_max_reasoning_words + ANSWER_TOKENS
    if config.grpo.max_new_tokens >= longest:
        return []
    return [Finding("grpo", "grpo.max_new_tokens", f"{config.grpo.max_new_tokens} tokens is shorter than the longest SFT target "
                    f"(filter.sft_max_reasoning_words={config.filter.sft_max_reasoning_words} words, up to {longest:,} tokens): "
                    f"rollouts that reason as SFT taught are cut before their answer; use at least {longest:,}", "warning")]
