"""Per-token losses on one rank's sequence slice, and token counts over ranks.

The token-weighted mean of a per-token loss over everything one optimizer step sees (all micro
batches, all SP slices, all data-parallel replicas) is computed without gathering logits:

    tokens = count_sum(<scored tokens this rank owns>)        # once per step, before any forward
    share  = cross_entropy_sum(shard.logits, shard.targets)[0] / tokens

Every rank back-propagates its own `share`; the shares of all ranks and micro-batches add up to
the mean, so (see `parallel/__init__.py`) the parameter gradients summed over ranks are exactly
the mean's gradient. The same recipe serves GRPO with `token_logprobs` in place of the loss.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from parallel.sequence import IGNORE_INDEX


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """log p(target) per position, in fp32; 0 where the target is `ignore_index`.

    logits (..., V) and targets (...) belong to one rank's slice, targets already shifted
    (`parallel.sequence.shift_labels` before slicing), so nothing crosses slice boundaries here.
    """
    valid = targets != ignore_index
    picked = torch.where(valid, targets, torch.zeros_like(targets))
    logp = torch.log_softmax(logits.float(), dim=-1).gather(-1, picked.unsqueeze(-1)).squeeze(-1)
    return logp * valid


def cross_entropy_sum(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of token cross-entropies in fp32, number of scored tokens) on this rank's slice."""
    total = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=ignore_index, reduction="sum")
    return total, (targets != ignore_index).sum()


def count_sum(values: torch.Tensor, group=None) -> torch.Tensor:
    """All-reduced (summed) copy of `values` over `group` (default: every rank), without gradient:
    token counts and logged statistics. A single process returns them unchanged."""
    out = values.detach().clone().double()
    if dist.is_initialized() and dist.get_world_size(group) > 1:
        dist.all_reduce(out, group=group)
    return out
