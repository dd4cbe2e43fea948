"""The trained models of a workdir (`<workdir>/<stage>/model` of each training stage with a complete
manifest), what they were trained from and on, and their copies for the Hub."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from data_schemas import EVAL_SUMMARY, RL_SPLIT, SFT_SPLIT
from tasks.engine.manifest import output_identity, read_manifest
from tasks.engine.stage import read_stage_table
from tasks.engine.store import Workdir
from tasks.publish.provenance import StageProvenance
from tasks.stages import TRAINING_STAGES

MODEL_DIR = "model"  # tasks.training.loop.MODEL_DIR (that module imports torch)
EVAL_STAGE = "eval"
EVAL_SUMMARY_DIR = "_summary"  # the eval stage's EVAL_SUMMARY folder
# The filter split each training stage trains on.
TRAINING_SPLITS = {"sft": SFT_SPLIT, "grpo": RL_SPLIT}


@dataclass(frozen=True)
class TrainedModel:
    stage: str
    uri: str  # the model folder in the workdir
    provenance: StageProvenance
    identity: str  # output_identity of the stage's manifest: what eval records for the model it answered with
    base_stage: str | None = None  # the training stage of this workdir whose model training started from

    @property
    def split(self) -> str | None:
        return TRAINING_SPLITS.get(self.stage)

    @property
    def base_model(self) -> str:
        """What training started from: grpo records its resolved initial policy, sft its `model`."""
        init = self.provenance.config.get("init_model")
        if isinstance(init, dict) and init.get("path"):
            return str(init["path"])
        return str(self.provenance.config.get("model", "unknown"))

    @property
    def base_revision(self) -> str | None:
        return self.provenance.config.get("revision")


def trained_models(workdir: Workdir) -> list[TrainedModel]:
    found: list[TrainedModel] = []
    for stage in TRAINING_STAGES:
        manifest = read_manifest(workdir, stage)
        if manifest is not None and workdir.exists(stage, MODEL_DIR):
            model = TrainedModel(stage, workdir.uri(stage, MODEL_DIR), StageProvenance.from_manifest(manifest), output_identity(manifest))
            base_stage = next((m.stage for m in found if m.uri == model.base_model), None)
            found.append(dataclasses.replace(model, base_stage=base_stage))
    return found


def copy_model(workdir: Workdir, model: TrainedModel, dest: Path) -> list[Path]:
    """The save_pretrained files (hidden files such as completion markers stay behind)."""
    fs, root = workdir.fs, workdir.path(model.stage, MODEL_DIR)
    copied = []
    for path in sorted(fs.find(root)):
        relative = path[len(root):].lstrip("/")
        if any(part.startswith(".") for part in relative.split("/")):
            continue
        target = dest / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        fs.get_file(path, str(target))
        copied.append(target)
    return copied


@dataclass(frozen=True)
class EvalResults:
    """The eval summary, restricted to the answers that are still about the models published: a
    training stage's rows count only while eval answered with that stage's current model."""

    rows: list[dict[str, Any]]
    stale: tuple[str, ...]  # training stages whose rows were answered by an older model
    provenance: StageProvenance | None


def eval_results(workdir: Workdir, models: list[TrainedModel]) -> EvalResults:
    manifest = read_manifest(workdir, EVAL_STAGE)
    if manifest is None:
        return EvalResults([], (), None)
    rows = read_stage_table(workdir, EVAL_STAGE, EVAL_SUMMARY, EVAL_SUMMARY_DIR).to_pylist()
    evaluated = manifest.get("input_fingerprints") or {}
    current = {m.stage: m.identity for m in models}
    stale = tuple(s for s in TRAINING_STAGES if any(r["model"] == s for r in rows) and evaluated.get(s) != current.get(s))
    kept = [r for r in rows if r["model"] not in stale]
    return EvalResults(kept, stale, StageProvenance.from_manifest(manifest))
