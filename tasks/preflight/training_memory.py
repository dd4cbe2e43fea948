"""The memory estimate of each training stage a run executes, from its config section, its model and
its longest sequence (the token rows), checked against `cluster.gpu_memory_gb`."""

from __future__ import annotations

from tasks.config import PipelineConfig
from tasks.preflight.findings import Finding
from tasks.preflight.memory import MemoryEstimate, TrainingShape, estimate_training_memory
from tasks.preflight.tokens import TokenRow
from tasks.preflight.topology import StageModel
from tasks.stages import TRAINING_STAGES


def training_shape(config: PipelineConfig, stage: str, rows: list[TokenRow], merge_size: int) -> TrainingShape:
    section = getattr(config, stage)
    longest = max(rows, key=lambda r: r.total)
    grpo = stage == "grpo"
    return TrainingShape(
        world_size=section.procs_per_node * section.nnodes,
        sp_degree=section.sp_degree,
        zero_stage=section.zero_stage,
        precision=section.precision,
        gradient_checkpointing=section.gradient_checkpointing,
        # A GRPO step's forward never holds more sequences than its rollouts.
        micro_batch_size=min(section.micro_batch_size, section.prompts_per_step * section.group_size) if grpo else section.micro_batch_size,
        seq_len=longest.total,
        scored_tokens=longest.response_tokens,
        # GRPO's policy reads cached video embeddings (MR-SP): its vision tower runs without gradients,
        # and the step holds one embedding per prompt. SFT trains every parameter, the vision tower too.
        video_patches=0 if grpo else longest.video_tokens * merge_size**2,
        video_embedding_tokens=section.prompts_per_step * longest.video_tokens if grpo else 0,
        train_vision=not grpo,
        reference_model=grpo and section.beta > 0,
        rollout_share=section.vllm_gpu_memory_utilization if grpo and section.rollout_engine == "vllm" else 0.0,
        gpu_memory_gb=config.cluster.gpu_memory_gb or 0.0,
    )


def training_estimates(
    config: PipelineConfig, models: list[StageModel], rows: list[TokenRow]
) -> tuple[dict[str, MemoryEstimate], list[Finding]]:
    estimates: dict[str, MemoryEstimate] = {}
    findings: list[Finding] = []
    for m in models:
        stage_rows = [r for r in rows if r.stage == m.stage and r.model == m.ref]
        if m.stage not in TRAINING_STAGES or m.architecture is None or not stage_rows or m.stage in estimates:
            continue
        merge = m.architecture.vision.spatial_merge_size if m.architecture.vision else 1
        estimate = estimate_training_memory(m.architecture, training_shape(config, m.stage, stage_rows, merge))
        estimates[m.stage] = estimate
        if config.cluster.gpu_memory_gb and not estimate.fits():
            section = getattr(config, m.stage)
            findings.append(Finding(
                m.stage, "cluster.gpu_memory_gb",
                f"{m.stage} needs about {estimate.total_bytes / 2**30:.1f} GiB per GPU, more than the {config.cluster.gpu_memory_gb:g} GB "
                f"configured: {'; '.join(memory_remedies(m.stage, section))}",
            ))
    return estimates, findings


def memory_remedies(stage: str, section: object) -> list[str]:
    """The settings that lower a training stage's peak, starting from the cheapest that is not already taken."""
    remedies = []
    if section.micro_batch_size > 1:
        remedies.append(f"lower {stage}.micro_batch_size (now {section.micro_batch_size})")
    if not section.gradient_checkpointing:
        remedies.append(f"set {stage}.gradient_checkpointing=true")
    if section.precision != "bf16":
        remedies.append(f"set {stage}.precision=bf16")
    highest_zero = 3 if stage == "sft" else 2  # GRPO's hf rollouts generate from whole weights
    if section.zero_stage < highest_zero:
        remedies.append(f"raise {stage}.zero_stage to {highest_zero}")
    remedies.append(f"lower {stage}.max_video_tokens or the frame count")
    return remedies
