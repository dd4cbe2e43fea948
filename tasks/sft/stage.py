"""The SFT stage: chain-of-thought SFT of the base model on the filter stage's SFT split.

The whole training run is the stage's single work item. Its shard launches `torchrun` (processes
per node from `sft.nproc_per_node`) running `tasks.sft.trainer`, streams the workers' logs into
the stage's log, and fails with the failing worker's traceback. Resuming is the trainer's job:
a rerun after a crash (or a Prefect retry of the shard) starts from the newest checkpoint of the
same run key under `sft/_checkpoints/`.

Outputs: `sft/model/` (save_pretrained; loads with `models.vlm.HFVideoLM`), `sft/metrics.parquet`
(TRAIN_METRICS, one row per step and metric), the report `report/sft.md` with the loss curve,
and the manifest. The workers write with plain file I/O: on an object-store workdir they write to a
local staging folder that `tasks.training.staging` mirrors to the workdir (checkpoints as they complete,
then the model), and a retry on a fresh machine resumes from the checkpoints found there.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from data_schemas import TRAIN_METRICS
from models.vlm import resolve_model_ref
from parallel.topology import kv_repeat_factor
from tasks.engine.stage import ShardResult, StageContext, StageError, WorkItem
from tasks.engine.store import Failure, stable_hash
from tasks.media.sources import video_exists
from tasks.sft.data import load_sft_examples
from tasks.sft.report import REPORT_FILE, write_sft_report
from tasks.sft.trainer import TrainJob
from tasks.training.stage import TrainingStage
from tasks.training.staging import run_dir, staged_dir
from tasks.training.validation import validation_examples


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


class SFTStage(TrainingStage):
    name = "sft"
    code_version = "2"  # 2: mRoPE positions as the checkpoint was trained (models.positions)
    report_file = REPORT_FILE
    trainer_module = "tasks.sft.trainer"

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
        tracking = ctx.config.tracking
        job = TrainJob(
            run_key, model_path, tuple(examples), cfg, str(staged.local), str(run_dir(staged, run_key)), tracking=tracking,
            validation=validation_examples(ctx.workdir, tracking.validate_examples) if tracking.validate_every else (),
        )
        return ShardResult({TRAIN_METRICS.name: TRAIN_METRICS.from_rows(self.train(ctx, job))}, failures)

    def write_report(self, ctx: StageContext, metrics: list[dict[str, Any]], result: dict[str, Any]) -> None:
        write_sft_report(ctx.workdir, metrics, result)
