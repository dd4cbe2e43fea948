"""GRPO's math (tasks/grpo/core_algos.py) against values worked out by hand from Eq. 1 and Eq. 2."""

from __future__ import annotations

import math

import pytest
import torch

from tasks.grpo.core_algos import (
    aggregate,
    clipped_surrogate,
    group_advantages,
    grpo_token_loss,
    k3_kl,
    token_weights,
    zero_variance,
)


def close(actual: torch.Tensor, expected: list, tol: float = 1e-5) -> bool:
    return torch.allclose(actual, torch.tensor(expected, dtype=actual.dtype), atol=tol, rtol=0)


def test_eq2_group_advantages_by_hand():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.9, 0.1, 0.1, 0.1], [1.0, 1.0, 1.0, 1.0]])
    # Group 1: mean 0.5, sample std sqrt(4 * 0.25 / 3) = 0.577350 -> +-0.5 / 0.577350 = +-0.866025.
    # Group 2: mean 0.3, deviations (0.6, -0.2, -0.2, -0.2), sample std sqrt(0.48 / 3) = 0.4 -> (1.5, -0.5, -0.5, -0.5).
    # Group 3: all equal: std 0, advantage 0.
    adv = group_advantages(rewards, eps=0.0)
    assert close(adv[0], [0.866025, -0.866025, -0.866025, 0.866025])
    assert close(adv[1], [1.5, -0.5, -0.5, -0.5])
    assert close(adv[2], [0.0, 0.0, 0.0, 0.0])
    # eps enters the denominator: 0.5 / (0.577350 + 0.1) = 0.738173; std 0 still gives exactly 0 (no NaN with eps 0).
    with_eps = group_advantages(rewards, eps=0.1)
    assert close(with_eps[0], [0.738173, -0.738173, -0.738173, 0.738173])
    assert torch.equal(with_eps[2], torch.zeros(4)) and not torch.isnan(adv).any()
    assert zero_variance(rewards).tolist() == [False, False, True]
    with pytest.raises(ValueError, match=r"rewards must be \(groups, G\) with G >= 2, got shape \(2,\)"):
        group_advantages(torch.tensor([1.0, 0.0]))


def test_eq1_clipped_surrogate_by_hand():
    old = torch.log(torch.tensor([0.4, 0.4, 0.4, 0.4]))
    # ratios 1.25, 1.5, 0.5, 0.5 with advantages +1, +1, -1, +1; clip range [0.8, 1.28].
    logp = torch.log(torch.tensor([0.5, 0.6, 0.2, 0.2]))
    adv = torch.tensor([1.0, 1.0, -1.0, 1.0])
    loss, clipped = clipped_surrogate(logp, old, adv, eps_low=0.2, eps_high=0.28)
    # 1.25 is inside: -1.25. 1.5 clipped to 1.28: -1.28. 0.5 * -1 = -0.5 vs 0.8 * -1 = -0.8: min -0.8, loss 0.8.
    # 0.5 * +1 = 0.5 vs 0.8: min 0.5 (unclipped), loss -0.5.
    assert close(loss, [-1.25, -1.28, 0.8, -0.5])
    assert clipped.tolist() == [False, True, True, False]


def test_eq1_k3_kl_and_total_by_hand():
    logp = torch.log(torch.tensor([0.5, 0.5]))
    ref = torch.log(torch.tensor([0.25, 0.5]))
    # d = log(0.25 / 0.5) = -0.693147: exp(d) - d - 1 = 0.5 + 0.693147 - 1 = 0.193147; equal policies: 0.
    assert close(k3_kl(logp, ref), [0.193147, 0.0])
    terms = grpo_token_loss(logp, logp.detach(), ref, torch.tensor([2.0, -1.0]), beta=0.04, eps_low=0.2, eps_high=0.28)
    # On-policy ratio 1: surrogate -A; plus beta * k3.
    assert close(terms.loss, [-2.0 + 0.04 * 0.193147, 1.0])
    assert not terms.clipped.any()
    with pytest.raises(ValueError, match="reference"):
        grpo_token_loss(logp, logp, None, torch.ones(2), beta=0.1, eps_low=0.2, eps_high=0.2)


def test_on_policy_gradient_is_minus_advantage_times_score():
    """At ratio 1 the surrogate's gradient w.r.t. logp is -A (the policy-gradient estimator)."""
    logp = torch.log(torch.tensor([0.3, 0.7])).requires_grad_()
    adv = torch.tensor([0.5, -2.0])
    loss, _ = clipped_surrogate(logp, logp.detach(), adv, 0.2, 0.28)
    loss.sum().backward()
    assert close(logp.grad, [-0.5, 2.0])


def test_token_and_sequence_mean_by_hand():
    values = torch.tensor([[1.0, 2.0, 3.0, 99.0], [10.0, 99.0, 99.0, 99.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]], dtype=torch.bool)
    assert math.isclose(float(aggregate(values, mask, "token_mean")), (1 + 2 + 3 + 10) / 4)
    assert math.isclose(float(aggregate(values, mask, "seq_mean")), ((1 + 2 + 3) / 3 + 10) / 2)
    # Pieces of a batch (micro-batches, replicas) weighted with the batch totals add up to the whole.
    for agg in ("token_mean", "seq_mean"):
        parts = sum(
            float((values[i : i + 1] * token_weights(mask[i : i + 1], agg, n_tokens=4, n_sequences=2)).sum()) for i in range(2)
        )
        assert math.isclose(parts, float(aggregate(values, mask, agg)))
    with pytest.raises(ValueError, match="aggregation"):
        token_weights(mask, "mean")  # type: ignore[arg-type]
