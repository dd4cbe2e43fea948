"""The GRPO worker: one process of a torchrun launch, `python -m tasks.grpo.trainer <job.json>`.

World = data-parallel replicas x `grpo.sp_degree` sequence-parallel ranks. Each step, every
replica takes `prompts_per_step` RL questions (`TrainSchedule`, seeded per step) and:

1. looks each question's video up in the embedding cache first (by its key alone) and reads and
   encodes only the misses (THE frame sampling), each distinct video once, frames split over the SP
   group (MR-SP stage 1, `embeddings`): a step whose videos are all cached opens no video file;
2. draws G rollouts per question from those embeddings (`rollout`; the SP ranks share the samples);
3. grades them with `tasks.grading.answers` (format, accuracy, the configured weights; open-ended
   misses by the `judge:` section's LLM judge when set; a group the judge failed on is left out) and
   computes group advantages (Eq. 2); groups whose rewards are all equal are dropped (DAPO) unless
   `drop_zero_variance` is off;
4. prefills the old-policy (when `updates_per_step` > 1) and reference log-probs from the same
   embeddings, sequence-parallel (MR-SP stage 2, `prefill`);
5. runs `updates_per_step` optimizer steps of the clipped, KL-penalised objective (Eq. 1) through
   DeepSpeed, micro-batch by micro-batch, and syncs the rollout engine's weights.

The vision tower is frozen; the reference is a frozen copy of the initial model (the SFT model).
Every random draw is seeded by (seed, step, rank), so a run resumed from a checkpoint continues
exactly as the killed one would have. Checkpoints (`<out_dir>/_checkpoints/step-N/`: DeepSpeed's
module and optimizer state, the metrics so far, the trainer state written last) and the final model
(`<out_dir>/model/`) follow the SFT trainer's layout and helpers (`tasks.training.checkpoints`).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist

from data_schemas import GRPO_SAMPLES
from models.vlm import EncodedVideoBatch, HFVideoLM
from parallel.embedding_cache import (
    EmbeddingCache,
    encode_requests,
    vision_tower,
)
from parallel.launch import run_worker
from parallel.loss import count_sum
from parallel.sequence import IGNORE_INDEX
from parallel.topology import SPGroup, Topology
from tasks.config import GRPOConfig, JudgeConfig, TrackingConfig
from tasks.engine.store import LOCAL, stable_hash, write_json_atomic
from tasks.grading.answers import AnswerKey, Grade, grade, total_reward
from tasks.grading.judge import judge_all
from tasks.grpo import core_algos
from tasks.grpo.data import RLExample, video_requests
from tasks.grpo.prefill import (
    PolicyBatch,
    PolicyModule,
    pack_sequences,
    response_logprobs,
    scored_values,
)
from tasks.grpo.rollout import Rollout, RolloutEngine, make_rollout_engine
from tasks.training.loop import (
    StepTrainer,
    import_deepspeed,
    init_distributed,
    worker_main,
)
from tasks.training.schedule import TrainSchedule
from tasks.training.validation import ValidationExample

log = logging.getLogger("lvr.grpo.trainer")

ROLLOUT_METRICS = (
    "reward", "accuracy_reward", "format_reward", "response_length", "groups_kept", "encoder_calls", "videos_encoded",
    "cache_hits", "step_time_s", "lr", "judge_failures",
)
UPDATE_METRICS = ("loss", "kl", "clip_fraction", "grad_norm")  # absent for a step whose groups were all dropped


@dataclass(frozen=True)
class GRPOJob:
    """Everything the workers need, written by the stage as `job.json`.

    `model_path`: the initial policy and the frozen reference; `out_dir`: the stage folder
    (`model/`, `_checkpoints/`); `work_dir`: this run's private folder; `cache_dir`: the embedding
    cache (None: off); `judge`: the `judge:` section when it names a model (open-ended misses go to it);
    `tracking`: where rank 0 reports, and how often it keeps sampled rollouts; `validation`: the eval
    questions rank 0 scores the policy on when `tracking.validate_every` is set.
    """

    run_key: str
    model_path: str
    examples: tuple[RLExample, ...]
    config: GRPOConfig
    out_dir: str
    work_dir: str
    cache_dir: str | None = None
    judge: JudgeConfig | None = None
    model_revision: str | None = None  # of a hub model id in `model_path`
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    validation: tuple[ValidationExample, ...] = ()

    def save(self, path: Path) -> None:
        data = {
            **asdict(self), "config": self.config.model_dump(mode="json"), "tracking": self.tracking.model_dump(mode="json"),
            "judge": self.judge.model_dump(mode="json") if self.judge else None,
        }
        write_json_atomic(LOCAL, str(path), data)

    @classmethod
    def load(cls, path: Path) -> GRPOJob:
        data = json.loads(Path(path).read_text())
        return cls(
            run_key=data["run_key"], model_path=data["model_path"],
            examples=tuple(RLExample.from_dict(e) for e in data["examples"]), config=GRPOConfig.model_validate(data["config"]),
            out_dir=data["out_dir"], work_dir=data["work_dir"], cache_dir=data["cache_dir"],
            judge=JudgeConfig.model_validate(data["judge"]) if data["judge"] else None, model_revision=data["model_revision"],
            tracking=TrackingConfig.model_validate(data["tracking"]),
            validation=tuple(ValidationExample.from_dict(e) for e in data["validation"]),
        )


# ------------------------------------------------------------------------------------------------
# Rewards
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Scores:
    """(questions, G) tensors: weighted reward, accuracy and format of every rollout; `judged`
    (questions,): whether every verdict of the group is known (False when the judge failed on it)."""

    reward: torch.Tensor
    accuracy: torch.Tensor
    format: torch.Tensor
    judged: torch.Tensor


def score_rollouts(keys: Sequence[AnswerKey], rollouts: Sequence[Sequence[Rollout]], cfg: GRPOConfig, judge: JudgeConfig | None) -> Scores:
    """Grade every rollout with `tasks.grading.answers`; the judge (if any) decides open-ended misses."""
    grades: list[list[Grade]] = [[grade(r.text, key) for r in group] for key, group in zip(keys, rollouts)]
    known = [True] * len(keys)
    if judge is not None:
        for i, judged in enumerate(judge_all(judge, list(zip(keys, grades)))):
            if isinstance(judged, BaseException):
                # Exact match would call every differently worded right answer wrong: a group whose
                # verdicts are unknown takes no part in the update (counted in `judge_failures`).
                log.warning("judge failed on %r: %s; the group is left out of this step", keys[i].question[:80], judged)
                known[i] = False
            else:
                grades[i] = judged
    reward = [
        [total_reward(r.text, key, accuracy_weight=cfg.accuracy_weight, format_weight=cfg.format_weight, accuracy=float(g.correct))
         for r, g in zip(group, group_grades)]
        for key, group, group_grades in zip(keys, rollouts, grades)
    ]
    accuracy = [[float(g.correct) for g in group_grades] for group_grades in grades]
    formatted = [[float(g.format_ok) for g in group_grades] for group_grades in grades]
    return Scores(*(torch.tensor(values, dtype=torch.float32) for values in (reward, accuracy, formatted)), torch.tensor(known))


def sample_rows(
    step: int, examples: Sequence[RLExample], rollouts: list[list[Rollout]], scores: Scores, advantages: torch.Tensor, keep: torch.Tensor
) -> list[dict[str, Any]]:
    """GRPO_SAMPLES rows of one replica's step: every rollout with its rewards and advantage."""
    return [
        {
            "step": step + 1, "qa_id": example.qa_id, "sample": j, "prompt": example.prompt, "response": rollout.text,
            "reward": float(scores.reward[i, j]), "accuracy_reward": float(scores.accuracy[i, j]),
            "format_reward": float(scores.format[i, j]), "advantage": float(advantages[i, j]), "kept": bool(keep[i]),
        }
        for i, (example, group) in enumerate(zip(examples, rollouts))
        for j, rollout in enumerate(group)
    ]


# ------------------------------------------------------------------------------------------------
# The update
# ------------------------------------------------------------------------------------------------
class Updater(Protocol):
    """What the update needs of the optimizer side: a DeepSpeed engine around a `PolicyModule`
    (or, in tests, anything with the same three calls)."""

    def __call__(self, seqs: PolicyBatch) -> tuple[torch.Tensor, torch.Tensor]: ...

    def backward(self, loss: torch.Tensor, scale_wrt_gas: bool = ...) -> Any: ...

    def step(self) -> None: ...


@dataclass(frozen=True)
class UpdatePlan:
    """One replica's sequences for the update, cut into the micro-batches every rank runs.

    `micro` lists row indices per micro-batch; `scale[k]` is 0 for padding micro-batches (a
    replica with fewer micro-batches than the busiest one repeats its first, at zero weight,
    because every rank must join every collective). `n_tokens` / `n_sequences`: totals over all
    replicas, for the loss aggregation.
    """

    seqs: PolicyBatch
    advantages: torch.Tensor  # (rows,)
    micro: tuple[tuple[int, ...], ...]
    scale: tuple[float, ...]
    n_tokens: float
    n_sequences: float


def plan_update(seqs: PolicyBatch, advantages: torch.Tensor, row_scale: float, cfg: GRPOConfig, topo: Topology) -> UpdatePlan:
    """Micro-batches and batch totals (collectives: every rank calls this once per step)."""
    device = seqs.input_ids.device
    mask = seqs.targets() != IGNORE_INDEX
    mine = row_scale > 0 and topo.sp.rank == 0  # an SP group's rows count once
    local = torch.tensor([float(mask.sum()) if mine else 0.0, float(len(seqs)) if mine else 0.0], device=device)
    n_tokens, n_sequences = count_sum(local).tolist()
    micro = [tuple(range(i, min(i + cfg.micro_batch_size, len(seqs)))) for i in range(0, len(seqs), cfg.micro_batch_size)]
    count = torch.tensor(float(len(micro)), device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(count, op=dist.ReduceOp.MAX)
    scale = [row_scale] * len(micro) + [0.0] * (int(count) - len(micro))
    micro += [micro[0]] * (int(count) - len(micro))
    return UpdatePlan(seqs, advantages, tuple(micro), tuple(scale), n_tokens, n_sequences)


def prefill_all(forward: Callable[[PolicyBatch], tuple[torch.Tensor, torch.Tensor]], plan: UpdatePlan) -> list[torch.Tensor]:
    """Log-probs of every micro-batch without gradient (old policy, reference)."""
    with torch.no_grad():
        return [forward(plan.seqs.select(rows))[0] for rows in plan.micro]


def policy_update(
    updater: Updater, ref_model: torch.nn.Module | None, plan: UpdatePlan, cfg: GRPOConfig, topo: Topology
) -> dict[str, float]:
    """`updates_per_step` optimizer steps of Eq. 1 on the plan's rollouts; the step's loss, KL
    (token mean) and clip fraction over all ranks.

    Each rank back-propagates its own share of the loss (its slice's tokens, weighted for the
    whole batch); DeepSpeed averages gradients over ranks where the shares must be summed, hence
    the factor of world size (the convention of `parallel/`).
    """
    sp = topo.sp
    old = prefill_all(updater, plan) if cfg.updates_per_step > 1 else None
    ref = prefill_all(lambda seqs: response_logprobs(ref_model, seqs, sp), plan) if cfg.beta > 0 and ref_model is not None else None
    device = plan.seqs.input_ids.device
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # loss, kl, clipped tokens, tokens
    for _ in range(cfg.updates_per_step):
        for k, rows in enumerate(plan.micro):
            sub = plan.seqs.select(rows)
            logp, scored = updater(sub)
            mask = sub.targets() != IGNORE_INDEX
            weights = core_algos.token_weights(mask, cfg.loss_agg, n_tokens=plan.n_tokens, n_sequences=plan.n_sequences)
            advantages = plan.advantages[list(rows)].to(logp.device)[:, None].expand(mask.shape)
            terms = core_algos.grpo_token_loss(
                logp, old[k] if old is not None else logp.detach(), ref[k] if ref is not None else None,
                scored_values(advantages, sp, scored), beta=cfg.beta, eps_low=cfg.clip_eps_low, eps_high=cfg.clip_eps_high,
            )
            share = (scored_values(weights.to(logp.device), sp, scored) * terms.loss).sum() * plan.scale[k]
            updater.backward(share * topo.world_size, scale_wrt_gas=False)
            if plan.scale[k]:
                sums += torch.stack([share.detach().double(), terms.kl.detach().double().sum(), terms.clipped.double().sum(),
                                     torch.tensor(float(logp.numel()), dtype=torch.float64, device=device)])
        updater.step()
    total = count_sum(sums)
    tokens = max(float(total[3]), 1.0)
    return {"loss": float(total[0]) / cfg.updates_per_step, "kl": float(total[1]) / tokens, "clip_fraction": float(total[2]) / tokens}


# ------------------------------------------------------------------------------------------------
# The worker
# ------------------------------------------------------------------------------------------------
def deepspeed_config(cfg: GRPOConfig) -> dict[str, Any]:
    return {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        # A step's micro-batch count depends on how many groups survive: backward accumulates,
        # and step() (called once per update) reduces and applies.
        "managed_gradient_accumulation": False,
        "gradient_clipping": cfg.max_grad_norm,
        "zero_optimization": {"stage": cfg.zero_stage},
        "bf16": {"enabled": cfg.precision == "bf16"},
        "zero_allow_untested_optimizer": True,  # torch's AdamW: CPU and GPU alike
        "steps_per_print": 2**31 - 1,
    }


def build_engine(model: torch.nn.Module, cfg: GRPOConfig, sp: SPGroup):
    """The policy (vision tower frozen) inside a DeepSpeed engine with AdamW at a constant rate."""
    deepspeed = import_deepspeed()
    for p in vision_tower(model).parameters():
        p.requires_grad_(False)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    module = PolicyModule(model, sp)
    trainable = [p for p in module.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=cfg.learning_rate, weight_decay=cfg.weight_decay, fused=torch.cuda.is_available())
    engine, _, _, _ = deepspeed.initialize(model=module, optimizer=optimizer, config=deepspeed_config(cfg))
    return engine


def rollout_seed(seed: int, step: int, topo: Topology) -> int:
    return int(stable_hash({"seed": seed, "step": step, "dp": topo.dp_rank, "sp": topo.sp.rank}), 16) % (2**31)


def samples_on_rank(group_size: int, sp: SPGroup) -> int:
    """The SP ranks share each question's G rollouts (rank r draws its part; all-gathered after)."""
    return group_size // sp.size + (1 if sp.rank < group_size % sp.size else 0)


class Trainer(StepTrainer):
    """One rank's GRPO run of a `GRPOJob`."""

    stage = "grpo"
    samples_schema = GRPO_SAMPLES

    def __init__(self, job: GRPOJob):
        self.job = job
        self.cfg = cfg = job.config
        self.topo, self.device = init_distributed(cfg.sp_degree)
        self.policy = HFVideoLM(job.model_path, device=str(self.device), dtype=cfg.precision, revision=job.model_revision)
        self.tokenizer = self.policy.tokenizer
        self.preprocess = self.policy.preprocess
        self.ref = None
        if cfg.beta > 0:
            self.ref = HFVideoLM(job.model_path, device=str(self.device), dtype=cfg.precision, revision=job.model_revision).model
            self.ref.requires_grad_(False)
        self.engine = build_engine(self.policy.model, cfg, self.topo.sp)
        self.engine.train()  # gradient checkpointing acts in training mode only; rollouts switch to eval and back
        self.rollouts: RolloutEngine = make_rollout_engine(
            cfg, self.policy.model, self.policy.tokenizer, job.model_path, cfg.seed, revision=job.model_revision
        )
        self.cache = EmbeddingCache(job.cache_dir, self.policy.model, self.policy.preprocess) if job.cache_dir else None
        self.schedule = TrainSchedule(
            n_examples=len(job.examples), micro_batch_size=cfg.prompts_per_step, grad_accum=1, dp_size=self.topo.dp_size,
            total_steps=cfg.steps, warmup_steps=0, seed=cfg.seed,
        )
        super().__init__()

    @property
    def total_steps(self) -> int:
        return self.cfg.steps

    def describe(self) -> str:
        return (
            f"GRPO: {self.cfg.steps} steps on {len(self.job.examples)} questions, G={self.cfg.group_size}, "
            f"{self.cfg.prompts_per_step} questions per step and replica; world {self.topo.world_size} = {self.topo.dp_size} "
            f"data-parallel x {self.topo.sp.size} sequence-parallel; rollouts: {self.cfg.rollout_engine}; "
            f"embedding cache: {self.job.cache_dir or 'off'}"
        )

    def trained_model(self) -> torch.nn.Module:
        return self.policy.model  # ZeRO <= 2 (the GRPO config's limit) keeps full weights on every rank

    def restore_extra(self, folder: Path) -> None:
        self.rollouts.sync_weights(self.policy.model)  # the rollout engine samples from the restored policy

    # --- one step ------------------------------------------------------------------------------
    def step_examples(self, step: int) -> list[RLExample]:
        (indices,) = self.schedule.micro_batches(step, self.topo.dp_rank)
        examples = [self.job.examples[i] for i in indices]
        if self.cfg.shuffle_options:
            examples = [e.with_options_shuffled([self.cfg.seed, step]) for e in examples]
        return examples

    def encode(self, examples: Sequence[RLExample]) -> tuple[EncodedVideoBatch, dict[str, float]]:
        requests = video_requests(examples, self.cfg)
        calls = self.policy.encoder_calls
        batch, stats = encode_requests(
            self.policy.model, self.policy.tokenizer, self.policy.preprocess, requests, self.topo.sp, self.cache, budget=self.cfg.video_budget()
        )
        return batch, {"encoder_calls": self.policy.encoder_calls - calls, "videos_encoded": stats.encoded, "cache_hits": stats.cache_hits}

    def sample(self, batch: EncodedVideoBatch, examples: Sequence[RLExample], step: int) -> list[list[Rollout]]:
        sp = self.topo.sp
        n = samples_on_rank(self.cfg.group_size, sp)
        mine = self.rollouts.generate(batch, [e.messages() for e in examples], n, rollout_seed(self.cfg.seed, step, self.topo)) if n else [[] for _ in examples]
        if sp.size == 1:
            return mine
        parts: list[Any] = [None] * sp.size
        dist.all_gather_object(parts, mine, group=sp.group)
        return [[r for part in parts for r in part[i]] for i in range(len(examples))]

    def score(self, examples: Sequence[RLExample], rollouts: list[list[Rollout]]) -> Scores:
        """Grades on the SP group's first rank (a judge is asked once), shared with the others."""
        sp = self.topo.sp
        scores = [score_rollouts([e.answer_key() for e in examples], rollouts, self.cfg, self.job.judge) if sp.rank == 0 else None]
        if sp.size > 1:
            dist.broadcast_object_list(scores, src=self.topo.rank - sp.rank, group=sp.group)
        return scores[0]

    def train_step(self, step: int) -> None:
        started = time.perf_counter()
        cfg, topo = self.cfg, self.topo
        examples = self.step_examples(step)
        batch, encode_stats = self.encode(examples)
        rollouts = self.sample(batch, examples, step)
        scores = self.score(examples, rollouts)
        advantages = core_algos.group_advantages(scores.reward, cfg.adv_eps)
        keep = ~core_algos.zero_variance(scores.reward) if cfg.drop_zero_variance else torch.ones(len(examples), dtype=torch.bool)
        keep &= scores.judged
        # A replica left without groups still joins the collectives, on its groups at zero weight.
        groups = [i for i in range(len(examples)) if keep[i]] or list(range(len(examples)))
        row_scale = 1.0 if bool(keep.any()) else 0.0
        rows = [(i, j) for i in groups for j in range(cfg.group_size)]
        seqs = pack_sequences(batch, [i for i, _ in rows], [rollouts[i][j].token_ids for i, j in rows], self.policy.tokenizer.pad_token_id)
        plan = plan_update(seqs, advantages[[i for i, _ in rows], [j for _, j in rows]], row_scale, cfg, topo)

        lengths = [len(r.token_ids) for group in rollouts for r in group]
        mine = 1.0 if topo.sp.rank == 0 else 0.0  # an SP group's numbers count once
        sums = count_sum(mine * torch.tensor([
            float(scores.reward.sum()), float(scores.accuracy.sum()), float(scores.format.sum()), float(sum(lengths)),
            float(len(lengths)), float(keep.sum()), float(len(examples)), encode_stats["videos_encoded"], encode_stats["cache_hits"],
            float((~scores.judged).sum()),
        ], dtype=torch.float64, device=self.device))
        calls = count_sum(torch.tensor(float(encode_stats["encoder_calls"]), device=self.device))
        values = {
            "reward": float(sums[0] / sums[4]), "accuracy_reward": float(sums[1] / sums[4]), "format_reward": float(sums[2] / sums[4]),
            "response_length": float(sums[3] / sums[4]), "groups_kept": float(sums[5] / sums[6]), "encoder_calls": float(calls),
            "videos_encoded": float(sums[7]), "cache_hits": float(sums[8]), "judge_failures": float(sums[9]),
        }
        if plan.n_sequences > 0:
            values.update(policy_update(self.engine, self.ref, plan, cfg, topo))
            grad_norm = self.engine.get_global_grad_norm()
            values["grad_norm"] = float(grad_norm) if grad_norm is not None else float("nan")
            self.rollouts.sync_weights(self.policy.model)
        seconds = time.perf_counter() - started
        values["step_time_s"] = seconds
        values["lr"] = float(self.engine.get_lr()[0])
        self.elapsed_s += seconds
        self.record(step, values, ROLLOUT_METRICS + UPDATE_METRICS)
        every = self.job.tracking.samples_every
        if self.is_main and every and (step + 1) % every == 0:
            self.record_samples(step, sample_rows(step, examples, rollouts, scores, advantages, keep))
        if self.is_main:
            self.log.info(
                "step %d/%d reward %.3f accuracy %.3f format %.3f kept %.2f len %.1f kl %.4f clip %.3f encoder calls %d (%.1fs)",
                step + 1, cfg.steps, values["reward"], values["accuracy_reward"], values["format_reward"], values["groups_kept"],
                values["response_length"], values.get("kl", 0.0), values.get("clip_fraction", 0.0), values["encoder_calls"], seconds,
            )



def main() -> None:
    worker_main(lambda job_file: Trainer(GRPOJob.load(job_file)), "tasks.grpo.trainer")


if __name__ == "__main__":
    run_worker(main)
