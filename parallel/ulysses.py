"""DeepSpeed-Ulysses attention over `torch.distributed`.

Each rank of an SP group holds a contiguous slice of the sequence for all heads. One all-to-all
trades that for the whole sequence on `1/SP` of the heads; attention then runs over the full
sequence locally (exact, any kernel), and a second all-to-all returns the output to sequence
slices. Communication per layer is O(sequence x hidden / SP) per rank, independent of the number
of ranks, and the attention kernel never sees a partial sequence.

Rotary embeddings are applied by the model *before* attention, on each rank's slice with the
positions of that slice (computed on the full sequence, then sliced: see `models/qwen_sp.py`), so
the tokens arrive here already position-encoded.

`ulysses_attention` has the signature of transformers' attention functions; registered as
`"lvr_ulysses"` it replaces the text attention of any model that dispatches through
`ALL_ATTENTION_FUNCTIONS`. It needs two keyword arguments, passed through the model's forward:
`sp_group` (an `SPGroup`; absent means a single rank) and optionally `sp_key_padding_mask`.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from parallel.topology import SPGroup, kv_repeat_factor

ULYSSES_ATTENTION = "lvr_ulysses"


class _AllToAll(torch.autograd.Function):
    """Split `x` along `scatter_dim` into one chunk per rank, send chunk j to rank j, concatenate
    what arrives along `gather_dim` in rank order. Its adjoint is the same exchange reversed."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group, scatter_dim: int, gather_dim: int) -> torch.Tensor:  # type: ignore[override]
        ctx.group, ctx.scatter_dim, ctx.gather_dim = group, scatter_dim, gather_dim
        return _exchange(x, group, scatter_dim, gather_dim)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        return _exchange(grad, ctx.group, ctx.gather_dim, ctx.scatter_dim), None, None, None


def _exchange(x: torch.Tensor, group, scatter_dim: int, gather_dim: int) -> torch.Tensor:
    size = dist.get_world_size(group)
    if x.shape[scatter_dim] % size:
        raise ValueError(f"all-to-all: dimension {scatter_dim} of size {x.shape[scatter_dim]} does not split over {size} ranks")
    send = torch.stack(x.chunk(size, dim=scatter_dim)).contiguous()
    received = torch.empty_like(send)
    dist.all_to_all_single(received, send, group=group)
    return torch.cat(received.unbind(0), dim=gather_dim)


def all_to_all(x: torch.Tensor, sp: SPGroup, scatter_dim: int, gather_dim: int) -> torch.Tensor:
    """Autograd-correct all-to-all inside the SP group (identity for a single rank)."""
    if sp.size == 1:
        return x
    return _AllToAll.apply(x, sp.group, scatter_dim, gather_dim)


def causal_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    scaling: float | None = None,
    dropout: float = 0.0,
    key_padding_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal attention of (B, Hq, L, D) queries over (B, Hkv, L, D) keys/values (Hkv divides Hq).

    Without `key_padding_mask` padding must sit at the end of each row (right padding), where
    causality alone keeps it away from real tokens. With a (B, L) bool mask (True = real token)
    padded keys are masked too; each position may always attend to itself, so a padded query's
    row is never empty (its output is garbage, never NaN, and is never used).
    """
    n_rep = query.shape[1] // key.shape[1]
    if n_rep > 1:
        key = key.repeat_interleave(n_rep, dim=1)
        value = value.repeat_interleave(n_rep, dim=1)
    if key_padding_mask is None:
        return F.scaled_dot_product_attention(query, key, value, dropout_p=dropout, is_causal=True, scale=scaling)
    length = query.shape[2]
    causal = torch.ones(length, length, dtype=torch.bool, device=query.device).tril()
    allowed = causal & key_padding_mask.to(torch.bool)[:, None, None, :]
    allowed = allowed | torch.eye(length, dtype=torch.bool, device=query.device)
    return F.scaled_dot_product_attention(query, key, value, attn_mask=allowed, dropout_p=dropout, scale=scaling)


def ulysses_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    *,
    sp_group: SPGroup | None = None,
    sp_key_padding_mask: torch.Tensor | None = None,
    **_: object,
) -> tuple[torch.Tensor, None]:
    """Sequence-parallel causal self-attention (transformers' attention-function signature).

    query (B, Hq, L/SP, D), key/value (B, Hkv, L/SP, D): this rank's slice of the sequence, every
    rank's slice of equal length (pad first: `parallel.sequence.pad_to_multiple`). Returns
    (B, L/SP, Hq, D), this rank's slice of the output. `sp_key_padding_mask`: (B, L) bool over
    the full padded sequence, only needed when padding is not at the end of each row.
    """
    if attention_mask is not None:
        raise ValueError(
            f"{ULYSSES_ATTENTION} attention takes padding as `sp_key_padding_mask` over the full sequence, not a "
            "per-shard attention mask"
        )
    if query.shape[2] != key.shape[2]:
        raise ValueError(
            f"{ULYSSES_ATTENTION} attention is for full-sequence passes (training, prefill) without a KV cache: "
            f"got {query.shape[2]} queries for {key.shape[2]} keys"
        )
    sp = sp_group or SPGroup.single()
    num_heads, num_kv_heads = query.shape[1], key.shape[1]
    repeat = kv_repeat_factor(num_heads, num_kv_heads, sp.size)
    if repeat > 1:
        key = key.repeat_interleave(repeat, dim=1)
        value = value.repeat_interleave(repeat, dim=1)
    drop = dropout if module.training else 0.0
    if sp.size == 1:
        out = causal_attention(query, key, value, scaling, drop, sp_key_padding_mask)
        return out.transpose(1, 2), None
    # One all-to-all for q, k and v together: (B, SP, heads/SP, L/SP, D) per tensor, concatenated
    # over heads, scattered over the SP axis and gathered over the sequence axis.
    q_local, kv_local = num_heads // sp.size, key.shape[1] // sp.size
    qkv = torch.cat([t.unflatten(1, (sp.size, -1)) for t in (query, key, value)], dim=2)
    qkv = all_to_all(qkv, sp, scatter_dim=1, gather_dim=3).squeeze(1)  # (B, heads_local, L, D)
    q, k, v = qkv.split([q_local, kv_local, kv_local], dim=1)
    out = causal_attention(q, k, v, scaling, drop, sp_key_padding_mask)  # (B, Hq/SP, L, D)
    out = all_to_all(out, sp, scatter_dim=2, gather_dim=1)  # (B, Hq, L/SP, D)
    return out.transpose(1, 2), None


def register_ulysses_attention() -> str:
    """Make `"lvr_ulysses"` a transformers attention implementation; returns its name."""
    from transformers import AttentionInterface

    AttentionInterface.register(ULYSSES_ATTENTION, ulysses_attention)
    return ULYSSES_ATTENTION
