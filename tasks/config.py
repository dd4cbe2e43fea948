"""Pipeline configuration: YAML files validated by pydantic, with dotted-key overrides.

Every stage reads only its own section; a stage's fingerprint hashes that section, so changing
`caption.*` never invalidates `clip/`.
"""

from __future__ import annotations

import enum
import os
from importlib.resources import files
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, get_args, get_origin

import yaml
from pydantic import BaseModel, Field, ValidationError, model_validator

from models.tiny import TINY_SHAPES, build_key
from models.video import FrameSampling, VideoTokenBudget, worst_case_frames
from parallel.topology import sp_layout
from tasks.engine.settings import ExecutionConfig, Section
from tasks.stages import STAGE_NAMES, TRAINING_STAGES

# The built-in configs: YAML files of the `configs` package, so an installed wheel has them too.
BUILTIN_CONFIGS = "configs"
DEFAULT_CONFIG = "tiny"


def cache_dir() -> Path:
    """Where lvr keeps what it builds once per machine (sample videos, tiny models): $LVR_CACHE_DIR."""
    return Path(os.environ.get("LVR_CACHE_DIR", Path.home() / ".cache" / "lvr")).expanduser()


# The config form's stage choices (Prefect renders an enum as a dropdown), from the one stage list.
StageName = enum.Enum("StageName", [(name, name) for name in STAGE_NAMES], type=str)


class ConfigError(ValueError):
    """A config file or override that does not validate; the message names keys and expected types."""


REVISION_DOC = (
    "Pinned revision (a commit hash, or a tag or branch) of a hub model id, passed to every from_pretrained; it is part "
    "of the stage's fingerprint. Ignored for 'tiny' and local folders."
)
ALLOW_UNPINNED_DOC = "Accept trust_remote_code with a hub model id and no revision (the code run is whatever the hub serves that day)."


def is_model_id(ref: str) -> bool:
    """A hub model id (`org/name`): not 'tiny', not a URL, not a path that exists or is written as one."""
    if ref in TINY_SHAPES or "://" in ref or ref.startswith(("/", ".", "~")):
        return False
    return not Path(ref).expanduser().exists()


def check_remote_code_pinned(models: list[str], revision: str | None, trust_remote_code: bool, allow_unpinned: bool) -> None:
    """Remote code from a hub model id runs only at a pinned revision, unless allowed explicitly:
    unpinned, a pushed commit would run in every later unattended run."""
    unpinned = [m for m in models if is_model_id(m)] if trust_remote_code and revision is None and not allow_unpinned else []
    if unpinned:
        raise ValueError(
            f"trust_remote_code: true with model id {unpinned[0]!r} and no revision would run whatever code the hub serves; "
            "pin `revision` (a commit hash) or set `allow_unpinned_remote_code: true`"
        )


class ClipConfig(Section):
    # How work is grouped and what listing is trusted, not what it produces.
    runtime_keys = ("shard_size", "max_shrink", "tool_timeout_s")

    seconds: float = Field(10.0, gt=0, description="Target clip length.")
    min_seconds: float = Field(3.0, gt=0, description="A tail shorter than this joins the previous clip.")
    max_deviation_s: float = Field(2.0, ge=0, description="Copy mode snaps cuts to keyframes within this distance, else the video is re-encoded.")
    mode: Literal["copy", "exact"] = "copy"
    shard_size: int = Field(2, ge=1, description="Videos per shard.")
    video_codec: str = "libx264"
    crf: int = Field(23, ge=0, le=51)
    preset: str = "veryfast"
    extensions: list[str] = Field(
        default_factory=lambda: [".mp4", ".mkv", ".mov", ".avi", ".webm", ".m4v", ".mpg", ".mpeg", ".ts", ".flv", ".wmv", ".3gp"],
        description="File extensions picked up when the source is a directory.",
    )
    tool_timeout_s: float | None = Field(
        3600.0, gt=0,
        description="Kill an ffmpeg/ffprobe run that takes longer than this many seconds; the video is recorded as a "
        "failure of kind `timeout` (none: no limit).",
    )
    max_shrink: float = Field(
        0.5, ge=0, le=1,
        description="A source listing fewer than this share of the videos of the last complete clip run is refused "
        "(execution.allow_shrink accepts it); a source listing none is always refused.",
    )

    @model_validator(mode="after")
    def _min_below_target(self) -> "ClipConfig":
        if self.min_seconds > self.seconds:
            raise ValueError(f"min_seconds ({self.min_seconds}) must not exceed seconds ({self.seconds})")
        return self


FPS_MIN_FRAMES = 4  # fps sampling takes at least this many frames (at most max_frames) from a short video


class VideoInputs(Section):
    """The keys of every section that shows videos to a model (caption, filter, sft, grpo, eval): which
    frames are sampled and how many tokens they may take, one way for every stage, so equal settings give
    filter, SFT, GRPO and eval the same model inputs. All of them are part of the stage's fingerprint."""

    # The keys naming models: a locally built one (`tiny-captioner`) is named by a string that stays
    # the same when its build changes, so `output_settings` adds what its weights follow from.
    model_keys: ClassVar[tuple[str, ...]] = ("model",)
    # `--set eval.num_frames=32` on a profile that samples by fps samples 32 frames, not the profile's fps.
    override_replaces: ClassVar[dict[str, tuple[str, ...]]] = {"num_frames": ("fps",)}

    num_frames: int = Field(
        16, ge=1, description="Frames sampled uniformly across the whole video (fewer from a video that has fewer); unused when "
        "fps is set (an override of num_frames unsets the config's fps).",
    )
    fps: float | None = Field(
        None, gt=0, description=f"Sample this many frames per second of video instead of num_frames: at least {FPS_MIN_FRAMES} "
        "(or max_frames if lower), at most max_frames. None: num_frames.",
    )
    max_frames: int = Field(512, ge=1, description="With fps: the most frames sampled from one video (rounded down to an even count).")
    tokens_per_frame: int | None = Field(
        None, ge=1, description="The most video tokens per sampled frame (a pair of frames shares one temporal patch of twice "
        "this); frames get the largest of Qwen's smart_resize sizes that fits. None: the model's per-frame pixel limit alone.",
    )
    max_video_tokens: int | None = Field(
        None, ge=1, description="The most video tokens of one video, however many frames are sampled; with tokens_per_frame "
        "the tighter limit wins. None: no total limit (512 frames of 720p take ~300K tokens with Qwen2.5-VL's own limit).",
    )

    def output_settings(self) -> dict[str, Any]:
        settings = super().output_settings()
        refs = [ref for key in self.model_keys for ref in _as_list(getattr(self, key))]
        builds = {ref: build_key(ref) for ref in refs if ref in TINY_SHAPES}
        if builds:  # only then: the fingerprints of workdirs made with other models stay what they were
            settings["local_builds"] = builds
        return settings

    def frame_sampling(self, num_frames: int | None = None) -> FrameSampling:
        """How frames are sampled: `num_frames` given here (an eval sweep point) wins over the section's own sampling."""
        if num_frames is not None:
            return FrameSampling(num_frames=num_frames)
        if self.fps is not None:
            return FrameSampling(fps=self.fps, min_frames=min(FPS_MIN_FRAMES, self.max_frames), max_frames=self.max_frames)
        return FrameSampling(num_frames=self.num_frames)

    def video_budget(self) -> VideoTokenBudget | None:
        """The video token budget; None when neither limit is set (each frame gets the model's own limit)."""
        if self.tokens_per_frame is None and self.max_video_tokens is None:
            return None
        return VideoTokenBudget(tokens_per_frame=self.tokens_per_frame, max_video_tokens=self.max_video_tokens)

    def frame_samplings(self) -> list[FrameSampling]:
        """Every sampling the stage uses."""
        return [self.frame_sampling()]

    def video_inputs_text(self) -> str:
        """The sampling and budget in words, for reports: "16 frames", "1 fps (at most 512 frames), at most 120,000 video tokens"."""
        text = f"{self.fps:g} fps (at most {self.max_frames} frames)" if self.fps is not None else f"{self.num_frames} frames"
        limits = [f"{self.tokens_per_frame:,} per frame"] if self.tokens_per_frame is not None else []
        limits += [f"{self.max_video_tokens:,} per video"] if self.max_video_tokens is not None else []
        return text + (f", video tokens at most {' and '.join(limits)}" if limits else "")

    @model_validator(mode="after")
    def _budget_covers_the_frames(self) -> "VideoInputs":
        # Qwen2-VL packs two frames into each temporal patch, and a patch takes at least one token.
        for sampling in self.frame_samplings() if self.max_video_tokens is not None else ():
            patches = worst_case_frames(sampling) // sampling.temporal_patch_size
            if self.max_video_tokens < patches:
                raise ValueError(
                    f"max_video_tokens ({self.max_video_tokens}) is below one token per pair of frames: up to "
                    f"{worst_case_frames(sampling)} frames are sampled, which need at least {patches}"
                )
        return self


def _as_list(value: str | list[str] | None) -> list[str]:
    return value if isinstance(value, list) else [value] if value else []


class CaptionConfig(VideoInputs):
    # How work is scheduled or authenticated, never what a caption says.
    runtime_keys = (
        "shard_size", "concurrency", "timeout_s", "max_retries", "api_key_env", "allow_unpinned_remote_code",
        "prefetch_workers", "prefetch_depth",
    )

    backend: Literal["hf", "openai", "vllm"] = "hf"
    model: str = Field(description="Required: a local checkpoint folder, a model id, or 'tiny' (the random-weight CPU model of the tiny profile).")
    prompt: str = "Elaborate on the visual and narrative elements of the video in detail."
    max_pixels: int = Field(360 * 420, ge=28 * 28)
    max_new_tokens: int = Field(256, ge=1)
    temperature: float = Field(0.0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    seed: int = Field(0, description="Sampling seed (used when temperature > 0).")
    batch_size: int = Field(4, ge=1)
    trust_remote_code: bool = False
    revision: str | None = Field(None, description=REVISION_DOC)
    allow_unpinned_remote_code: bool = Field(False, description=ALLOW_UNPINNED_DOC)
    base_url: str | None = None
    api_key_env: str | None = Field(None, description="Name of the environment variable holding the API key.")
    concurrency: int = Field(8, ge=1)
    timeout_s: float = Field(120.0, gt=0)
    max_retries: int = Field(5, ge=0)
    send_video_url: bool = Field(False, description="openai backend: send the clip as one video_url instead of frames as images.")
    shard_size: int = Field(64, ge=1, description="Clips per shard.")
    prefetch_workers: int = Field(
        1, ge=0, description="hf backend: processes reading and resizing frames ahead of the model (0: read them in line, between batches)."
    )
    prefetch_depth: int = Field(8, ge=1, description="hf backend: clips read ahead of the model (at least one batch).")

    @model_validator(mode="after")
    def _remote_code_pinned(self) -> "CaptionConfig":
        if self.backend != "openai":
            check_remote_code_pinned([self.model], self.revision, self.trust_remote_code, self.allow_unpinned_remote_code)
        return self


class QAConfig(Section):
    # How requests are made, not what they produce: a new endpoint, key variable or concurrency
    # reuses the finished stage (and the answer cache makes reruns free anyway).
    runtime_keys = (
        "shard_size", "concurrency", "stream", "timeout_s", "max_retries", "backoff_s", "backoff_max_s",
        "base_url", "refine_base_url", "api_key_env", "refine_api_key_env",
    )

    backend: Literal["openai", "template"] = Field(
        description="Required: openai (an OpenAI-compatible reasoning endpoint, e.g. DeepSeek-R1) or template (offline questions built "
        "from the captions, for CPU smoke runs)."
    )
    base_url: str | None = None
    model: str = "deepseek-reasoner"
    api_key_env: str | None = Field(None, description="Name of the environment variable holding the API key.")
    temperature: float = Field(0.6, ge=0)
    max_tokens: int = Field(8192, ge=1)
    concurrency: int = Field(16, ge=1, description="Requests in flight per shard being processed (execution.shard_workers shards run at once).")
    stream: bool = False
    timeout_s: float = Field(600.0, gt=0, description="Deadline of one attempt of one request, streamed or not.")
    max_retries: int = Field(5, ge=0)
    backoff_s: float = Field(1.0, ge=0, description="First retry waits about this long, doubling each retry (a Retry-After header wins).")
    backoff_max_s: float = Field(60.0, ge=0, description="Longest backoff between retries.")
    categories: list[Literal["Temporal", "Goal and Purpose", "Spatial", "Plot and Narrative"]] = Field(
        default_factory=lambda: ["Temporal", "Goal and Purpose", "Spatial", "Plot and Narrative"]
    )
    question_types: list[Literal["multiple_choice", "open_ended"]] = Field(
        default_factory=lambda: ["multiple_choice", "open_ended"],
        description="One generation request per video, category and question type.",
    )
    questions_per_request: int = Field(1, ge=1, le=20, description="Questions asked for in each generation request.")
    context_tokens: int | None = Field(
        None, ge=1,
        description="The generation endpoint's context length in tokens: a video whose prompt plus max_tokens would not fit "
        "is split into windows of consecutive captions, each asked for its own questions (tokens estimated on the high side, "
        "see tasks/qa/windows.py). None: one prompt per video, however long.",
    )
    prompt_version: str = Field("v1", description="Folder of tasks/qa/prompts/generate holding the generation templates.")
    refine_prompt_version: str = Field("v1", description="Folder of tasks/qa/prompts/refine holding the refinement templates.")
    refine_model: str | None = Field(None, description="Refinement model; defaults to `model`.")
    refine_base_url: str | None = Field(None, description="Refinement endpoint; defaults to `base_url`.")
    refine_api_key_env: str | None = Field(None, description="Variable holding the refinement endpoint's key; defaults to `api_key_env`.")
    shard_size: int = Field(8, ge=1, description="Videos per shard.")


Difficulty = Literal["easy", "medium", "hard"]


class FilterConfig(VideoInputs):
    # How work is grouped or scheduled, not what is answered or judged.
    runtime_keys = ("shard_size", "allow_unpinned_remote_code", "prefetch_workers", "prefetch_depth")

    backend: Literal["hf", "vllm"] = "hf"
    model: str = Field(description="Required: the base model: a local checkpoint folder, a model id, or 'tiny' (the random-weight CPU model).")
    trust_remote_code: bool = False
    revision: str | None = Field(None, description=REVISION_DOC)
    allow_unpinned_remote_code: bool = Field(False, description=ALLOW_UNPINNED_DOC)
    runs: int = Field(10, ge=1, description="Answers drawn per question, in one batched generation (num_return_sequences / vLLM n).")
    temperature: float = Field(1.0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    seed: int = Field(0, description="Sampling seed.")
    max_new_tokens: int = Field(256, ge=1)
    batch_size: int = Field(4, ge=1, description="hf backend: questions per generation call, each with `runs` sequences.")
    shard_size: int = Field(32, ge=1, description="Questions per shard.")
    prefetch_workers: int = Field(
        1, ge=0, description="hf backend: processes reading and resizing a shard's videos ahead of the model (0: read them all "
        "in line before the model runs)."
    )
    prefetch_depth: int = Field(8, ge=1, description="hf backend: videos read ahead of the model (at least one batch).")
    easy_min_pass_rate: float = Field(1.0, ge=0, le=1, description="An item with pass_rate >= this is easy.")
    hard_max_pass_rate: float = Field(0.0, ge=0, le=1, description="An item with pass_rate <= this is hard; in between, medium.")
    eval_fraction: float = Field(0.2, ge=0, lt=1, description="Share of each category held out for evaluation.")
    sft_fraction: float = Field(0.33, ge=0, le=1, description="Target size of the SFT split, as a share of all items.")
    sft_difficulties: list[Difficulty] = Field(
        default_factory=lambda: ["easy", "hard"], description="Difficulties SFT may take (after eval), best reference reasoning first."
    )
    rl_difficulties: list[Difficulty] = Field(default_factory=lambda: ["medium"], description="Difficulties the RL split takes from what eval and SFT leave.")
    sft_min_reasoning_words: int = Field(10, ge=0, description="Reference reasoning shorter than this never goes to SFT.")
    sft_max_reasoning_words: int = Field(1024, ge=1, description="Reference reasoning longer than this never goes to SFT.")
    split_salt: str = Field("v1", description="Hash salt of the eval and SFT draws; change it to redraw them.")
    report_examples: int = Field(2, ge=0, description="Example items per difficulty shown in the report.")

    @model_validator(mode="after")
    def _thresholds_ordered(self) -> "FilterConfig":
        if self.hard_max_pass_rate >= self.easy_min_pass_rate:
            raise ValueError(
                f"hard_max_pass_rate ({self.hard_max_pass_rate}) must be below easy_min_pass_rate ({self.easy_min_pass_rate})"
            )
        if self.sft_min_reasoning_words > self.sft_max_reasoning_words:
            raise ValueError("sft_min_reasoning_words must not exceed sft_max_reasoning_words")
        check_remote_code_pinned([self.model], self.revision, self.trust_remote_code, self.allow_unpinned_remote_code)
        return self


TRAINING_RUNTIME_KEYS = ("save_every", "keep_checkpoints", "node_rank", "master_addr", "master_port", "launch_timeout_s")


def check_topology(sp_degree: int, procs_per_node: int, nnodes: int, node_rank: int, master_addr: str | None) -> None:
    """The distributed layout a training stage asks for is one torchrun can start."""
    sp_layout(procs_per_node * nnodes, sp_degree)  # raises when sp_degree does not divide the processes
    if node_rank >= nnodes:
        raise ValueError(f"node_rank ({node_rank}) must be below nnodes ({nnodes})")
    if nnodes > 1 and not master_addr:
        raise ValueError("nnodes > 1 needs master_addr (the address of node 0)")


class SFTConfig(VideoInputs):
    # Where and how often state is written, and this node's place: not what is trained.
    runtime_keys = (*TRAINING_RUNTIME_KEYS, "frame_cache_mb")

    model: str = Field(description="Required: the checkpoint SFT starts from: a local folder, a model id, or 'tiny' (the random-weight CPU model).")
    revision: str | None = Field(None, description=REVISION_DOC)
    sp_degree: int = Field(2, ge=1, description="Ranks sharing one sequence (Ulysses); must divide the world size and the attention heads.")
    nproc_per_node: int = Field(2, ge=1, description="Training processes per node (one per GPU; on CPU, gloo processes).")
    nnodes: int = Field(1, ge=1, description="Nodes; more than one needs master_addr and the worker command run on every node (see README).")
    node_rank: int = Field(0, ge=0, description="This node's rank in a multi-node run.")
    master_addr: str | None = Field(None, description="Address of node 0, reachable from every node (multi-node only).")
    master_port: int = Field(29500, ge=1, le=65535, description="Rendezvous port on node 0 (multi-node only).")
    zero_stage: Literal[0, 1, 2, 3] = 2
    precision: Literal["fp32", "bf16"] = "fp32"
    learning_rate: float = Field(1e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float = Field(1.0, ge=0, description="Gradient clipping; 0 disables it.")
    warmup_ratio: float = Field(0.1, ge=0, le=1, description="Share of the steps with linear warmup; cosine decay to 0 after.")
    epochs: int = Field(1, ge=1)
    max_steps: int = Field(0, ge=0, description="Optimizer steps; 0 means as many as `epochs` passes over the SFT split take.")
    micro_batch_size: int = Field(1, ge=1, description="Samples per forward pass per data-parallel replica.")
    grad_accum: int = Field(1, ge=1, description="Micro-batches per optimizer step.")
    gradient_checkpointing: bool = Field(False, description="Recompute text-layer activations in backward (long sequences on GPU).")
    seed: int = 0
    frame_cache_mb: int = Field(
        1024, ge=0, description="Frames each training process keeps in host memory, decoded and resized for the model "
        "(least recently used dropped first): a video several questions share, or that a later epoch shows again, is decoded "
        "and resized once while it fits. 0: decode every time.",
    )
    save_every: int = Field(50, ge=1, description="Checkpoint every this many optimizer steps.")
    keep_checkpoints: int = Field(2, ge=1, description="Newest checkpoints kept; older ones are deleted.")
    launch_timeout_s: float | None = Field(
        None, gt=0, description="Stop the training run (torchrun and its workers) after this many seconds; none: no limit. "
        "A rerun resumes from the last checkpoint.",
    )

    @property
    def procs_per_node(self) -> int:
        return self.nproc_per_node

    @model_validator(mode="after")
    def _sp_divides_world(self) -> "SFTConfig":
        check_topology(self.sp_degree, self.nproc_per_node, self.nnodes, self.node_rank, self.master_addr)
        return self


class GRPOConfig(VideoInputs):
    # As SFT's, and where the embedding cache lives.
    runtime_keys = (*TRAINING_RUNTIME_KEYS, "embedding_cache_dir")

    model: str = Field(
        "sft",
        description="Initial policy and frozen reference: sft = the SFT stage's model (<workdir>/sft/model; an error when that "
        "stage has not finished), base = the base model (filter.model, filter.revision), or a checkpoint folder, a model id, or 'tiny'.",
    )
    revision: str | None = Field(None, description=f"{REVISION_DOC} Only for a model id in `model`; base uses filter.revision.")
    rollout_engine: Literal["hf", "vllm"] = Field("hf", description="hf: transformers generate from the cached embeddings; vllm: colocated vLLM (GPU).")
    group_size: int = Field(8, ge=2, description="Rollouts per question (G).")
    prompts_per_step: int = Field(4, ge=1, description="Questions per step and data-parallel replica.")
    steps: int = Field(100, ge=1, description="GRPO steps: rollouts, rewards, advantages, then updates_per_step optimizer steps.")
    updates_per_step: int = Field(
        1, ge=1, description="Optimizer steps on each step's rollouts (mu); beyond the first they are off-policy and the clip acts."
    )
    micro_batch_size: int = Field(8, ge=1, description="Sequences per forward pass; a step's micro-batches accumulate into one optimizer step.")
    max_new_tokens: int = Field(256, ge=1, description="Longest rollout.")
    temperature: float = Field(1.0, gt=0, description="Rollout sampling temperature.")
    top_p: float = Field(1.0, gt=0, le=1)
    beta: float = Field(0.04, ge=0, description="Weight of the k3 KL penalty to the frozen reference (Eq. 1); 0 skips the reference.")
    clip_eps_low: float = Field(0.2, gt=0, lt=1, description="The ratio is clipped to [1 - clip_eps_low, 1 + clip_eps_high].")
    clip_eps_high: float = Field(0.28, gt=0)
    adv_eps: float = Field(1e-6, ge=0, description="Eq. 2: A = (r - mean) / (std + adv_eps); a group with std 0 gets A = 0.")
    loss_agg: Literal["token_mean", "seq_mean"] = Field(
        "token_mean", description="token_mean: every response token weighs the same (DAPO); seq_mean: mean per response, then over responses."
    )
    shuffle_options: bool = Field(
        False, description="Put each multiple-choice question's options in a new order (seeded per step) for every group, the "
        "answer letter following: a policy cannot earn reward by a favourite letter, only by the option's content. Off for "
        "questions whose options refer to each other or to letters ('both A and B', 'none of the above').",
    )
    drop_zero_variance: bool = Field(True, description="Leave out groups whose G rewards are all equal (DAPO): they have no advantage.")
    accuracy_weight: float = Field(0.9, ge=0, description="reward = accuracy_weight * accuracy + format_weight * format.")
    format_weight: float = Field(0.1, ge=0)
    learning_rate: float = Field(1e-5, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float = Field(1.0, ge=0, description="Gradient clipping; 0 disables it.")
    embedding_cache: bool = Field(
        True, description="Keep video embeddings on disk across steps and runs (the vision tower is frozen during GRPO)."
    )
    embedding_cache_dir: str | None = Field(None, description="Where the embedding cache lives; default <workdir>/grpo/_embeddings. May be shared by workdirs.")
    sp_degree: int = Field(1, ge=1, description="Ranks sharing one sequence in the log-prob prefills (Ulysses) and one video's frames in encoding.")
    nproc_per_node: int | None = Field(None, ge=1, description="Training processes per node; default sp_degree (one data-parallel replica per node).")
    nnodes: int = Field(1, ge=1)
    node_rank: int = Field(0, ge=0)
    master_addr: str | None = Field(None, description="Address of node 0 (multi-node only).")
    master_port: int = Field(29500, ge=1, le=65535)
    zero_stage: Literal[0, 1, 2] = Field(2, description="DeepSpeed ZeRO stage; the hf engine generates from the full weights, so not 3.")
    precision: Literal["fp32", "bf16"] = "fp32"
    gradient_checkpointing: bool = Field(False, description="Recompute text-layer activations in backward (long videos on GPU).")
    seed: int = 0
    save_every: int = Field(10, ge=1, description="Checkpoint every this many steps.")
    keep_checkpoints: int = Field(2, ge=1)
    launch_timeout_s: float | None = Field(
        None, gt=0, description="Stop the training run (torchrun and its workers) after this many seconds; none: no limit. "
        "A rerun resumes from the last checkpoint.",
    )
    vllm_gpu_memory_utilization: float = Field(0.4, gt=0, le=1, description="vllm engine: share of GPU memory it may take while awake.")
    vllm_max_model_len: int | None = Field(None, ge=1, description="vllm engine: longest prompt + response; default the model's.")

    @property
    def procs_per_node(self) -> int:
        return self.nproc_per_node or self.sp_degree

    @model_validator(mode="after")
    def _topology(self) -> "GRPOConfig":
        check_topology(self.sp_degree, self.procs_per_node, self.nnodes, self.node_rank, self.master_addr)
        return self


class EvalConfig(VideoInputs):
    # How work is grouped or scheduled and what models may run, not what they answer.
    runtime_keys = ("shard_size", "trust_remote_code", "allow_unpinned_remote_code", "prefetch_workers", "prefetch_depth")
    model_keys = ("models",)

    models: list[str] = Field(
        default_factory=lambda: ["base", "sft", "grpo"],
        description="Models to score: base (filter.model), sft (<workdir>/sft/model), grpo (<workdir>/grpo/model), or a "
        "checkpoint folder / model id. sft and grpo are skipped with a note when their stage has not produced a model.",
    )
    frames_sweep: list[Annotated[int, Field(ge=1)]] = Field(
        default_factory=list, description="More frame counts to score every model at (accuracy versus frames), each exactly "
        "that many frames whatever fps says, under the same token budget; costs one pass each.",
    )
    samples: int = Field(1, ge=1, description="Answers per question: 1 is greedy; more are sampled and the majority answer is graded.")
    temperature: float = Field(0.7, gt=0, description="Sampling temperature when samples > 1.")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling when samples > 1.")
    seed: int = Field(0, description="Sampling seed (samples > 1).")
    max_new_tokens: int = Field(1024, ge=1)
    batch_size: int = Field(4, ge=1, description="Questions per generation call.")
    trust_remote_code: bool = Field(False, description="Allow checkpoints that ship their own modelling code (NVILA/VILA).")
    revision: str | None = Field(None, description=f"{REVISION_DOC} For the model ids in `models`; base uses filter.revision.")
    allow_unpinned_remote_code: bool = Field(False, description=ALLOW_UNPINNED_DOC)
    shard_size: int = Field(32, ge=1, description="Questions per shard (of one model at one frame count).")
    prefetch_workers: int = Field(
        1, ge=0, description="Processes reading and resizing a shard's videos ahead of the model (0: read them all in line "
        "before the model runs)."
    )
    prefetch_depth: int = Field(8, ge=1, description="Videos read ahead of the model (at least one batch).")

    @model_validator(mode="after")
    def _distinct_models(self) -> "EvalConfig":
        if not self.models:
            raise ValueError("models must name at least one model")
        repeated = sorted({m for m in self.models if self.models.count(m) > 1})
        if repeated:
            raise ValueError(f"models lists {', '.join(repeated)} more than once")
        ids = [m for m in self.models if m not in ("base", *TRAINING_STAGES)]
        check_remote_code_pinned(ids, self.revision, self.trust_remote_code, self.allow_unpinned_remote_code)
        if self.fps is not None and self.max_frames in self.frames_sweep:
            raise ValueError(
                f"frames_sweep holds {self.max_frames}, the frame count that labels the fps sampling's results (max_frames); "
                "drop it from the sweep or change max_frames"
            )
        return self

    @property
    def main_frames(self) -> int:
        """The frame count that labels the results of the section's own sampling: num_frames, or with
        fps max_frames (the most it samples)."""
        return self.max_frames if self.fps is not None else self.num_frames

    @property
    def frame_counts(self) -> list[int]:
        """Every frame count scored: `main_frames` and the sweep, ascending."""
        return sorted({self.main_frames, *self.frames_sweep})

    def sampling_at(self, frames: int) -> FrameSampling:
        """The sampling of the results labelled `frames` (one of `frame_counts`): the section's own
        for `main_frames`, else exactly that many frames (a sweep point)."""
        return self.frame_sampling() if frames == self.main_frames else self.frame_sampling(frames)

    def frame_samplings(self) -> list[FrameSampling]:
        return [self.sampling_at(n) for n in self.frame_counts]


class TrackingConfig(Section):
    """Where SFT and GRPO report while they train (rank 0 only). Not a stage's section: no key here
    is part of a fingerprint or run key, so turning tracking on never retrains anything."""

    runtime_keys = (
        "backend", "project", "log_dir", "tracking_uri", "samples_every", "validate_every", "validate_examples", "validate_max_new_tokens",
    )

    backend: Literal["none", "tensorboard", "mlflow", "wandb"] = Field(
        "none", description="none: metrics.parquet and the log only; tensorboard: event files; mlflow: a tracking server or "
        "store (tracking_uri); wandb: Weights & Biases (WANDB_MODE=offline writes locally). One run per training run, "
        "named <stage>-<run key>, so reruns of a recipe land in the same run.",
    )
    project: str = Field("lvr", description="The MLflow experiment / W&B project.")
    log_dir: str | None = Field(
        None, description="tensorboard: where the runs' event folders go; default <workdir>/<stage>/_tensorboard/. "
        "wandb: its local folder (default its own).",
    )
    tracking_uri: str | None = Field(
        None, description="mlflow: http(s)://server, sqlite:///file.db or file:///folder; default MLflow's own (MLFLOW_TRACKING_URI).",
    )
    samples_every: int = Field(
        10, ge=0, description="GRPO: keep the first replica's rollouts (prompt, response, reward, advantage) every this many "
        "steps, in grpo/_samples/ and the tracker; 0: never.",
    )
    validate_every: int = Field(
        0, ge=0, description="SFT and GRPO: every this many steps and after the last, rank 0 answers the first validate_examples "
        "questions of the eval split (greedy, as the eval stage asks them) with the model being trained and records val_accuracy "
        "and val_format in metrics.parquet and the tracker; 0: never. Skipped, with a warning, under ZeRO-3.",
    )
    validate_examples: int = Field(32, ge=1, description="Eval-split questions (the first by qa_id) each validation answers.")
    validate_max_new_tokens: int = Field(256, ge=1, description="The longest answer a validation question may get.")


class ClusterConfig(Section):
    """The machines a run gets, for `lvr check` (not a stage's section: part of no fingerprint)."""

    runtime_keys = ("gpus_per_node", "gpu_memory_gb")

    gpus_per_node: int | None = Field(
        None, ge=1, description="GPUs per node; training stages may not start more processes per node (none: not checked).",
    )
    gpu_memory_gb: float | None = Field(
        None, gt=0, description="Memory of one GPU in GB; lvr check compares each training stage's estimate with it (none: estimate only).",
    )


class JudgeConfig(Section):
    """The LLM judge of open-ended answers, used alike by filter, grpo and eval. Not a stage's section:
    those stages add its identity (`tasks.grading.judge.judge_identity`) to their settings."""

    # How the judge is reached, not what it decides.
    runtime_keys = ("base_url", "api_key_env", "concurrency", "timeout_s", "max_retries")

    model: str | None = Field(
        None, description="An LLM on an OpenAI-compatible endpoint deciding the open-ended answers that normalised matching "
        "calls wrong (filter's rollouts, GRPO's rewards, eval's answers); none: no judge, normalised matching only.",
    )
    base_url: str | None = Field(None, description="The judge's OpenAI-compatible endpoint (https://host/v1).")
    api_key_env: str | None = Field(None, description="Name of the environment variable holding the judge's API key.")
    concurrency: int = Field(16, ge=1, description="Judge requests in flight per shard (per GRPO step).")
    timeout_s: float = Field(120.0, gt=0, description="Deadline of one attempt of one judge request.")
    max_retries: int = Field(5, ge=0, description="Retries of a failed judge request before the item counts as failed.")


class PipelineConfig(Section):
    profile: str = "tiny"
    source: str | None = Field(None, description="Default source when none is given on the command line.")
    execution: ExecutionConfig = Field(default_factory=ExecutionConfig)
    clip: ClipConfig = Field(default_factory=ClipConfig)
    caption: CaptionConfig = Field(default_factory=dict, validate_default=True)
    qa: QAConfig = Field(default_factory=dict, validate_default=True)
    filter: FilterConfig = Field(default_factory=dict, validate_default=True)
    sft: SFTConfig = Field(default_factory=dict, validate_default=True)
    grpo: GRPOConfig = Field(default_factory=GRPOConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    judge: JudgeConfig = Field(default_factory=JudgeConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    cluster: ClusterConfig = Field(default_factory=ClusterConfig)


def resolve_config_path(config: str | Path) -> Path | Traversable:
    """A path to a YAML file, or the name of a built-in config ("tiny", "longvila-r1")."""
    path = Path(config).expanduser()
    if path.is_file():
        return path
    builtin = files(BUILTIN_CONFIGS)
    named = builtin / f"{config}.yaml"
    if named.is_file():
        return named
    available = sorted(p.name.removesuffix(".yaml") for p in builtin.iterdir() if p.name.endswith(".yaml"))
    raise ConfigError(f"config {str(config)!r} is neither a file nor one of the built-in configs: {', '.join(available)}")


def load_config(config: str | Path = DEFAULT_CONFIG, overrides: list[str] | dict[str, Any] | None = None) -> PipelineConfig:
    path = resolve_config_path(config)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(data).__name__}")
    check_keys(data, PipelineConfig, where=str(path))
    overrides = normalise_overrides(overrides)
    for key, value in overrides.items():
        set_dotted(data, key, value)
    for key in overrides:
        for replaced, default in replaced_by_override(key).items():
            if replaced not in overrides:
                set_dotted(data, replaced, default)
    return validate_config(data, where=str(path))


def replaced_by_override(dotted: str) -> dict[str, Any]:
    """The keys an override of `dotted` puts back to their defaults (`Section.override_replaces`), with those defaults."""
    *section, key = dotted.split(".")
    model: type[BaseModel] | None = PipelineConfig
    for part in section:
        model = _submodel(model, part) if model is not None and part in model.model_fields else None
    replaces = getattr(model, "override_replaces", {}).get(key, ()) if model is not None else ()
    return {".".join([*section, name]): model.model_fields[name].default for name in replaces}


def validate_config(data: dict[str, Any], where: str = "config") -> PipelineConfig:
    try:
        return PipelineConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"{where}: {format_validation_error(exc)}") from exc


def normalise_overrides(overrides: list[str] | dict[str, Any] | None) -> dict[str, Any]:
    """`["clip.seconds=8"]` or `{"clip.seconds": 8}` to `{"clip.seconds": 8}`; values parse as YAML scalars."""
    if not overrides:
        return {}
    if isinstance(overrides, dict):
        return {str(k): v for k, v in overrides.items()}
    parsed: dict[str, Any] = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r} must look like section.key=value (e.g. clip.seconds=8)")
        try:
            parsed[key.strip()] = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            parsed[key.strip()] = raw
    return parsed


def set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    """Set `a.b.c` in nested dicts after checking each part names a real field."""
    parts = dotted.split(".")
    model: type[BaseModel] | None = PipelineConfig
    node = data
    for depth, part in enumerate(parts):
        assert model is not None
        if part not in model.model_fields:
            prefix = ".".join(parts[:depth])
            raise ConfigError(
                f"unknown key {dotted!r}: {part!r} is not a key of {prefix or 'the config'}; "
                f"valid keys: {', '.join(model.model_fields)}"
            )
        last = depth == len(parts) - 1
        if last:
            node[part] = value
            return
        model = _submodel(model, part)
        if model is None:
            raise ConfigError(f"unknown key {dotted!r}: {'.'.join(parts[: depth + 1])} is a value, not a section")
        child = node.get(part)
        if not isinstance(child, dict):
            child = {}
            node[part] = child
        node = child


def check_keys(data: dict[str, Any], model: type[BaseModel], where: str, prefix: str = "") -> None:
    """Reject unknown keys with the list of valid ones (pydantic only says 'extra inputs are not permitted')."""
    for key, value in data.items():
        if key not in model.model_fields:
            raise ConfigError(
                f"{where}: unknown key {prefix + str(key)!r}; valid keys{' under ' + prefix.rstrip('.') if prefix else ''}: "
                f"{', '.join(model.model_fields)}"
            )
        sub = _submodel(model, key)
        if sub is not None and isinstance(value, dict):
            check_keys(value, sub, where, prefix=f"{prefix}{key}.")


def _submodel(model: type[BaseModel], field: str) -> type[BaseModel] | None:
    annotation = model.model_fields[field].annotation
    candidates = get_args(annotation) if get_origin(annotation) else (annotation,)
    for candidate in candidates:
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return None


def format_validation_error(exc: ValidationError) -> str:
    lines = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"])
        if err["type"] == "missing":  # a choice the config must make: say what the choices are
            lines.append(f"{loc}: missing, and it has no default. {_field_description(err['loc'])}".rstrip())
            continue
        got = err.get("input")
        got_text = f" (got {got!r})" if not isinstance(got, dict) else ""
        lines.append(f"{loc or 'config'}: {err['msg']}{got_text}")
    return "; ".join(lines)


def _field_description(loc: tuple[Any, ...]) -> str:
    model: type[BaseModel] | None = PipelineConfig
    description = ""
    for part in loc:
        if model is None or not isinstance(part, str) or part not in model.model_fields:
            return ""
        description = model.model_fields[part].description or ""
        model = _submodel(model, part)
    return description
