"""The SFT worker: one process of a torchrun launch, `python -m tasks.sft.trainer <job.json>`.

Every rank loads the base model, wraps it for MM-SP (`models.qwen_sp`) and hands it to DeepSpeed
(ZeRO stage from the config; gloo on CPU, NCCL on GPU). The ranks of an SP group read the same
micro-batches; data-parallel replicas read different ones (`TrainSchedule`). Checkpoints go to
`<out_dir>/_checkpoints/`, the trained model to `<out_dir>/model/`, and the metrics and a small
result record to the job's work folder, where the stage picks them up.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from parallel.launch import configure_worker_logging, run_worker
from parallel.loss import count_sum, cross_entropy_sum
from parallel.sequence import IGNORE_INDEX, shift_labels
from parallel.topology import Topology, init_topology
from tasks.config import SFTConfig
from tasks.sft import checkpoints as ckpt
from tasks.sft.data import SFTExample, collate, encode_example, load_frames
from tasks.sft.schedule import TrainSchedule

log = logging.getLogger("lvr.sft.trainer")

JOB_FILE = "job.json"
METRICS_FILE = "metrics.parquet"
RESULT_FILE = "result.json"
CHECKPOINTS_DIR = "_checkpoints"
MODEL_DIR = "model"
METRIC_NAMES = ("loss", "tokens_per_s", "lr", "grad_norm")


@dataclass(frozen=True)
class TrainJob:
    """Everything the workers need, written by the stage as `job.json`.

    `out_dir`: the stage folder (`model/` and `_checkpoints/` go there); `work_dir`: this run's
    private folder (job, metrics, result, worker tracebacks).
    """

    run_key: str
    model_path: str
    examples: tuple[SFTExample, ...]
    config: SFTConfig
    out_dir: str
    work_dir: str

    def save(self, path: Path) -> None:
        data = {**asdict(self), "config": self.config.model_dump(mode="json")}
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: Path) -> TrainJob:
        data = json.loads(Path(path).read_text())
        return cls(
            run_key=data["run_key"], model_path=data["model_path"],
            examples=tuple(SFTExample(**e) for e in data["examples"]),
            config=SFTConfig.model_validate(data["config"]), out_dir=data["out_dir"], work_dir=data["work_dir"],
        )


@dataclass(frozen=True)
class TrainResult:
    run_key: str
    examples: int
    steps: int
    resumed_from_step: int | None
    world_size: int
    sp_degree: int
    train_time_s: float


def deepspeed_config(cfg: SFTConfig) -> dict[str, Any]:
    return {
        "train_micro_batch_size_per_gpu": cfg.micro_batch_size,
        "gradient_accumulation_steps": cfg.grad_accum,
        "gradient_clipping": cfg.max_grad_norm,
        "zero_optimization": {"stage": cfg.zero_stage},
        "bf16": {"enabled": cfg.precision == "bf16"},
        # torch's AdamW works on CPU and GPU alike (DeepSpeed's own Adam needs CUDA or a C++ build).
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,
    }


def init_distributed(sp_degree: int) -> tuple[Topology, torch.device]:
    import deepspeed

    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo")
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    return init_topology(sp_degree), device


def build_engine(model_path: str, cfg: SFTConfig, topo: Topology, schedule: TrainSchedule):
    """The base model wrapped for MM-SP inside a DeepSpeed engine, with AdamW and the LR schedule."""
    import deepspeed
    from transformers import AutoModelForImageTextToText

    from models.qwen_sp import SPQwen2_5_VL

    dtype = torch.bfloat16 if cfg.precision == "bf16" else torch.float32
    # Every rank loads the whole model into host memory and ZeRO-3 partitions it at initialize.
    # (transformers' partitioned loading, HfDeepSpeedConfig, records weight renamings that
    # save_pretrained then inverts into wrong checkpoint keys.)
    model = AutoModelForImageTextToText.from_pretrained(model_path, dtype=dtype)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    module = SPQwen2_5_VL(model, topo.sp)
    optimizer = torch.optim.AdamW(
        module.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay, fused=torch.cuda.is_available()
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule.lr_factor)
    engine, _, _, _ = deepspeed.initialize(model=module, optimizer=optimizer, lr_scheduler=scheduler, config=deepspeed_config(cfg))
    engine.train()
    return engine


def scored_tokens(batches: list[dict[str, torch.Tensor]], topo: Topology, device: torch.device) -> torch.Tensor:
    """Tokens the loss scores in one optimizer step, over all replicas (counted once per SP group)."""
    local = sum(int((shift_labels(b["labels"]) != IGNORE_INDEX).sum()) for b in batches) if topo.sp.rank == 0 else 0
    return count_sum(torch.tensor(float(local), device=device))


def forward_backward(engine, batch: dict[str, torch.Tensor], step_tokens: torch.Tensor, topo: Topology) -> torch.Tensor:
    """One micro-batch: this rank's slice of the loss, back-propagated. Returns the slice's
    summed cross-entropy (detached).

    Each rank back-propagates sum_local / step_tokens, its share of the step's token-mean loss.
    DeepSpeed then averages gradients over all ranks, but the shares must be summed (over SP
    slices, micro-batches and replicas alike), hence the factor of world size; `scale_wrt_gas`
    is off because the division by the step's tokens already covers accumulation.
    """
    batch = {k: v.to(engine.device) for k, v in batch.items()}
    shard = engine(**batch)
    loss_sum, _ = cross_entropy_sum(shard.logits, shard.targets)
    engine.backward(loss_sum / step_tokens.to(loss_sum.dtype) * topo.world_size, scale_wrt_gas=False)
    return loss_sum.detach()


class Trainer:
    """One rank's training run of a `TrainJob`."""

    def __init__(self, job: TrainJob):
        from transformers import AutoTokenizer

        from models.vlm import load_preprocess_config

        self.job = job
        self.cfg = job.config
        self.topo, self.device = init_distributed(self.cfg.sp_degree)
        torch.manual_seed(self.cfg.seed)
        self.tokenizer = AutoTokenizer.from_pretrained(job.model_path)
        self.preprocess = load_preprocess_config(job.model_path)
        self.schedule = TrainSchedule.plan(len(job.examples), self.cfg, self.topo.dp_size)
        self.engine = build_engine(job.model_path, self.cfg, self.topo, self.schedule)
        self.checkpoints = Path(job.out_dir) / CHECKPOINTS_DIR
        self.metrics: list[dict[str, Any]] = []
        self.elapsed_s = 0.0

    @property
    def is_main(self) -> bool:
        return self.topo.rank == 0

    def batches(self, step: int) -> list[dict[str, torch.Tensor]]:
        pad = self.tokenizer.pad_token_id
        out = []
        for indices in self.schedule.micro_batches(step, self.topo.dp_rank):
            encoded = []
            for i in indices:
                example = self.job.examples[i]
                frames = load_frames(example.video_uri, self.cfg.num_frames)
                encoded.append(encode_example(self.tokenizer, self.preprocess, example, frames))
            out.append(collate(encoded, pad))
        return out

    def run(self) -> TrainResult:
        start = self.resume()
        resumed = start if start > 0 else None
        total = self.schedule.total_steps
        if self.is_main:
            log.info(
                "training %d steps on %d examples: world %d = %d data-parallel x %d sequence-parallel, ZeRO-%d, %s%s",
                total, len(self.job.examples), self.topo.world_size, self.topo.dp_size, self.topo.sp.size,
                self.cfg.zero_stage, self.cfg.precision, f", resuming after step {start}" if resumed else "",
            )
        for step in range(start, total):
            self.train_step(step)
            done = step + 1
            if done % self.cfg.save_every == 0 and done < total:
                self.save_checkpoint(done)
        self.publish()
        result = TrainResult(self.job.run_key, len(self.job.examples), total, resumed, self.topo.world_size, self.topo.sp.size, round(self.elapsed_s, 3))
        if self.is_main:
            work = Path(self.job.work_dir)
            ckpt.write_metrics(work / METRICS_FILE, self.metrics)
            (work / RESULT_FILE).write_text(json.dumps(asdict(result), indent=2) + "\n")
        dist.barrier()
        return result

    def train_step(self, step: int) -> None:
        started = time.perf_counter()
        batches = self.batches(step)
        step_tokens = scored_tokens(batches, self.topo, self.device)
        lr = self.engine.get_lr()[0]
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        seen = 0
        for batch in batches:
            loss_sum += forward_backward(self.engine, batch, step_tokens, self.topo).double()
            seen += int(batch["attention_mask"].sum()) if self.topo.sp.rank == 0 else 0
            self.engine.step()
        totals = count_sum(torch.stack([loss_sum, torch.tensor(float(seen), dtype=torch.float64, device=self.device)]))
        seconds = time.perf_counter() - started
        self.elapsed_s += seconds
        grad_norm = self.engine.get_global_grad_norm()
        values = {
            "loss": float(totals[0] / step_tokens.clamp(min=1)),
            "tokens_per_s": float(totals[1]) / seconds,
            "lr": float(lr),
            "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
        }
        if self.is_main:
            self.metrics.extend(
                {"stage": "sft", "step": step + 1, "name": name, "value": values[name], "time_s": round(self.elapsed_s, 4)}
                for name in METRIC_NAMES
            )
            log.info(
                "step %d/%d loss %.4f lr %.3g grad_norm %.3g tokens/s %.0f", step + 1, self.schedule.total_steps,
                values["loss"], values["lr"], values["grad_norm"], values["tokens_per_s"],
            )

    # --- checkpoints ---------------------------------------------------------------------------
    def resume(self) -> int:
        """Load this run's newest checkpoint if there is one; returns the steps already done."""
        found = [None]
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
        self.engine.load_checkpoint(str(folder / "optimizer"), tag="state")
        ckpt.set_rng_state(torch.load(ckpt.rng_file(folder, self.topo.rank), weights_only=False))
        if self.is_main:
            self.metrics = ckpt.read_metrics(folder / METRICS_FILE)
            log.info("resuming from %s (step %d of %d)", folder, state.step, state.total_steps)
        self.elapsed_s = state.elapsed_s
        return state.step

    def save_checkpoint(self, step: int) -> None:
        tmp = ckpt.partial_dir(self.checkpoints, step)
        if self.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        dist.barrier()
        self.engine.save_checkpoint(str(tmp / "optimizer"), tag="state", save_latest=False)
        torch.save(ckpt.rng_state(), ckpt.rng_file(tmp, self.topo.rank))
        self.save_model(tmp / MODEL_DIR, step)
        if self.is_main:
            ckpt.write_metrics(tmp / METRICS_FILE, self.metrics)
            ckpt.write_state(tmp, ckpt.TrainerState(self.job.run_key, step, self.schedule.total_steps, round(self.elapsed_s, 4)))
        dist.barrier()
        if self.is_main:
            os.replace(tmp, ckpt.step_dir(self.checkpoints, step))
            ckpt.prune(self.checkpoints, self.job.run_key, self.cfg.keep_checkpoints)
            log.info("checkpoint step-%d saved", step)
        dist.barrier()

    def save_model(self, folder: Path, step: int) -> None:
        """The model as a `save_pretrained` folder loadable by `models.vlm.HFVideoLM` (a collective:
        under ZeRO-3 the partitioned weights are gathered first)."""
        state = None
        if self.cfg.zero_stage == 3:
            full = self.engine._zero3_consolidated_16bit_state_dict()
            state = {k.removeprefix("model."): v for k, v in (full or {}).items()}
        if self.is_main:
            model = self.engine.module.model
            model.save_pretrained(folder, state_dict=state, safe_serialization=True)
            self.tokenizer.save_pretrained(folder)
            ckpt.copy_processor_files(Path(self.job.model_path), folder)
            info = {"run_key": self.job.run_key, "step": step, "base_model": self.job.model_path}
            (folder / ckpt.TRAIN_INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")

    def publish(self) -> None:
        """Write the trained model to `<out_dir>/model`, replacing the previous one atomically."""
        tmp = Path(self.job.out_dir) / f".{MODEL_DIR}.tmp-{self.job.run_key}"
        if self.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        dist.barrier()
        self.save_model(tmp, self.schedule.total_steps)
        if self.is_main:
            ckpt.replace_dir(tmp, Path(self.job.out_dir) / MODEL_DIR)
        dist.barrier()


def main() -> None:
    import transformers

    configure_worker_logging("lvr")
    transformers.utils.logging.disable_progress_bar()  # a bar per rank per save is noise in the stage log
    # DeepSpeed's ZeRO calls a torch.distributed function torch has renamed: not ours to fix.
    warnings.filterwarnings("ignore", message=r".*torch\.distributed\.\w+` is deprecated", category=FutureWarning)
    if len(sys.argv) != 2:
        raise SystemExit(f"usage: python -m tasks.sft.trainer {JOB_FILE}")
    Trainer(TrainJob.load(Path(sys.argv[1]))).run()
    dist.destroy_process_group()


if __name__ == "__main__":
    run_worker(main)
