"""Memory per GPU of a training stage, from the model's architecture and the run's shape, before anything
is loaded: what `lvr check` prints against `cluster.gpu_memory_gb`.

The estimate models *our* trainers (`tasks/sft/trainer.py`, `tasks/grpo/trainer.py`), not training in
general:

* DeepSpeed is given torch's AdamW and no `mpu`, so ZeRO partitions over the whole world (every rank,
  SP ranks included), not over the data-parallel replicas.
* Weights are loaded in the configured precision. Under bf16 DeepSpeed keeps an fp32 master copy
  (ZeRO-0: `FP16_UnfusedOptimizer`; ZeRO-1/2: `single_partition_of_fp32_groups`; ZeRO-3: its fp32
  partitions), and AdamW's two moments are fp32: 12 bytes per trainable parameter, plus the bf16 weight and
  gradient. Under fp32, ZeRO-1/2 still clone their partition as the master (`.detach().clone()`): 12 bytes;
  ZeRO-0 (plain AdamW) and ZeRO-3 (its partition is the weight) keep only the 8 bytes of the moments.
  Gradients are in the weights' dtype (no `data_types.grad_accum_dtype` is set).
* ZeRO-1 partitions the optimizer state (moments and master), ZeRO-2 also the gradients, ZeRO-3 also the
  weights; each by the world size.
* GRPO freezes the vision tower (no gradient, no optimizer state) and keeps the frozen reference as a
  whole second model in the same precision on every rank (a plain module: ZeRO does not partition it).
* Activations are counted from the tensors autograd saves in our forward (`models.qwen_sp.sp_forward` with
  Ulysses attention, `parallel.loss`), per token of this rank's 1/SP slice: see `text_layer_bytes` and
  `vision_block_bytes`. With gradient checkpointing (non-reentrant, every decoder layer and vision block)
  only each layer's input is saved, and backward recomputes one layer at a time.
* Logits are projected only at the scored (response) positions: lm_head's output (held by the SFT trainer
  through backward), the loss's fp32 log-softmax, and two more fp32 copies in the loss's backward. The
  response sits at the end of the sequence, so one SP rank holds all of it: the logits are not divided by
  the SP degree.
* Phases that never overlap peak separately: forward/backward, the optimizer step (bf16: the gradients
  copied to fp32), and rollout generation. A colocated vLLM sleeps (weights offloaded, KV cache freed)
  while the trainer runs and takes its `gpu_memory_utilization` share of the GPU while it generates,
  beside the weights, optimizer state and reference (DeepSpeed frees gradients and buckets after a step).

Everything here counts bytes that `torch.cuda.max_memory_allocated` sees; the CUDA context, NCCL's buffers
and allocator fragmentation are the shape's `reserve_gb`, which `fits` adds.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from models.architecture import Architecture, VisionArchitecture
from parallel.topology import kv_repeat_factor

GIB = 2**30

PRECISION_BYTES = {"fp32": 4, "bf16": 2}
FP32 = 4
ADAM_MOMENTS_BYTES = 2 * FP32  # exp_avg and exp_avg_sq, fp32 (they follow the fp32 master or fp32 weight)
INDEX_BYTES = 8  # int64 token ids, masks and labels
BATCH_INDEX_TENSORS = 4  # input_ids, attention_mask, mm_token_type_ids, labels: the whole sequence, on every rank
DEFAULT_SCORED_TOKENS = 4096  # a response length to assume when the shape does not say

# DeepSpeed's ZeRO defaults (deepspeed/runtime/zero/config.py); our configs set none of them.
ZERO_REDUCE_BUCKET_ELEMENTS = 500_000_000  # the contiguous gradient bucket (stages 1-3), in the gradient dtype
ZERO3_PREFETCH_ELEMENTS = 50_000_000  # stage3_prefetch_bucket_size: parameters fetched ahead of use
ZERO3_MAX_LIVE_ELEMENTS = 1_000_000_000  # stage3_max_live_parameters

# Backward of the loss: the gradient of the fp32 log-softmax and of the fp32 logits exist together, before
# the cast back to the logits' dtype (measured: the peak of the loss's backward is 2 fp32 copies of the logits
# beyond what the forward keeps).
LOSS_BACKWARD_FP32_COPIES = 2


@dataclass(frozen=True)
class TrainingShape:
    """One training stage's run as the memory estimate sees it (per GPU = per rank).

    `seq_len`: tokens of one whole sequence (video + prompt + response) before the SP split;
    `micro_batch_size`: sequences per forward pass; `scored_tokens`: the positions of one sequence that the
    loss scores (the response; None: unknown, taken as `min(seq_len, DEFAULT_SCORED_TOKENS)`);
    `video_patches`: vision-tower input patches of one sequence's video when the tower runs in the training
    forward (SFT; 0 when embeddings come from a cache, as in GRPO); `train_vision`: whether the tower's
    weights get gradients; `video_embedding_tokens`: video embeddings a GRPO rank holds for its step's
    prompts; `rollout_share`: the GPU share a colocated vLLM takes while it generates (0: none);
    `gpu_memory_gb`: one GPU's memory, in the binary GB that GPU sizes are quoted in (an "80 GB" H100 holds
    80 GiB); 0: unknown. `reserve_gb`: CUDA context, NCCL buffers and allocator fragmentation, outside the
    allocated bytes.
    """

    world_size: int = 1
    sp_degree: int = 1
    zero_stage: int = 0
    precision: str = "bf16"
    gradient_checkpointing: bool = False
    micro_batch_size: int = 1
    seq_len: int = 0
    video_patches: int = 0
    train_vision: bool = True
    reference_model: bool = False
    rollout_share: float = 0.0
    gpu_memory_gb: float = 0.0
    scored_tokens: int | None = None
    video_embedding_tokens: int = 0
    reserve_gb: float = 2.0

    def __post_init__(self) -> None:
        if self.precision not in PRECISION_BYTES:
            raise ValueError(f"precision must be one of {sorted(PRECISION_BYTES)}, got {self.precision!r}")
        if not 0 <= self.zero_stage <= 3:
            raise ValueError(f"zero_stage must be 0..3, got {self.zero_stage}")
        if self.world_size < 1 or self.sp_degree < 1 or self.world_size % self.sp_degree:
            raise ValueError(f"sp_degree ({self.sp_degree}) must divide world_size ({self.world_size})")
        if not 0 <= self.rollout_share < 1:
            raise ValueError(f"rollout_share must be in [0, 1), got {self.rollout_share}")

    @property
    def dtype_bytes(self) -> int:
        return PRECISION_BYTES[self.precision]

    @property
    def local_tokens(self) -> int:
        """Tokens of this rank's slice of a micro-batch (sequences padded to a multiple of SP)."""
        return self.micro_batch_size * -(-self.seq_len // self.sp_degree)

    @property
    def local_scored_tokens(self) -> int:
        """Scored positions on the busiest rank: the response is at the end, inside the last slice."""
        scored = min(self.seq_len, DEFAULT_SCORED_TOKENS) if self.scored_tokens is None else min(self.scored_tokens, self.seq_len)
        return self.micro_batch_size * min(scored, -(-self.seq_len // self.sp_degree))

    @property
    def local_patches(self) -> int:
        """Vision patches this rank encodes (`models.qwen_sp.sp_video_embeddings` splits the frames)."""
        return self.micro_batch_size * -(-self.video_patches // self.sp_degree)


@dataclass(frozen=True)
class ActivationEstimate:
    """Activation bytes of one micro-batch on one rank.

    `saved`: the batch on the device plus what autograd keeps from the forward for the backward
    (checkpointed: each layer's input), including the scored positions' final hidden states and their fp32
    log-softmax (`logits_saved`, the part that scales with the vocabulary); `logits_held`: the logits the
    trainer holds through backward (`shard.logits`, in the model's dtype);
    `backward`: what exists only during backward, at its largest: the loss's fp32 gradients, or one layer's
    gradients (with checkpointing, on top of that layer's recomputed activations).
    """

    saved: int
    logits_held: int
    backward: int
    logits_saved: int = 0

    @property
    def peak(self) -> int:
        return self.saved + self.logits_held + self.backward


FORWARD_BACKWARD = "forward/backward"
OPTIMIZER_STEP = "optimizer step"
ROLLOUT = "rollout"
TRAINING = (FORWARD_BACKWARD, OPTIMIZER_STEP)


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per GPU by component. `rows` are (component, bytes); `held` names the phases a component is
    held in (forward/backward, the optimizer step, rollout generation: they never overlap), absent for
    the ones held throughout. `total_bytes` is the largest phase."""

    rows: list[tuple[str, int]]
    held: dict[str, tuple[str, ...]] = field(default_factory=dict)
    gpu_bytes: int = 0
    reserve_bytes: int = 0

    def bytes_of(self, component: str) -> int:
        return sum(b for name, b in self.rows if name == component)

    def phase_bytes(self) -> dict[str, int]:
        """Bytes held in each phase, the components held throughout included."""
        phases = dict.fromkeys(p for phases in self.held.values() for p in phases)
        always = sum(b for name, b in self.rows if name not in self.held)
        return {p: always + sum(b for name, b in self.rows if p in self.held.get(name, ())) for p in phases} or {"always": always}

    @property
    def peak_phase(self) -> str:
        phases = self.phase_bytes()
        return max(phases, key=lambda p: phases[p])

    @property
    def total_bytes(self) -> int:
        return max(self.phase_bytes().values())

    def fits(self) -> bool:
        """Whether the peak plus the runtime reserve fits the GPU (always True when no GPU size is given)."""
        return self.gpu_bytes <= 0 or self.total_bytes + self.reserve_bytes <= self.gpu_bytes

    def table(self) -> str:
        """A plain-text table in GiB: each component and when it is held, each phase's total, the GPU."""
        reserve = "CUDA context, NCCL, fragmentation"
        width = max(len(name) for name, _ in [*self.rows, (reserve, 0), ("total: " + FORWARD_BACKWARD, 0)]) + 2
        lines = [f"{'component':<{width}}{'GiB':>9}  held"]
        for name, b in self.rows:
            lines.append(f"{name:<{width}}{b / GIB:>9.2f}  {', '.join(self.held.get(name, ('always',)))}")
        peak = self.peak_phase
        for phase, b in self.phase_bytes().items():
            lines.append(f"{'total: ' + phase:<{width}}{b / GIB:>9.2f}{'  peak' if phase == peak else ''}")
        if self.gpu_bytes > 0:
            lines.append(f"{reserve:<{width}}{self.reserve_bytes / GIB:>9.2f}")
            lines.append(f"{'GPU':<{width}}{self.gpu_bytes / GIB:>9.2f}  {'fits' if self.fits() else 'DOES NOT FIT'}")
        return "\n".join(lines)


# ------------------------------------------------------------------------------------------------
# Activations, counted from the saved tensors of our forward
# ------------------------------------------------------------------------------------------------
def rms_norm_bytes(hidden: int, b: int) -> int:
    """Per token: Qwen's RMSNorm casts its input to fp32 (saved by pow and mul; under fp32 it is the input
    itself), saves the fp32 rsqrt, the normalised value cast back (saved by the weight's mul) and its
    output (saved by the next linear)."""
    return FP32 * hidden + FP32 + 2 * b * hidden


def _kv_repeat(arch: Architecture, sp: int) -> int:
    """The attention code's KV repeat; for heads that do not split over `sp` (reported by the
    topology check, while the estimate still goes on) as many repeats as query heads per KV head."""
    try:
        return kv_repeat_factor(arch.num_heads, arch.num_kv_heads, sp)
    except ValueError:
        return max(1, arch.num_heads // max(1, arch.num_kv_heads))


def attention_bytes(arch: Architecture, b: int, sp: int) -> int:
    """Per local token, `parallel.ulysses.ulysses_attention` then `causal_attention` (SDPA, flash-style:
    it saves q, k, v, its output and an fp32 log-sum-exp per head).

    SP = 1: q after the rotary, k and v repeated to every query head (`repeat_interleave`), the output
    (which `o_proj` reads as a view). SP > 1: the all-to-all's q|k|v buffer (KV heads repeated so they divide
    by SP), k and v repeated to the query heads when groups remain, the output, and the copy `o_proj` reads
    after the return all-to-all."""
    q = arch.num_heads * arch.head_dim
    lse = FP32 * arch.num_heads
    if sp == 1:
        return 4 * q * b + lse
    kv = arch.num_kv_heads * _kv_repeat(arch, sp) * arch.head_dim
    repeated = 2 * q if kv < q else 0
    return (q + 2 * kv + repeated + 2 * q) * b + lse


Part = tuple[int, int]  # (bytes a part of a layer saves, bytes its backward works with), per token


def layer_parts(hidden: int, attention_saved: int, attention_width: int, intermediate: int, b: int) -> list[Part]:
    """A pre-norm transformer layer's parts in backward order: the gated MLP, the second RMSNorm, attention,
    the first RMSNorm.

    Saved: the MLP keeps four intermediate-wide tensors (gate and up outputs, the SiLU output, their
    product). Working (measured on CPU against the decoder layer): every part holds the two hidden-wide
    gradients of the residual stream; the RMSNorm's backward works in fp32 (three hidden-wide fp32
    gradients, and the upcast incoming gradient under bf16); attention holds q, k and v gradients with fp32
    accumulators; the MLP two intermediate-wide gradients."""
    norm = rms_norm_bytes(hidden, b)
    stream = 2 * hidden * b
    norm_working = (3 + (b != FP32)) * FP32 * hidden + stream
    return [
        (4 * intermediate * b, 2 * intermediate * b + stream),
        (norm, norm_working),
        (attention_saved, 3 * attention_width * (FP32 + b) + stream),
        (norm, norm_working),
    ]


def backward_peak(parts: list[Part]) -> int:
    """The most a layer's backward holds: at each part, what the parts not yet back-propagated still keep
    (autograd frees a saved tensor once its node has run) plus that part's gradients."""
    remaining, peak = sum(saved for saved, _ in parts), 0
    for saved, working in parts:
        peak = max(peak, remaining + working)
        remaining -= saved
    return peak


def text_layer_parts(arch: Architecture, b: int, sp: int) -> list[Part]:
    q = arch.num_heads * arch.head_dim
    return layer_parts(arch.hidden_size, attention_bytes(arch, b, sp), q, arch.intermediate_size, b)


def text_layer_bytes(arch: Architecture, b: int, sp: int) -> int:
    """Per local token, what one decoder layer saves: two RMSNorms, attention, the gated MLP."""
    return sum(saved for saved, _ in text_layer_parts(arch, b, sp))


def text_shared_bytes(arch: Architecture, b: int) -> int:
    """Per local token, outside the layers: the mRoPE cos and sin every layer shares, and the final RMSNorm
    (its output is only indexed at the scored positions, not saved)."""
    return 2 * arch.head_dim * b + FP32 * arch.hidden_size + FP32 + b * arch.hidden_size


def vision_block_parts(vision: VisionArchitecture, b: int) -> list[Part]:
    """Per patch, one vision block. Attention saves the qkv output (v is a view of it), q and k after the
    rotary (computed in fp32, cast back), the attention output with its log-sum-exp, and the projection's
    input."""
    h = vision.hidden_size
    attention = 3 * h * b + 2 * h * b + 2 * h * b + FP32 * vision.num_heads
    return layer_parts(h, attention, h, vision.intermediate_size, b)


def vision_block_bytes(vision: VisionArchitecture, b: int) -> int:
    return sum(saved for saved, _ in vision_block_parts(vision, b))


def vision_shared_bytes(vision: VisionArchitecture, b: int) -> int:
    """Per patch, outside the blocks: the fp32 rotary cos and sin, the merger (RMSNorm, the input and GELU
    input and output of its MLP, counted per patch since it merges spatial_merge_size**2 of them)."""
    h = vision.hidden_size
    return 2 * FP32 * (h // vision.num_heads) + rms_norm_bytes(h, b) + 3 * h * b


def pixel_bytes(vision: VisionArchitecture) -> int:
    """Values of one input patch (channels x temporal patch x patch x patch)."""
    return vision.in_channels * vision.temporal_patch_size * vision.patch_size**2



def activation_estimate(arch: Architecture, shape: TrainingShape) -> ActivationEstimate:
    """The activations of one micro-batch on this rank (see `ActivationEstimate`)."""
    b, sp, gc = shape.dtype_bytes, shape.sp_degree, shape.gradient_checkpointing
    tokens, scored = shape.local_tokens, shape.local_scored_tokens
    h = arch.hidden_size
    # Every SP rank holds the whole batch: the sequences' int64 tensors and, for SFT, the fp32 pixels.
    saved = BATCH_INDEX_TENSORS * INDEX_BYTES * shape.micro_batch_size * shape.seq_len
    parts = text_layer_parts(arch, b, sp)
    layer = sum(s for s, _ in parts) * tokens
    saved += text_shared_bytes(arch, b) * tokens + (arch.num_layers * h * b * tokens if gc else arch.num_layers * layer)
    # Checkpointed, backward recomputes a layer whole before back-propagating through it; otherwise the
    # layer's saved tensors are already counted and only its gradients come on top.
    backward = backward_peak(parts) * tokens - (0 if gc else layer)

    if arch.vision is not None and shape.video_patches:
        v = arch.vision
        patches = shape.local_patches
        block_parts = vision_block_parts(v, b)
        block = sum(s for s, _ in block_parts) * patches
        saved += FP32 * pixel_bytes(v) * shape.micro_batch_size * shape.video_patches
        if b != FP32:  # the patch embedding saves this rank's patches (a slice: a view) cast to the model's dtype
            saved += b * pixel_bytes(v) * patches
        saved += vision_shared_bytes(v, b) * patches
        saved += v.depth * v.hidden_size * b * patches if gc else v.depth * block
        backward = max(backward, backward_peak(block_parts) * patches - (0 if gc else block))

    # The scored positions: final hidden states (lm_head's input) and the fp32 log-softmax the loss saves;
    # its backward holds two more fp32 copies (the gradients of the log-softmax and of its input).
    logits_saved = FP32 * arch.vocab_size * scored
    saved += h * b * scored + logits_saved
    held = b * arch.vocab_size * scored  # lm_head's output, held by the trainer beside the loss's fp32 copies
    backward = max(backward, LOSS_BACKWARD_FP32_COPIES * FP32 * arch.vocab_size * scored)
    return ActivationEstimate(saved=saved, logits_held=held, backward=backward, logits_saved=logits_saved)


# ------------------------------------------------------------------------------------------------
# Weights, gradients, optimizer
# ------------------------------------------------------------------------------------------------
def trainable_parameters(arch: Architecture, shape: TrainingShape) -> int:
    frozen = arch.vision.num_parameters if arch.vision is not None and not shape.train_vision else 0
    return arch.num_parameters - frozen


def master_bytes(precision: str, zero_stage: int) -> int:
    """fp32 master weight bytes per trainable parameter that DeepSpeed keeps beside the model's own."""
    if precision != "fp32":
        return FP32
    return FP32 if zero_stage in (1, 2) else 0


def zero3_live_parameters(arch: Architecture) -> int:
    """Parameters ZeRO-3 gathers at once: the largest module it fetches whole (the embedding matrix or one
    decoder layer) plus the prefetch bucket, at most `stage3_max_live_parameters`."""
    h = arch.hidden_size
    outside_layers = arch.vocab_size * h * (1 if arch.tie_word_embeddings else 2) + h
    layer = (arch.text_parameters - outside_layers) // arch.num_layers
    return min(max(arch.vocab_size * h, layer) + ZERO3_PREFETCH_ELEMENTS, ZERO3_MAX_LIVE_ELEMENTS)


def estimate_training_memory(arch: Architecture, shape: TrainingShape) -> MemoryEstimate:
    """The per-GPU bytes of a training stage (see the module docstring for what is modelled)."""
    b, zero, world = shape.dtype_bytes, shape.zero_stage, shape.world_size
    total, trainable = arch.num_parameters, trainable_parameters(arch, shape)

    def part(n: int, partitioned: bool) -> int:
        return -(-n // world) if partitioned else n

    rows: list[tuple[str, int]] = [
        ("parameters", part(total * b, zero >= 3)),
        # DeepSpeed frees the gradients (and its buckets) after each step: not held while vLLM generates.
        ("gradients", part(trainable * b, zero >= 2)),
        ("optimizer states (AdamW moments, fp32 master)", part(trainable * (ADAM_MOMENTS_BYTES + master_bytes(shape.precision, zero)), zero >= 1)),
    ]
    held: dict[str, tuple[str, ...]] = {"gradients": TRAINING}
    if zero >= 1:
        rows.append(("ZeRO buffers", ZERO_REDUCE_BUCKET_ELEMENTS * b + (zero3_live_parameters(arch) * b if zero >= 3 else 0)))
        held["ZeRO buffers"] = TRAINING
    if shape.reference_model:
        rows.append(("reference model", total * b))
    if shape.video_embedding_tokens:
        rows.append(("video embeddings of the step", shape.video_embedding_tokens * arch.hidden_size * b))

    act = activation_estimate(arch, shape)
    for name, value in (
        ("activations", act.saved - act.logits_saved),
        ("logits (scored positions)", act.logits_saved + act.logits_held),
        ("backward working memory", act.backward),
    ):
        rows.append((name, value))
        held[name] = (FORWARD_BACKWARD,)
    if shape.precision != "fp32":
        # At the step the bf16 gradients are copied to fp32 beside the master (ZeRO-0: every parameter at
        # once in FP16_UnfusedOptimizer; ZeRO-1..3: this rank's partition).
        rows.append(("fp32 gradients at the step", part(trainable * FP32, zero >= 1)))
        held["fp32 gradients at the step"] = (OPTIMIZER_STEP,)
    gpu = int(shape.gpu_memory_gb * GIB)
    if shape.rollout_share and gpu:
        rows.append(("rollout engine (vLLM share)", int(shape.rollout_share * gpu)))
        held["rollout engine (vLLM share)"] = (ROLLOUT,)
    return MemoryEstimate(rows=rows, held=held, gpu_bytes=gpu, reserve_bytes=int(shape.reserve_gb * GIB) if gpu else 0)
