"""The SFT stage: chain-of-thought SFT of the base model on the filter stage's SFT split.

The whole training run is the stage's single work item. Its shard launches `torchrun` (processes
per node from `sft.nproc_per_node`) running `tasks.sft.trainer`, streams the workers' logs into
the stage's log, and fails with the failing worker's traceback. Resuming is the trainer's job:
a rerun after a crash (or a Prefect retry of the shard) starts from the newest checkpoint of the
same run key under `sft/_checkpoints/`.

Outputs: `sft/model/` (save_pretrained; loads with `models.vlm.HFVideoLM`), `sft/metrics.parquet`
(TRAIN_METRICS, one row per step and metric), the report `report/sft.md` with the loss curve,
and the manifest. The workers write with plain file I/O: on an object-store workdir they write to a
local staging folder that `tasks.staging` mirrors to the workdir (checkpoints as they complete,
then the model), and a retry on a fresh machine resumes from the checkpoints found there.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from data_schemas import TRAIN_METRICS
from models.vlm import resolve_model_ref
from parallel.launch import LaunchSpec
from parallel.ulysses import kv_repeat_factor
from tasks.artifacts import Failure, stable_hash, url_to_fs
from tasks.config import SFTConfig
from tasks.sft.data import load_sft_examples
from tasks.sft.report import REPORT_FILE, write_sft_report
from tasks.sft.trainer import TrainJob
from tasks.stage import ShardResult, StageContext, StageError, WorkItem
from tasks.staging import TrainingStage, launch_training, run_dir, staged_dir



def launch_spec(cfg: SFTConfig, job_file: Path) -> LaunchSpec:
    """torchrun for the trainer: DeepSpeed's CPU accelerator and one thread share per process on
    a machine without CUDA (unless the environment already says otherwise)."""
    env: dict[str, str] = {}
    if not torch.cuda.is_available():
        env["DS_ACCELERATOR"] = os.environ.get("DS_ACCELERATOR", "cpu")
        env["OMP_NUM_THREADS"] = os.environ.get("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // cfg.nproc_per_node)))
    return LaunchSpec(
        module="tasks.sft.trainer", args=(str(job_file),), nproc_per_node=cfg.nproc_per_node, nnodes=cfg.nnodes,
        node_rank=cfg.node_rank, master_addr=cfg.master_addr, master_port=cfg.master_port, env=env,
    )


def check_sp_degree(model_path: str, sp_degree: int) -> None:
    """Ulysses splits attention heads over the SP group: refuse, before launching anything, an SP
    degree the model's heads cannot be split by (checked when the checkpoint is a local folder)."""
    config_file = Path(model_path) / "config.json"
    if not config_file.is_file():
        return
    config = json.loads(config_file.read_text())
    text = config.get("text_config", config)
    heads = text["num_attention_heads"]
    try:
        kv_repeat_factor(heads, text.get("num_key_value_heads", heads), sp_degree)
    except ValueError as exc:
        raise StageError(f"sft.sp_degree={sp_degree} does not fit {model_path}: {exc}") from None


def video_exists(uri: str) -> bool:
    fs, path = url_to_fs(uri)
    return bool(fs.exists(path))


class SFTStage(TrainingStage):
    name = "sft"
    code_version = "1"
    report_file = REPORT_FILE

    def list_items(self, ctx: StageContext) -> list[WorkItem]:
        examples = load_sft_examples(ctx.workdir)
        if not examples:
            raise StageError("the filter stage put no item in the sft split: there is nothing to train on")
        # Which videos exist is part of the item: a video that reappears makes it another run.
        present = {uri: video_exists(uri) for uri in {e.video_uri for e in examples}}
        missing = sorted(e.qa_id for e in examples if not present[e.video_uri])
        key = stable_hash({"model": ctx.config.sft.model, "examples": [vars(e) for e in examples], "missing": missing})
        return [WorkItem("sft", key=key, payload={"examples": examples, "missing": missing})]

    def process_shard(self, ctx: StageContext, items: list[WorkItem]) -> ShardResult:
        (item,) = items
        cfg = ctx.config.sft
        missing = set(item.payload["missing"])
        examples = [e for e in item.payload["examples"] if e.qa_id not in missing]
        failures = [
            Failure(e.qa_id, "missing_video", f"source video not found: {e.video_uri}") for e in item.payload["examples"] if e.qa_id in missing
        ]
        if not examples:
            raise StageError(f"none of the {len(failures)} sft examples has its source video; first missing: {failures[0].message}")
        model_path = resolve_model_ref(cfg.model)
        check_sp_degree(model_path, cfg.sp_degree)
        staged = staged_dir(ctx.workdir, self.name)
        run_key = self.run_key(ctx, item)
        job = TrainJob(run_key, model_path, tuple(examples), cfg, str(staged.local), str(run_dir(staged, run_key)))
        _, metrics = launch_training(staged, job, lambda job_file: launch_spec(cfg, job_file), cfg.keep_checkpoints)
        return ShardResult({TRAIN_METRICS.name: TRAIN_METRICS.from_rows(metrics)}, failures)

    def write_report(self, ctx: StageContext, metrics: list[dict[str, Any]], result: dict[str, Any]) -> None:
        write_sft_report(ctx.workdir, metrics, result)
