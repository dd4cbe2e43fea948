"""Ulysses attention and the sequence helpers against plain single-process computations.

The distributed checks run on 2 gloo processes (`parallel.local.run_local`); the reference is
written out longhand (softmax(QK^T) V with an explicit causal mask), not with the code under test.
"""

from __future__ import annotations

import pytest
import torch

from parallel.sequence import pad_to_multiple, plan_vision_shards, shard, shift_labels
from parallel.topology import SPGroup, sp_layout
from parallel.topology import kv_repeat_factor
from parallel.ulysses import ulysses_attention

SP = 2
# (batch, query heads, kv heads, length, head dim, left padding of row 1)
CASES = [
    (2, 4, 2, 13, 8, 0),  # GQA with a length that does not divide over the ranks
    (2, 4, 1, 16, 8, 0),  # fewer KV heads than ranks: KV heads repeated before the all-to-all
    (1, 4, 4, 10, 8, 0),  # plain multi-head attention
    (2, 4, 2, 11, 8, 3),  # left padding: the key padding mask path
]


def reference_attention(q, k, v, key_mask):
    """(B, H, L, D) causal attention, GQA by repetition, `key_mask` (B, L) True for real tokens."""
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    length = q.shape[2]
    scores = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    allowed = torch.ones(length, length, dtype=torch.bool).tril() & key_mask[:, None, None, :]
    allowed |= torch.eye(length, dtype=torch.bool)
    scores = scores.masked_fill(~allowed, float("-inf"))
    return (scores.softmax(-1) @ v).transpose(1, 2)  # (B, L, H, D)


def case_tensors(case):
    b, h, hkv, length, d, left = case
    g = torch.Generator().manual_seed(hash(case) % 2**31)
    q, k, v = (torch.randn(b, n, length, d, generator=g) for n in (h, hkv, hkv))
    weight = torch.randn(b, length, h, d, generator=g)  # the loss is <output, weight>
    key_mask = torch.ones(b, length, dtype=torch.bool)
    key_mask[-1, :left] = False
    weight[~key_mask] = 0  # padded queries never reach the loss
    return q, k, v, weight, key_mask


def _ulysses_rank(cases):
    """On each of the SP ranks: attention over this rank's slice, then the gradient of the loss."""
    import torch.distributed as dist

    from parallel.topology import init_topology

    sp = init_topology(SP).sp
    assert sp == SPGroup(sp.group, dist.get_rank(), SP)
    results = []
    for case in cases:
        q, k, v, weight, key_mask = case_tensors(case)
        left = case[5]
        local = [shard(t, sp, dim=2).clone().requires_grad_() for t in (q, k, v)]
        padding = pad_to_multiple(key_mask, SP, dim=1, value=False) if left else None
        out, _ = ulysses_attention(torch.nn.Module(), *local, None, scaling=q.shape[-1] ** -0.5, sp_group=sp, sp_key_padding_mask=padding)
        (out * shard(weight, sp, dim=1)).sum().backward()
        results.append({"out": out.detach(), "grads": [t.grad for t in local]})
    return results


def test_ulysses_attention_matches_single_process_forward_and_backward():
    from parallel.local import run_local

    per_rank = run_local(_ulysses_rank, SP, CASES)
    for i, case in enumerate(CASES):
        q, k, v, weight, key_mask = case_tensors(case)
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        expected = reference_attention(*leaves, key_mask)
        (expected * weight).sum().backward()
        length = case[3]
        out = torch.cat([r[i]["out"] for r in per_rank], dim=1)[:, :length]
        real = key_mask[:, :, None, None]
        assert (out - expected).mul(real).abs().max() < 1e-5, case
        for j, leaf in enumerate(leaves):
            grad = torch.cat([r[i]["grads"][j] for r in per_rank], dim=2)[:, :, :length]
            assert (grad - leaf.grad).abs().max() < 1e-5, (case, "qkv"[j])


def test_single_rank_ulysses_is_causal_attention():
    q, k, v, weight, key_mask = case_tensors(CASES[0])
    out, _ = ulysses_attention(torch.nn.Module(), q, k, v, None, scaling=q.shape[-1] ** -0.5)
    assert (out - reference_attention(q, k, v, key_mask)).abs().max() < 1e-5


def test_ulysses_refuses_kv_cache_and_per_shard_masks():
    q = torch.zeros(1, 4, 3, 8)
    with pytest.raises(ValueError, match="KV cache"):
        ulysses_attention(torch.nn.Module(), q, torch.zeros(1, 2, 5, 8), torch.zeros(1, 2, 5, 8), None)
    with pytest.raises(ValueError, match="sp_key_padding_mask"):
        ulysses_attention(torch.nn.Module(), q, q, q, torch.zeros(1, 1, 3, 3))


@pytest.mark.parametrize(
    ("heads", "kv_heads", "sp", "repeat"),
    [(4, 2, 2, 1), (4, 1, 2, 2), (4, 2, 4, 2), (28, 4, 4, 1), (28, 4, 2, 1), (28, 4, 7, 7), (32, 8, 16, 2), (12, 2, 3, 3)],
)
def test_kv_repeat_factor(heads, kv_heads, sp, repeat):
    assert kv_repeat_factor(heads, kv_heads, sp) == repeat
    kv = kv_heads * repeat
    assert kv % sp == 0 and heads % kv == 0


def test_kv_repeat_factor_rejects_heads_that_do_not_split():
    with pytest.raises(ValueError, match="pick an SP degree that divides 28"):
        kv_repeat_factor(28, 4, 8)


def test_padding_slicing_and_label_shift():
    x = torch.arange(2 * 7).view(2, 7)
    shards = [shard(x, SPGroup(object(), r, 3), dim=1, pad_value=-1) for r in range(3)]
    assert [s.shape[1] for s in shards] == [3, 3, 3]
    assert torch.equal(torch.cat(shards, dim=1), torch.cat([x, torch.full((2, 2), -1)], dim=1))
    labels = torch.tensor([[5, 6, 7, -100]])
    assert shift_labels(labels).tolist() == [[6, 7, -100, -100]]
    assert sp_layout(4, 2) == [[0, 1], [2, 3]]
    with pytest.raises(ValueError, match="must divide"):
        sp_layout(6, 4)


def test_vision_shards_cover_every_frame_once_and_balance():
    grid = torch.tensor([[4, 8, 12], [3, 8, 12], [1, 4, 4]])  # 8 temporal patches in 3 videos
    shards = plan_vision_shards(grid, merge_size=2, sp_size=3)
    assert shards[0].patches.start == 0 and shards[-1].patches.stop == int(grid.prod(-1).sum())
    assert all(a.patches.stop == b.patches.start for a, b in zip(shards, shards[1:]))
    rows = torch.cat([s.grid_thw for s in shards])
    assert int(rows.prod(-1).sum()) == int(grid.prod(-1).sum()) and {tuple(r[1:]) for r in rows.tolist()} <= {(8, 12), (4, 4)}
    assert sum(s.n_tokens for s in shards) == int(grid.prod(-1).sum()) // 4
    loads = [s.patches.stop - s.patches.start for s in shards]
    assert max(loads) - min(loads) <= 96 + 16  # within one temporal patch of even
    with pytest.raises(ValueError, match="cannot be shared"):
        plan_vision_shards(torch.tensor([[1, 8, 8]]), merge_size=2, sp_size=2)
