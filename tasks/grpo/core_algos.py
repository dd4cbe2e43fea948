"""GRPO's math as pure tensor functions: no model, no data, no distributed state.

Notation of the paper (LongVILA-R1 Eq. 1 and 2, after DeepSeekMath's GRPO). For one question,
G responses o_1..o_G drawn from the old policy get rewards r_1..r_G; then

    A_i = (r_i - mean(r)) / (std(r) + eps)                                                (Eq. 2)

    J = agg_{i,t} [ min(rho_it A_i, clip(rho_it, 1 - eps_low, 1 + eps_high) A_i) - beta KL_it ]   (Eq. 1)

    rho_it = pi(o_it | q, o_i<t) / pi_old(o_it | q, o_i<t)
    KL_it  = exp(ref_it - logp_it) - (ref_it - logp_it) - 1        (the k3 estimator of KL(pi || pi_ref))

and the loss minimised is -J. `std` is the sample standard deviation (Bessel-corrected, as in
DeepSeekMath's, verl's and TRL's implementations). A group whose rewards are all equal carries no
signal: its advantages are exactly 0 for any eps, including eps = 0.

Aggregation `agg` over response tokens (`LossAgg`):
- `token_mean`: every response token of the batch weighs the same (DAPO; longer answers count more);
- `seq_mean`: the mean over each response's tokens, then the mean over responses (Eq. 1 as written).

Both are written as per-token weights (`token_weights`), so a loss spread over micro-batches and
sequence-parallel ranks is the plain sum of each piece's weighted tokens, given the totals of the
whole batch: what every distributed reduction here relies on.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

LossAgg = Literal["token_mean", "seq_mean"]


def group_advantages(rewards: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Eq. 2 per group: rewards (groups, G) -> advantages (groups, G); 0 where a group's std is 0."""
    if rewards.dim() != 2 or rewards.shape[1] < 2:
        raise ValueError(f"rewards must be (groups, G) with G >= 2, got shape {tuple(rewards.shape)}")
    centred = rewards - rewards.mean(dim=1, keepdim=True)
    std = rewards.std(dim=1, keepdim=True)
    return torch.where(std > 0, centred / (std + eps), torch.zeros_like(centred))


def zero_variance(rewards: torch.Tensor) -> torch.Tensor:
    """(groups,) bool: the groups whose G rewards are all equal (DAPO drops them)."""
    return rewards.amax(dim=1) == rewards.amin(dim=1)


def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimate of KL(pi || pi_ref): exp(d) - d - 1 with d = ref - logp (>= 0, unbiased)."""
    d = ref_logp - logp
    return torch.exp(d) - d - 1


def clipped_surrogate(
    logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, eps_low: float, eps_high: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token -min(rho A, clip(rho, 1 - eps_low, 1 + eps_high) A), and where the clipped term
    is the smaller one (the token's gradient is cut: the clip fraction counts these)."""
    ratio = torch.exp(logp - old_logp)
    unclipped = ratio * advantages
    clipped = torch.clamp(ratio, 1.0 - eps_low, 1.0 + eps_high) * advantages
    return -torch.minimum(unclipped, clipped), clipped < unclipped


@dataclass(frozen=True)
class TokenLoss:
    """Per-token terms of the GRPO loss (all of the shape of `logp`)."""

    loss: torch.Tensor  # surrogate + beta * kl: what is weighted and summed
    kl: torch.Tensor
    clipped: torch.Tensor  # bool


def grpo_token_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    ref_logp: torch.Tensor | None,
    advantages: torch.Tensor,
    *,
    beta: float,
    eps_low: float,
    eps_high: float,
) -> TokenLoss:
    """-(Eq. 1's integrand) per token. `ref_logp` None means no reference (beta must then be 0)."""
    surrogate, clipped = clipped_surrogate(logp, old_logp, advantages, eps_low, eps_high)
    if ref_logp is None:
        if beta:
            raise ValueError("beta > 0 needs the reference log-probs")
        kl = torch.zeros_like(logp)
    else:
        kl = k3_kl(logp, ref_logp)
    return TokenLoss(surrogate + beta * kl, kl, clipped)


def token_weights(
    mask: torch.Tensor, agg: LossAgg, *, n_tokens: float | None = None, n_sequences: float | None = None
) -> torch.Tensor:
    """Weights w (shape of `mask`, (sequences, positions)) such that sum(w * x) is `agg` of the
    per-token values x over the masked tokens.

    `n_tokens` / `n_sequences`: the batch totals when `mask` is only part of it (a micro-batch,
    one data-parallel replica's share); by default the totals of `mask` itself. A sequence's own
    token count always comes from its row, so rows must be whole responses.
    """
    m = mask.to(torch.float32)
    if agg == "token_mean":
        total = float(m.sum()) if n_tokens is None else float(n_tokens)
        return m / max(total, 1.0)
    if agg == "seq_mean":
        lengths = m.sum(dim=-1, keepdim=True).clamp(min=1.0)
        sequences = float((m.sum(dim=-1) > 0).sum()) if n_sequences is None else float(n_sequences)
        return m / lengths / max(sequences, 1.0)
    raise ValueError(f"unknown aggregation {agg!r}; use token_mean or seq_mean")


def aggregate(values: torch.Tensor, mask: torch.Tensor, agg: LossAgg) -> torch.Tensor:
    """`agg` of per-token `values` over the tokens of `mask` (one whole batch)."""
    return (values * token_weights(mask, agg)).sum()
