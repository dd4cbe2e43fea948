"""The GRPO stage: RL with MR-SP on the filter stage's `rl` split, from the SFT model.

The training stage pattern of `tasks.sft.stage`: the whole run is the stage's single work item;
its shard launches `torchrun` (`grpo.nproc_per_node` processes per node, default `sp_degree`)
running `tasks.grpo.trainer`, streams the workers' logs, and fails with the failing worker's
traceback. A rerun after a crash (or a Prefect retry) resumes from the newest checkpoint of the
same run key under `grpo/_checkpoints/`.

The initial policy and the frozen reference are `grpo.model`: by default the SFT stage's model
once that stage is complete (its fingerprint then joins this stage's inputs), else the base model
the dataset was filtered with (`filter.model`).

Outputs: `grpo/model/` (save_pretrained; loads with `models.vlm.HFVideoLM`), `grpo/metrics.parquet`
(TRAIN_METRICS: reward, accuracy and format rewards, KL, clip fraction, response length, step
time, vision-encoder calls... per step), `report/grpo.md` with the reward curve (also the stage's
Prefect artifact), the manifest, the embedding cache `grpo/_embeddings/` (kept across runs), and
`grpo/_samples/` (GRPO_SAMPLES: every rollout of the first replica every `tracking.samples_every`
steps, also sent to the tracker; tracking is not part of the fingerprint, so a cached run keeps its samples).
On an object-store workdir the workers write to a local staging folder mirrored to the workdir
(`tasks.training.staging`, as for SFT), and the SFT model is downloaded once into the local model cache.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from data_schemas import GRPO_SAMPLES, TRAIN_METRICS, TableSchema
from models.vlm import resolve_model_ref
from tasks.engine.manifest import output_identity, read_manifest
from tasks.engine.stage import ShardResult, StageContext, StageError, WorkItem
from tasks.engine.store import Failure, stable_hash
from tasks.grading.judge import judge_api_key, judge_identity
from tasks.grpo.data import RLExample, load_rl_examples
from tasks.grpo.report import REPORT_FILE, write_grpo_report
from tasks.grpo.trainer import GRPOJob
from tasks.media.sources import video_exists
from tasks.training.loop import MODEL_DIR
from tasks.training.models import local_model, model_identity
from tasks.training.stage import TrainingStage
from tasks.training.staging import run_dir, staged_dir
from tasks.training.validation import validation_examples

SFT = "sft"
BASE = "base"
EMBEDDINGS_DIR = "_embeddings"
SAMPLES_DIR = "_samples"  # GRPO_SAMPLES: rollouts kept every tracking.samples_every steps


@dataclasses.dataclass(frozen=True)
class InitModel:
    path: str  # where the model is: a local folder, a model id, or a URL in an object-store workdir
    identity: str  # changes whenever the weights behind `path` may have changed
    from_sft: bool
    revision: str | None = None  # the pinned revision of a hub model id


def init_model(ctx: StageContext) -> InitModel:
    """`grpo.model` resolved: the SFT stage's model (which must exist: starting from the base model
    instead would silently train another recipe), the base model, or a checkpoint."""
    ref, revision = ctx.config.grpo.model, ctx.config.grpo.revision
    if ref == SFT:
        manifest = read_manifest(ctx.workdir, SFT)
        if manifest is None or not ctx.workdir.exists(SFT, MODEL_DIR):
            raise StageError(
                f"grpo.model is 'sft' but {ctx.workdir.uri(SFT, MODEL_DIR)} does not exist: run the sft stage first, or set "
                "grpo.model=base to start GRPO from the base model (filter.model)"
            )
        return InitModel(ctx.workdir.uri(SFT, MODEL_DIR), output_identity(manifest), True)
    if ref == BASE:
        ref, revision = ctx.config.filter.model, ctx.config.filter.revision
    return InitModel(ref, model_identity(ref, revision), False, revision)


class GRPOStage(TrainingStage):
    name = "grpo"
    code_version = "2"  # 2: mRoPE positions as the checkpoint was trained (models.positions)
    # inputs: filter, plus sft when its model is the initial policy (`input_fingerprints`)
    side_outputs = (GRPO_SAMPLES,)
    report_file = REPORT_FILE
    trainer_module = "tasks.grpo.trainer"

    def input_fingerprints(self, ctx: StageContext) -> dict[str, str]:
        fingerprints = super().input_fingerprints(ctx)
        init = init_model(ctx)
        if init.from_sft:
            fingerprints[SFT] = init.identity
        return fingerprints

    def settings(self, ctx: StageContext) -> dict[str, Any]:
        settings = super().settings(ctx)
        init = init_model(ctx)
        settings["init_model"] = {"path": init.path, "identity": init.identity}
        if ctx.config.judge.model:  # the judge's verdicts are part of the rewards
            settings["judge"] = judge_identity(ctx.config.judge)
        return settings

    def list_items(self, ctx: StageContext) -> list[WorkItem]:
        examples = load_rl_examples(ctx.workdir)
        if not examples:
            raise StageError("the filter stage put no item in the rl split: there is nothing to train on")
        init = init_model(ctx)
        key = stable_hash({"model": init.identity, "examples": [dataclasses.asdict(e) for e in examples]})
        payload = {"examples": examples, "model_path": init.path, "model_identity": init.identity, "model_revision": init.revision}
        return [WorkItem("grpo", key=key, payload=payload)]

    def cache_dir(self, ctx: StageContext) -> str | None:
        cfg = ctx.config.grpo
        if not cfg.embedding_cache:
            return None
        if cfg.embedding_cache_dir:
            return str(Path(cfg.embedding_cache_dir).expanduser().resolve())
        # Beside the stage's files: <workdir>/grpo/_embeddings for a local workdir. For an object-store
        # workdir it stays in the local staging folder, not mirrored: it is a pure speed-up that any
        # machine rebuilds in one pass over the videos, the ranks read it entry by entry every step
        # (object-store latency per entry would cost more than the encoding it saves), and it is large.
        return str(staged_dir(ctx.workdir, self.name).local_path(EMBEDDINGS_DIR))

    def process_shard(self, ctx: StageContext, items: list[WorkItem]) -> ShardResult:
        (item,) = items
        cfg = ctx.config.grpo
        judge = ctx.config.judge if ctx.config.judge.model else None
        if judge is not None:
            judge_api_key(judge)  # an unset key variable stops the stage here, not in every worker
        examples: list[RLExample] = []
        failures: list[Failure] = []
        for example in item.payload["examples"]:
            if video_exists(example.video_uri):
                examples.append(example)
            else:
                failures.append(Failure(example.qa_id, "missing_video", f"source video not found: {example.video_uri}"))
        if not examples:
            raise StageError(f"none of the {len(failures)} rl examples has its source video; first missing: {failures[0].message}")
        run_key = self.run_key(ctx, item)
        staged = staged_dir(ctx.workdir, self.name)
        model_path = resolve_model_ref(local_model(item.payload["model_path"], item.payload["model_identity"]))
        job = GRPOJob(
            run_key, model_path, tuple(examples), cfg, str(staged.local), str(run_dir(staged, run_key)),
            cache_dir=self.cache_dir(ctx), judge=judge, model_revision=item.payload["model_revision"],
            tracking=ctx.config.tracking,
            validation=validation_examples(ctx.workdir, ctx.config.tracking.validate_examples) if ctx.config.tracking.validate_every else (),
        )
        metrics = TRAIN_METRICS.from_rows(self.train(ctx, job))
        return ShardResult({TRAIN_METRICS.name: metrics, GRPO_SAMPLES.name: self.run_samples(ctx, run_key, GRPO_SAMPLES)}, failures)

    def table_dir(self, ctx: StageContext, schema: TableSchema) -> str:
        if schema.name == GRPO_SAMPLES.name:
            return ctx.stage_path(self.name, SAMPLES_DIR)
        return super().table_dir(ctx, schema)

    def write_report(self, ctx: StageContext, metrics: list[dict[str, Any]], result: dict[str, Any]) -> None:
        write_grpo_report(ctx.workdir, metrics, result, ctx.config.grpo)
