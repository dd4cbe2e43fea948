"""Which model each stage runs, and whether a training stage's process layout fits that model:
world = data-parallel x sequence-parallel, SP divides the attention heads (Ulysses splits heads over the
SP group), the KV heads can be shared out, and the processes per node fit the GPUs a node has."""

from __future__ import annotations

from dataclasses import dataclass

from models.architecture import Architecture, ArchitectureError, load_architecture
from parallel.topology import kv_repeat_factor
from tasks.config import PipelineConfig
from tasks.preflight.findings import Finding

BASE = "base"
SFT = "sft"
GRPO = "grpo"


@dataclass(frozen=True)
class StageModel:
    """A model a stage loads: the reference, the config key that chose it, and its architecture."""

    stage: str
    key: str
    ref: str
    architecture: Architecture | None


def model_refs(config: PipelineConfig, stage: str) -> list[tuple[str, str]]:
    """(config key, model reference) of each model the stage loads; trained models resolve to the
    reference they were trained from (their architecture is the same)."""
    sft_ref = config.sft.model
    grpo_ref = {SFT: sft_ref, BASE: config.filter.model}.get(config.grpo.model, config.grpo.model)
    if stage == "caption":
        return [] if config.caption.backend == "openai" else [("caption.model", config.caption.model)]
    if stage == "filter":
        return [("filter.model", config.filter.model)]
    if stage == SFT:
        return [("sft.model", sft_ref)]
    if stage == GRPO:
        return [("grpo.model", grpo_ref)]
    if stage == "eval":
        named = {BASE: config.filter.model, SFT: sft_ref, GRPO: grpo_ref}
        return [("eval.models", named.get(m, m)) for m in config.eval.models]
    return []


def resolve_models(config: PipelineConfig, stages: list[str]) -> tuple[list[StageModel], list[Finding]]:
    """Every stage's models with their architectures, reading each reference once."""
    cache: dict[str, Architecture | ArchitectureError] = {}
    models: list[StageModel] = []
    findings: list[Finding] = []
    for stage in stages:
        for key, ref in dict.fromkeys(model_refs(config, stage)):  # eval's base, sft and grpo may share a model
            if ref not in cache:
                try:
                    cache[ref] = load_architecture(ref)
                except ArchitectureError as exc:
                    cache[ref] = exc
            arch = cache[ref]
            if isinstance(arch, ArchitectureError):
                findings.append(Finding(stage, key, str(arch)))
                models.append(StageModel(stage, key, ref, None))
            else:
                models.append(StageModel(stage, key, ref, arch))
    return models, findings


def valid_sp_degrees(num_heads: int, world_size: int) -> list[int]:
    """SP degrees that divide both the heads and the processes."""
    return [d for d in range(1, world_size + 1) if world_size % d == 0 and num_heads % d == 0]


def check_training_topology(config: PipelineConfig, stage: str, arch: Architecture) -> list[Finding]:
    section = getattr(config, stage)
    procs = section.procs_per_node
    world = procs * section.nnodes
    findings: list[Finding] = []
    sp = section.sp_degree
    if world % sp:
        findings.append(Finding(stage, f"{stage}.sp_degree", f"sp_degree={sp} does not divide the {world} processes "
                                f"({section.nnodes} node(s) x {procs}); valid: {valid_sp_degrees(arch.num_heads, world)}"))
    elif arch.num_heads % sp:
        findings.append(Finding(stage, f"{stage}.sp_degree", f"sp_degree={sp} does not divide the {arch.num_heads} attention heads "
                                f"of {arch.source} (Ulysses splits heads over the SP group); valid degrees for {world} processes: "
                                f"{valid_sp_degrees(arch.num_heads, world)}"))
    else:
        try:
            kv_repeat_factor(arch.num_heads, arch.num_kv_heads, sp)
        except ValueError as exc:
            findings.append(Finding(stage, f"{stage}.sp_degree", f"{exc} ({arch.source})"))
    gpus = config.cluster.gpus_per_node
    if gpus is not None and procs > gpus:
        findings.append(Finding(stage, f"{stage}.nproc_per_node", f"{procs} processes per node, but cluster.gpus_per_node is {gpus}; "
                                f"set {stage}.nproc_per_node to at most {gpus}"))
    return findings
