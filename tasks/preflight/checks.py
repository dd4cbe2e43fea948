"""`lvr check`: every check of a config for the stages a run will execute, in seconds, before any stage
starts. Errors name the config key (or environment variable), the value and a valid alternative."""

from __future__ import annotations

import os
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tasks.config import PipelineConfig
from tasks.engine.manifest import read_manifest
from tasks.engine.store import Workdir, is_local_uri
from tasks.media.sources import GLOB_PREFIX
from tasks.preflight.endpoints import check_endpoints, endpoints_of, probe_endpoints
from tasks.preflight.findings import Finding, PreflightError
from tasks.preflight.memory import MemoryEstimate
from tasks.preflight.tokens import TokenRow, check_response_lengths, check_tokens, token_rows
from tasks.preflight.topology import StageModel, check_training_topology, resolve_models
from tasks.preflight.training_memory import training_estimates
from tasks.stages import TRAINING_STAGES


@dataclass
class PreflightReport:
    stages: list[str]
    models: list[StageModel] = field(default_factory=list)
    tokens: list[TokenRow] = field(default_factory=list)
    memory: dict[str, MemoryEstimate] = field(default_factory=dict)
    findings: list[Finding] = field(default_factory=list)

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == "error"]

    def render(self) -> str:
        """The report `lvr check` prints: models, tokens per stage, memory per training stage, findings."""
        lines = [f"lvr check: stages {' > '.join(self.stages)}"]
        if self.models:
            lines += ["", f"{'stage':<8} {'model':<44} {'params':>8} {'heads':>6} {'kv':>4} {'context':>8}"]
            for m in self.models:
                a = m.architecture
                if a is None:
                    lines.append(f"{m.stage:<8} {_short(m.ref, 44):<44} {'?':>8}")
                    continue
                lines.append(f"{m.stage:<8} {_short(m.ref, 44):<44} {a.num_parameters / 1e9:>7.2f}B {a.num_heads:>6} "
                             f"{a.num_kv_heads:>4} {a.max_position_embeddings:>8,}")
        if self.tokens:
            lines += ["", f"{'stage':<8} {'frames':>7} {'video':>9} {'prompt':>7} {'response':>9} {'total':>9} {'context':>9}  fits"]
            for r in self.tokens:
                lines.append(f"{r.stage:<8} {r.frames:>7,} {r.video_tokens:>9,} {r.prompt_tokens:>7,} {r.response_tokens:>9,} "
                             f"{r.total:>9,} {r.context:>9,}  {'yes' if r.fits else 'NO'}")
        for stage, estimate in self.memory.items():
            lines += ["", f"{stage}: memory per GPU", estimate.table()]
        if self.findings:
            lines += ["", *(f.line() for f in self.findings)]
        lines += ["", f"lvr check: {len(self.errors)} error(s), {len(self.findings) - len(self.errors)} warning(s)"]
        return "\n".join(lines)


def _short(text: str, width: int) -> str:
    return text if len(text) <= width else "..." + text[-(width - 3):]


def check_config(
    config: PipelineConfig,
    stages: Sequence[str],
    *,
    workdir: str | None = None,
    source: str | None = None,
    probe: bool = False,
    env: Mapping[str, str] | None = None,
) -> PreflightReport:
    """Check `config` for running `stages` (in order) on `workdir` from `source`."""
    env = os.environ if env is None else env
    stages = list(stages)
    report = PreflightReport(stages)
    report.models, report.findings = resolve_models(config, stages)
    for m in report.models:
        if m.stage in TRAINING_STAGES and m.architecture is not None:
            report.findings += check_training_topology(config, m.stage, m.architecture)
    report.tokens = token_rows(config, report.models)
    report.findings += check_tokens(report.tokens)
    report.findings += check_response_lengths(config, stages)
    report.memory, memory_findings = training_estimates(config, report.models, report.tokens)
    report.findings += memory_findings
    report.findings += check_grpo_start(config, stages, workdir)
    endpoints = endpoints_of(config, stages)
    report.findings += check_endpoints(endpoints, env)
    if probe and not any(f.severity == "error" for f in report.findings if f.key.endswith(("base_url", "api_key_env"))):
        report.findings += probe_endpoints(endpoints, env)
    if workdir is not None:
        report.findings += check_workdir(workdir, probe)
    if source is not None and stages and stages[0] == "clip":
        report.findings += check_source(source)
    return report


def preflight(config: PipelineConfig, stages: Sequence[str], *, workdir: str | None = None, source: str | None = None) -> PreflightReport:
    """What `lvr run` and the pipeline flow do before the first stage: raise on any error."""
    report = check_config(config, stages, workdir=workdir, source=source)
    if report.errors:
        raise PreflightError(report.errors)
    return report


def check_grpo_start(config: PipelineConfig, stages: list[str], workdir: str | None) -> list[Finding]:
    """GRPO starts from the SFT model only when there will be one: from the base model only when asked."""
    if "grpo" not in stages or config.grpo.model != "sft" or "sft" in stages:
        return []
    if workdir is not None and read_manifest(Workdir(workdir), "sft") is not None:
        return []
    return [Finding("grpo", "grpo.model", "grpo.model is 'sft' but this run does not train SFT and the workdir has no finished "
                    "SFT model; run the sft stage first, or set grpo.model=base to start GRPO from the base model (filter.model)")]


def check_workdir(workdir: str, probe: bool) -> list[Finding]:
    """A local workdir (or its nearest existing parent) is writable; a remote one is written to with --probe."""
    if is_local_uri(workdir):
        path = Path(workdir.removeprefix("file://")).expanduser().resolve()
        existing = next((p for p in (path, *path.parents) if p.exists()), None)
        if existing is None or not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
            return [Finding(None, "--workdir", f"{workdir} cannot be created or written ({existing} is not a writable folder)")]
        return []
    if not probe:
        return []
    wd = Workdir(workdir)
    name = f".lvr-check-{uuid.uuid4().hex[:8]}"
    try:
        wd.fs.pipe_file(wd.path(name), b"ok")
        wd.fs.rm_file(wd.path(name))
    except Exception as exc:  # any storage error is the finding
        return [Finding(None, "--workdir", f"cannot write to {workdir}: {type(exc).__name__}: {exc}")]
    return []


def check_source(source: str) -> list[Finding]:
    """A local source exists (a glob's folder, the folder, list file or video); remote listings are clip's."""
    path = source.removeprefix(GLOB_PREFIX)
    if not is_local_uri(path):
        return []
    local = Path(path.removeprefix("file://")).expanduser()
    if source.startswith(GLOB_PREFIX):
        local = next((p for p in (local, *local.parents) if not any(ch in p.name for ch in "*?[")), local)
    if not local.exists():
        return [Finding("clip", "--source", f"{source} does not exist")]
    if not os.access(local, os.R_OK):
        return [Finding("clip", "--source", f"{source} is not readable")]
    return []
