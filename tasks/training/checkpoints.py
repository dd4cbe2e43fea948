"""Training checkpoints: written atomically, found again after a crash, pruned.

    _checkpoints/step-<N>/
        model/                  save_pretrained folder (weights, config, tokenizer, processor files)
        optimizer/state/        DeepSpeed's checkpoint: ZeRO optimizer partitions, LR scheduler,
                                module states (what `engine.load_checkpoint` restores)
        rng-rank-<r>.pt         each rank's RNG states: a dict of byte tensors, read with weights_only
        metrics.parquet         TRAIN_METRICS rows of steps 1..N
        trainer_state.json      written last: run key, step, elapsed time

A checkpoint is written under `.tmp-step-<N>` and renamed into place once every rank has written
its part, so a `step-<N>` folder is always complete; a `.tmp-*` folder is a save that was killed.
Checkpoints belong to one run key (training data and settings): a rerun resumes only from its
own key's newest checkpoint, and other keys' checkpoints are deleted when a run starts.
On an object-store workdir `tasks.training.staging` uploads each `step-<N>` as soon as it appears, with
trainer_state.json last (there is no rename there), and prunes the uploaded ones by the same rule.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import torch

from data_schemas import TRAIN_METRICS, validate_table
from tasks.engine.store import LOCAL, fsync_path, write_json_atomic, write_table_atomic

STATE_FILE = "trainer_state.json"
TRAIN_INFO_FILE = "lvr_train.json"  # inside a saved model folder: which run and step wrote it
# Files a checkpoint folder needs besides what save_pretrained writes, copied from the base model.
PROCESSOR_FILES = (
    "lvr_video_preprocessor.json", "preprocessor_config.json", "video_preprocessor_config.json",
    "chat_template.json", "chat_template.jinja",
)
_STEP_DIR = re.compile(r"^step-(\d+)$")


@dataclass(frozen=True)
class TrainerState:
    run_key: str
    step: int  # optimizer steps completed
    total_steps: int
    elapsed_s: float  # training wall time up to this step, over all attempts

    @classmethod
    def read(cls, folder: Path) -> TrainerState | None:
        try:
            return cls.parse((folder / STATE_FILE).read_bytes())
        except OSError:
            return None

    @classmethod
    def parse(cls, data: bytes) -> TrainerState | None:
        """A state file's contents; None when torn or foreign (such a checkpoint is not trusted)."""
        try:
            return cls(**json.loads(data))
        except (ValueError, TypeError):
            return None


def step_dir(root: Path, step: int) -> Path:
    return root / f"step-{step}"


def partial_dir(root: Path, step: int) -> Path:
    return root / f".tmp-step-{step}"


def is_step_dir(name: str) -> bool:
    """Whether a folder name is a checkpoint's (`step-N`), not a partial save or anything else."""
    return _STEP_DIR.match(name) is not None


def checkpoints(root: Path, run_key: str) -> list[tuple[Path, TrainerState]]:
    """This run's complete checkpoints, newest first."""
    found = []
    for folder in root.glob("step-*") if root.is_dir() else []:
        state = TrainerState.read(folder)
        if is_step_dir(folder.name) and state is not None and state.run_key == run_key:
            found.append((folder, state))
    return sorted(found, key=lambda item: item[1].step, reverse=True)


def prune(root: Path, run_key: str, keep: int) -> None:
    """Keep this run's `keep` newest checkpoints; delete the rest, partial saves and other runs'."""
    if not root.is_dir():
        return
    kept = {folder for folder, _ in checkpoints(root, run_key)[:keep]}
    for folder in root.iterdir():
        if folder.is_dir() and folder not in kept:
            shutil.rmtree(folder, ignore_errors=True)


def rng_state() -> dict[str, torch.Tensor]:
    """Torch's generator states as tensors. Python's and numpy's global generators are not saved:
    no trainer draws from them (the data order is a numpy Generator seeded by step, see `schedule`)."""
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save_rng_state(path: Path) -> None:
    torch.save(rng_state(), path)


def load_rng_state(path: Path) -> None:
    """Restore what `save_rng_state` wrote. `weights_only=True`: a checkpoint is a file anyone with
    write access to the workdir (or the bucket) may have replaced, and unpickling arbitrary objects
    runs code; a file holding anything but tensors is refused (`pickle.UnpicklingError`)."""
    state = torch.load(path, weights_only=True)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path}: not an RNG state (a dict of tensors)")
    set_rng_state(state)


def _deepspeed_checkpoint_classes() -> list[type]:
    """The only non-tensor objects DeepSpeed's ZeRO optimizer states pickle (stages 0-3, fp32)."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, ZeroStageEnum, fragment_address]


def load_weights_only(path: str | Path, map_location: Any = None) -> Any:
    """A DeepSpeed checkpoint file read with `weights_only=True`: tensors, plain containers and the
    few DeepSpeed classes its optimizer states hold; any other pickled object is refused."""
    with torch.serialization.safe_globals(_deepspeed_checkpoint_classes()):
        return torch.load(path, map_location=map_location, weights_only=True)


def use_weights_only_loads(engine: Any) -> None:
    """Route the DeepSpeed engine's checkpoint reads through `load_weights_only`: its own checkpoint
    engine unpickles with `weights_only=False`, which runs whatever code a crafted file carries."""
    engine.checkpoint_engine.load = load_weights_only


def rng_file(folder: Path, rank: int) -> Path:
    return folder / f"rng-rank-{rank:05d}.pt"


def write_metrics(path: Path, rows: list[dict[str, Any]]) -> None:
    write_table_atomic(LOCAL, str(path), TRAIN_METRICS.from_rows(rows), TRAIN_METRICS)


def read_metrics(path: Path) -> list[dict[str, Any]]:
    return validate_table(pq.read_table(path), TRAIN_METRICS).to_pylist()


def write_state(folder: Path, state: TrainerState) -> None:
    write_json_atomic(LOCAL, str(folder / STATE_FILE), asdict(state))


def copy_processor_files(base: Path, out: Path) -> None:
    for name in PROCESSOR_FILES:
        if (base / name).is_file() and not (out / name).exists():
            shutil.copy2(base / name, out / name)


def replace_dir(new: Path, dest: Path) -> None:
    """Put the folder `new` at `dest`, replacing what is there (renames, then deletes the old one)."""
    old = dest.with_name(f".{dest.name}.old-{uuid.uuid4().hex[:8]}")
    if dest.exists():
        os.replace(dest, old)
    os.replace(new, dest)
    shutil.rmtree(old, ignore_errors=True)


def fsync_tree(folder: Path) -> None:
    """Flush every file and folder under `folder` to disk (a checkpoint, before it is renamed into place)."""
    for path in sorted(folder.rglob("*"), key=lambda p: len(p.parts), reverse=True):
        fsync_path(path)
    fsync_path(folder)
