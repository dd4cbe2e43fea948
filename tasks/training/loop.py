"""What the SFT and GRPO workers share: one rank's step loop with checkpoints every `save_every`
steps, resume from the newest checkpoint of the same run, the trained model published atomically,
the run's result and metrics, and the torchrun entry point.

A trainer subclass says how to take a step (`train_step`) and what else its checkpoints hold
(`save_extra` / `restore_extra`); this module owns when and how state is written. Checkpoint
folders are built under a temporary name and renamed into place by rank 0 once every rank has
written its part, so a run killed at any moment resumes from a whole checkpoint.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import shutil
import sys
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import torch
import torch.distributed as dist

from data_schemas import TableSchema, validate_table
from parallel.launch import configure_worker_logging
from parallel.topology import Topology, init_topology
from tasks.engine.store import LOCAL, fsync_path, write_json_atomic, write_table_atomic
from tasks.training import checkpoints as ckpt
from tasks.training.tracking import TrackedRun, Tracker, open_tracker
from tasks.training.validation import VALIDATION_METRICS, validate

JOB_FILE = "job.json"  # in a run's work folder: what the workers train
METRICS_FILE = "metrics.parquet"  # in the work folder and in each checkpoint
SAMPLES_FILE = "samples.parquet"  # likewise, for a trainer that keeps samples (`samples_schema`)
RESULT_FILE = "result.json"  # in the work folder, written last: the run finished
CHECKPOINTS_DIR = "_checkpoints"  # in the stage folder: step-N/
MODEL_DIR = "model"  # in the stage folder: the trained model


def import_deepspeed():
    """`deepspeed`, with its Muon optimizer's module loaded without torch.compile.

    Each ZeRO engine imports that module at initialize only to ask whether the optimizer is a
    `MuonWithAuxAdam`, and the module wraps its kernels in torch.compile as it loads, whose first
    call sets up inductor: 1.9 s of every rank's start-up on CPU (of ~11), each launch, for an
    optimizer lvr never builds (both trainers use torch's AdamW). Its kernels stay plain functions."""
    import deepspeed

    muon = "deepspeed.runtime.zero.muon.muon_optimizer"
    if muon not in sys.modules:
        compile_ = torch.compile
        torch.compile = _uncompiled
        try:
            importlib.import_module(muon)
        except ImportError:  # a DeepSpeed without Muon
            pass
        finally:
            torch.compile = compile_
    return deepspeed


def _uncompiled(model=None, **_options):
    """torch.compile's signature (the function, or a decorator when called with options only), compiling nothing."""
    return model if model is not None else (lambda fn: fn)


def init_distributed(sp_degree: int) -> tuple[Topology, torch.device]:
    deepspeed = import_deepspeed()

    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo")
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    return init_topology(sp_degree), device


@dataclass(frozen=True)
class TrainResult:
    """What a training run did, written by rank 0 as `result.json` beside the job file."""

    run_key: str
    examples: int
    steps: int
    resumed_from_step: int | None
    world_size: int
    sp_degree: int
    train_time_s: float


class StepTrainer:
    """One rank's training run. Subclasses set, in `__init__`: `job` (run_key, model_path,
    examples, out_dir, work_dir, tracking, validation), `cfg` (save_every, keep_checkpoints, and
    frame_sampling / video_budget: a `tasks.config.VideoInputs`), `topo`, `engine` (DeepSpeed), `tokenizer`, `preprocess`; and implement
    `total_steps`, `train_step`, `trained_model` and `describe`.

    Rank 0 reports to the tracker `job.tracking` names (`tasks.training.tracking`): every recorded
    metric, the rows of `record_samples`, and the end of the run. With `tracking.validate_every`
    set, rank 0 also scores the model on `job.validation` (`tasks.training.validation`) every that
    many steps and after the last, while the other ranks wait."""

    stage: str
    samples_schema: TableSchema | None = None  # rows of `record_samples` (kept like the metrics)
    job: Any
    cfg: Any
    topo: Topology
    engine: Any
    tokenizer: Any
    preprocess: Any

    def __init__(self) -> None:
        self.log = logging.getLogger(f"lvr.{self.stage}.trainer")
        self.checkpoints = Path(self.job.out_dir) / CHECKPOINTS_DIR
        self.metrics: list[dict[str, Any]] = []
        self.samples: list[dict[str, Any]] = []
        self.tracker = Tracker()  # rank 0 opens the configured one once it knows the step it resumes after
        self.elapsed_s = 0.0
        self.validation_skipped = False

    # --- what a subclass says ------------------------------------------------------------------
    @property
    def total_steps(self) -> int:
        raise NotImplementedError

    def train_step(self, step: int) -> None:
        raise NotImplementedError

    def trained_model(self) -> torch.nn.Module:
        """The `save_pretrained` model whose weights are being trained."""
        raise NotImplementedError

    def describe(self) -> str:
        """One line on what this run trains, logged by rank 0 before the first step."""
        raise NotImplementedError

    def save_extra(self, folder: Path, step: int) -> None:
        """Whatever else a checkpoint must hold (called on every rank, inside the temporary folder)."""

    def restore_extra(self, folder: Path) -> None:
        """Restore what `save_extra` wrote (every rank), after the engine's state is loaded."""

    def consolidated_state(self) -> dict[str, torch.Tensor] | None:
        """A collective that returns the full weights where the engine partitions them (ZeRO-3), else None."""
        return None

    # --- the loop ------------------------------------------------------------------------------
    @property
    def is_main(self) -> bool:
        return self.topo.rank == 0

    def run(self) -> TrainResult:
        start = self.resume()
        if self.is_main:
            self.log.info("%s%s", self.describe(), f"; resuming after step {start}" if start else "")
            self.tracker = open_tracker(
                self.job.tracking, TrackedRun(self.stage, self.job.run_key, self.job.out_dir, start, self.cfg.output_settings())
            )
        total = self.total_steps
        try:
            for step in range(start, total):
                self.train_step(step)
                done = step + 1
                every = self.job.tracking.validate_every
                if every and (done % every == 0 or done == total):
                    self.validate(step)
                if done % self.cfg.save_every == 0 and done < total:
                    self.save_checkpoint(done)
            self.publish()
        except BaseException:
            with contextlib.suppress(Exception):  # the training error is the one to see
                self.tracker.close(failed=True)
            raise
        result = TrainResult(
            self.job.run_key, len(self.job.examples), total, start or None, self.topo.world_size, self.topo.sp.size,
            round(self.elapsed_s, 3),
        )
        if self.is_main:
            work = Path(self.job.work_dir)
            ckpt.write_metrics(work / METRICS_FILE, self.metrics)
            self.write_samples(work)
            write_json_atomic(LOCAL, str(work / RESULT_FILE), asdict(result))
            self.tracker.close()
        dist.barrier()
        return result

    def record(self, step: int, values: dict[str, float], names: tuple[str, ...]) -> None:
        """Metric rows of a step (rank 0 keeps them; they travel in checkpoints)."""
        if self.is_main:
            self.metrics.extend(
                {"stage": self.stage, "step": step + 1, "name": name, "value": values[name], "time_s": round(self.elapsed_s, 4)}
                for name in names if name in values
            )
            self.tracker.log_metrics(step + 1, {f"{self.stage}/{name}": values[name] for name in names if name in values})

    def validate(self, step: int) -> None:
        """Rank 0 scores the model on the job's validation questions (recorded as metrics of `step`);
        the other ranks wait. Skipped under ZeRO-3, whose ranks hold only slices of the weights."""
        if not self.job.validation or self.cfg.zero_stage == 3:
            if self.is_main and not self.validation_skipped:
                self.validation_skipped = True  # said once per run
                self.log.warning(
                    "tracking.validate_every is set but validation is skipped: %s",
                    "ZeRO-3 partitions the weights" if self.job.validation else "the eval split has no questions",
                )
            return
        if self.is_main:
            values = validate(
                self.engine.module, self.trained_model(), self.tokenizer, self.preprocess, self.job.validation,
                self.cfg.frame_sampling(), self.cfg.video_budget(), self.job.tracking.validate_max_new_tokens,
            )
            self.record(step, values, VALIDATION_METRICS)
            self.log.info("step %d/%d validation: accuracy %.3f format %.3f on %d eval questions", step + 1, self.total_steps,
                          values["val_accuracy"], values["val_format"], len(self.job.validation))
        dist.barrier()

    def record_samples(self, step: int, rows: list[dict[str, Any]]) -> None:
        """Sampled outputs of a step, as rows of `samples_schema` (rank 0 keeps them; they travel in checkpoints)."""
        if self.is_main:
            self.samples.extend(rows)
            self.tracker.log_samples(step + 1, rows)

    def write_samples(self, folder: Path) -> None:
        if self.samples_schema is not None:
            write_table_atomic(LOCAL, str(folder / SAMPLES_FILE), self.samples_schema.from_rows(self.samples), self.samples_schema)

    # --- checkpoints ---------------------------------------------------------------------------
    def resume(self) -> int:
        """Load this run's newest checkpoint if there is one; returns the steps already done."""
        found: list[str | None] = [None]
        if self.is_main:
            newest = ckpt.checkpoints(self.checkpoints, self.job.run_key)[:1]
            found = [str(newest[0][0]) if newest else None]
            ckpt.prune(self.checkpoints, self.job.run_key, self.cfg.keep_checkpoints)
        dist.broadcast_object_list(found, src=0)
        if found[0] is None:
            return 0
        folder = Path(found[0])
        state = ckpt.TrainerState.read(folder)
        assert state is not None
        ckpt.use_weights_only_loads(self.engine)
        self.engine.load_checkpoint(str(folder / "optimizer"), tag="state")
        self.restore_extra(folder)
        if self.is_main:
            self.metrics = ckpt.read_metrics(folder / METRICS_FILE)
            if self.samples_schema is not None and (folder / SAMPLES_FILE).is_file():
                self.samples = validate_table(pq.read_table(folder / SAMPLES_FILE), self.samples_schema).to_pylist()
            self.log.info("resuming from %s (step %d of %d)", folder, state.step, state.total_steps)
        self.elapsed_s = state.elapsed_s
        return state.step

    def save_checkpoint(self, step: int) -> None:
        tmp = ckpt.partial_dir(self.checkpoints, step)
        if self.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        dist.barrier()
        self.engine.save_checkpoint(str(tmp / "optimizer"), tag="state", save_latest=False)
        self.save_extra(tmp, step)
        if self.is_main:
            ckpt.write_metrics(tmp / METRICS_FILE, self.metrics)
            self.write_samples(tmp)
            ckpt.write_state(tmp, ckpt.TrainerState(self.job.run_key, step, self.total_steps, round(self.elapsed_s, 4)))
        dist.barrier()
        if self.is_main:
            # Every rank's part is on disk before the rename makes the checkpoint count as complete.
            ckpt.fsync_tree(tmp)
            os.replace(tmp, ckpt.step_dir(self.checkpoints, step))
            fsync_path(self.checkpoints)
            ckpt.prune(self.checkpoints, self.job.run_key, self.cfg.keep_checkpoints)
            self.log.info("checkpoint step-%d saved", step)
        dist.barrier()

    # --- the model -----------------------------------------------------------------------------
    def save_model(self, folder: Path, step: int) -> None:
        """The model as a `save_pretrained` folder loadable by `models.vlm.HFVideoLM` (a collective)."""
        state = self.consolidated_state()
        if self.is_main:
            self.trained_model().save_pretrained(folder, state_dict=state, safe_serialization=True)
            self.tokenizer.save_pretrained(folder)
            ckpt.copy_processor_files(Path(self.job.model_path), folder)
            info = {"run_key": self.job.run_key, "step": step, "base_model": self.job.model_path}
            write_json_atomic(LOCAL, str(folder / ckpt.TRAIN_INFO_FILE), info)

    def publish(self) -> None:
        """Write the trained model to `<out_dir>/model`, replacing the previous one atomically."""
        tmp = Path(self.job.out_dir) / f".{MODEL_DIR}.tmp-{self.job.run_key}"
        if self.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        dist.barrier()
        self.save_model(tmp, self.total_steps)
        if self.is_main:
            ckpt.replace_dir(tmp, Path(self.job.out_dir) / MODEL_DIR)
        dist.barrier()


def worker_main(make_trainer: Callable[[Path], StepTrainer], module: str) -> None:
    """A torchrun worker: `python -m <module> job.json` runs one rank of the job."""
    import transformers

    configure_worker_logging("lvr")
    transformers.utils.logging.disable_progress_bar()  # a bar per rank per save is noise in the stage log
    # DeepSpeed's ZeRO calls a torch.distributed function torch has renamed: not ours to fix.
    warnings.filterwarnings("ignore", message=r".*torch\.distributed\.\w+` is deprecated", category=FutureWarning)
    if len(sys.argv) != 2:
        raise SystemExit(f"usage: python -m {module} {JOB_FILE}")
    make_trainer(Path(sys.argv[1])).run()
    dist.destroy_process_group()
