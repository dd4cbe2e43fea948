"""Which examples each optimizer step sees, and the learning-rate schedule: pure functions of the
step number, so a resumed run continues exactly where the killed one stopped."""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from tasks.config import SFTConfig


@lru_cache(maxsize=4)
def _epoch_order(n: int, seed: int, epoch: int) -> tuple[int, ...]:
    return tuple(int(i) for i in np.random.default_rng([seed, epoch]).permutation(n))


@dataclass(frozen=True)
class TrainSchedule:
    """Examples are read as one stream, epoch after epoch, each epoch a fresh seeded permutation.
    Optimizer step s takes `grad_accum` micro-batches for each of `dp_size` replicas from it."""

    n_examples: int
    micro_batch_size: int
    grad_accum: int
    dp_size: int
    total_steps: int
    warmup_steps: int
    seed: int

    @classmethod
    def plan(cls, n_examples: int, cfg: SFTConfig, dp_size: int) -> TrainSchedule:
        if n_examples < 1:
            raise ValueError("no training examples")
        per_step = cfg.micro_batch_size * cfg.grad_accum * dp_size
        total = cfg.max_steps or cfg.epochs * -(-n_examples // per_step)
        warmup = min(total, math.ceil(cfg.warmup_ratio * total))
        return cls(n_examples, cfg.micro_batch_size, cfg.grad_accum, dp_size, total, warmup, cfg.seed)

    def micro_batches(self, step: int, dp_rank: int) -> list[list[int]]:
        """Example indices of each micro-batch replica `dp_rank` runs at optimizer step `step` (0-based)."""
        batches = []
        for micro in range(self.grad_accum):
            k = (step * self.grad_accum + micro) * self.dp_size + dp_rank
            start = k * self.micro_batch_size
            positions = range(start, start + self.micro_batch_size)
            batches.append([_epoch_order(self.n_examples, self.seed, j // self.n_examples)[j % self.n_examples] for j in positions])
        return batches

    def lr_factor(self, step: int) -> float:
        """Multiplier of the base learning rate at optimizer step `step` (0-based): linear warmup
        from 1/warmup to 1, then cosine decay towards 0 at `total_steps`."""
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        decay_steps = max(1, self.total_steps - self.warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * (step - self.warmup_steps) / decay_steps))
