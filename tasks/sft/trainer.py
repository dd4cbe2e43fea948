"""The SFT worker: one process of a torchrun launch, `python -m tasks.sft.trainer <job.json>`.

Every rank loads the base model, wraps it for MM-SP (`models.qwen_sp`) and hands it to DeepSpeed
(ZeRO stage from the config; gloo on CPU, NCCL on GPU). The ranks of an SP group read the same
micro-batches; data-parallel replicas read different ones (`TrainSchedule`). Checkpoints go to
`<out_dir>/_checkpoints/`, the trained model to `<out_dir>/model/`, and the metrics and a small
result record to the job's work folder, where the stage picks them up.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from models.positions import use_trained_positions
from models.qwen_sp import SPQwen2_5_VL
from models.vlm import load_preprocess_config
from parallel.launch import run_worker
from parallel.loss import count_sum, cross_entropy_sum
from parallel.sequence import IGNORE_INDEX, shift_labels
from parallel.topology import Topology
from tasks.config import SFTConfig, TrackingConfig
from tasks.engine.store import LOCAL, write_json_atomic
from tasks.media.frames import FrameCache
from tasks.sft.data import SFTExample, collate, example_inputs
from tasks.training import checkpoints as ckpt
from tasks.training.loop import (
    MODEL_DIR,
    StepTrainer,
    import_deepspeed,
    init_distributed,
    worker_main,
)
from tasks.training.schedule import TrainSchedule
from tasks.training.validation import ValidationExample

METRIC_NAMES = ("loss", "tokens_per_s", "lr", "grad_norm")


@dataclass(frozen=True)
class TrainJob:
    """Everything the workers need, written by the stage as `job.json`.

    `out_dir`: the stage folder (`model/` and `_checkpoints/` go there); `work_dir`: this run's
    private folder (job, metrics, result, worker tracebacks); `tracking`: where rank 0 reports;
    `validation`: the eval questions rank 0 scores the model on when `tracking.validate_every` is set.
    """

    run_key: str
    model_path: str
    examples: tuple[SFTExample, ...]
    config: SFTConfig
    out_dir: str
    work_dir: str
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    validation: tuple[ValidationExample, ...] = ()

    def save(self, path: Path) -> None:
        data = {**asdict(self), "config": self.config.model_dump(mode="json"), "tracking": self.tracking.model_dump(mode="json")}
        write_json_atomic(LOCAL, str(path), data)

    @classmethod
    def load(cls, path: Path) -> TrainJob:
        data = json.loads(Path(path).read_text())
        return cls(
            run_key=data["run_key"], model_path=data["model_path"],
            examples=tuple(SFTExample(**e) for e in data["examples"]),
            config=SFTConfig.model_validate(data["config"]), out_dir=data["out_dir"], work_dir=data["work_dir"],
            tracking=TrackingConfig.model_validate(data["tracking"]),
            validation=tuple(ValidationExample.from_dict(e) for e in data["validation"]),
        )


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


def build_engine(model_path: str, cfg: SFTConfig, topo: Topology, schedule: TrainSchedule):
    """The base model wrapped for MM-SP inside a DeepSpeed engine, with AdamW and the LR schedule."""
    from transformers import AutoModelForImageTextToText

    deepspeed = import_deepspeed()
    dtype = torch.bfloat16 if cfg.precision == "bf16" else torch.float32
    # Every rank loads the whole model into host memory and ZeRO-3 partitions it at initialize.
    # (transformers' partitioned loading, HfDeepSpeedConfig, records weight renamings that
    # save_pretrained then inverts into wrong checkpoint keys.)
    model = use_trained_positions(AutoModelForImageTextToText.from_pretrained(model_path, dtype=dtype, revision=cfg.revision))
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


class Trainer(StepTrainer):
    """One rank's SFT run of a `TrainJob`."""

    stage = "sft"

    def __init__(self, job: TrainJob):
        from transformers import AutoTokenizer

        self.job = job
        self.cfg = job.config
        self.topo, self.device = init_distributed(self.cfg.sp_degree)
        torch.manual_seed(self.cfg.seed)
        self.tokenizer = AutoTokenizer.from_pretrained(job.model_path, revision=job.config.revision)
        self.preprocess = load_preprocess_config(job.model_path)
        self.schedule = TrainSchedule.plan(len(job.examples), self.cfg, self.topo.dp_size)
        self.engine = build_engine(job.model_path, self.cfg, self.topo, self.schedule)
        self.frames = FrameCache(self.cfg.frame_cache_mb * 2**20)
        super().__init__()

    @property
    def total_steps(self) -> int:
        return self.schedule.total_steps

    def describe(self) -> str:
        return (
            f"training {self.total_steps} steps on {len(self.job.examples)} examples: world {self.topo.world_size} = "
            f"{self.topo.dp_size} data-parallel x {self.topo.sp.size} sequence-parallel, ZeRO-{self.cfg.zero_stage}, {self.cfg.precision}"
        )

    def batches(self, step: int) -> list[dict[str, torch.Tensor]]:
        pad = self.tokenizer.pad_token_id
        out = []
        for indices in self.schedule.micro_batches(step, self.topo.dp_rank):
            encoded = [example_inputs(self.tokenizer, self.preprocess, self.job.examples[i], self.cfg, self.frames) for i in indices]
            out.append(collate(encoded, pad))
        return out

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
        self.record(step, values, METRIC_NAMES)
        if self.is_main:
            self.log.info(
                "step %d/%d loss %.4f lr %.3g grad_norm %.3g tokens/s %.0f", step + 1, self.total_steps,
                values["loss"], values["lr"], values["grad_norm"], values["tokens_per_s"],
            )

    # --- what SFT checkpoints hold besides the engine's state -----------------------------------
    def save_extra(self, folder: Path, step: int) -> None:
        ckpt.save_rng_state(ckpt.rng_file(folder, self.topo.rank))  # data order and dropout resume exactly
        self.save_model(folder / MODEL_DIR, step)  # a checkpoint's model can be evaluated on its own

    def restore_extra(self, folder: Path) -> None:
        ckpt.load_rng_state(ckpt.rng_file(folder, self.topo.rank))

    def trained_model(self) -> torch.nn.Module:
        return self.engine.module.model

    def consolidated_state(self) -> dict[str, torch.Tensor] | None:
        if self.cfg.zero_stage != 3:
            return None
        full = self.engine._zero3_consolidated_16bit_state_dict()  # collective: gathers the partitions
        return {k.removeprefix("model."): v for k, v in (full or {}).items()}


def main() -> None:
    worker_main(lambda job_file: Trainer(TrainJob.load(job_file)), "tasks.sft.trainer")


if __name__ == "__main__":
    run_worker(main)
