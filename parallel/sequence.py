"""Cutting a multimodal sequence across an SP group, and putting pieces back together.

Sequences are padded at the end to a multiple of the SP degree and cut into equal contiguous
slices: with Ulysses attention every rank attends over the full sequence on its own heads, so
equal slices are equal work. Labels are shifted to next-token targets *before* slicing, so the
last token of one slice is scored against the first token of the next.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

from parallel.topology import SPGroup

IGNORE_INDEX = -100


def padded_length(length: int, multiple: int) -> int:
    return -(-length // multiple) * multiple


def pad_to_multiple(x: torch.Tensor, multiple: int, dim: int = 1, value: float | int | bool = 0) -> torch.Tensor:
    """Pad `x` at the end of `dim` with `value` to a length divisible by `multiple`."""
    dim = dim % x.dim()
    extra = padded_length(x.shape[dim], multiple) - x.shape[dim]
    if extra == 0:
        return x
    pad = [0, 0] * (x.dim() - 1 - dim) + [0, extra]
    if x.dtype == torch.bool:
        return F.pad(x.to(torch.uint8), pad, value=int(value)).to(torch.bool)
    return F.pad(x, pad, value=value)


def shard_slice(padded_len: int, sp: SPGroup) -> slice:
    """This rank's slice of a sequence of `padded_len` (a multiple of the SP size)."""
    if padded_len % sp.size:
        raise ValueError(f"sequence length {padded_len} is not a multiple of the SP size {sp.size}; pad it first")
    step = padded_len // sp.size
    return slice(sp.rank * step, (sp.rank + 1) * step)


def shard(x: torch.Tensor, sp: SPGroup, dim: int = 1, pad_value: float | int | bool = 0) -> torch.Tensor:
    """Pad `x` along `dim` to a multiple of the SP size and return this rank's slice."""
    x = pad_to_multiple(x, sp.size, dim, pad_value)
    index = [slice(None)] * x.dim()
    index[dim % x.dim()] = shard_slice(x.shape[dim], sp)
    return x[tuple(index)]


def shift_labels(labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """(B, L) labels -> next-token targets aligned with positions: target[t] = labels[t + 1]."""
    return F.pad(labels[:, 1:], (0, 1), value=ignore_index)


class _Gather(torch.autograd.Function):
    """All-gather of unequal pieces along dim 0; the adjoint sums every rank's gradient for this
    rank's piece (each rank may use a different part of the gathered tensor)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group, rank: int, sizes: tuple[int, ...]) -> torch.Tensor:  # type: ignore[override]
        ctx.group, ctx.rank, ctx.sizes = group, rank, sizes
        longest = max(sizes)
        padded = x.new_zeros((longest, *x.shape[1:]))
        padded[: x.shape[0]] = x
        pieces = [torch.empty_like(padded) for _ in sizes]
        dist.all_gather(pieces, padded.contiguous(), group=group)
        return torch.cat([p[:n] for p, n in zip(pieces, sizes)])

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        start = sum(ctx.sizes[: ctx.rank])
        return grad[start : start + ctx.sizes[ctx.rank]], None, None, None


def gather(x: torch.Tensor, sp: SPGroup, sizes: list[int] | None = None, dim: int = 0) -> torch.Tensor:
    """Concatenate every SP rank's `x` along `dim`, in rank order (autograd-correct).

    `sizes`: each rank's length along `dim` when they differ (every rank must pass the same list);
    equal lengths are assumed otherwise.
    """
    if sp.size == 1:
        return x
    sizes = sizes or [x.shape[dim]] * sp.size
    if len(sizes) != sp.size or sizes[sp.rank] != x.shape[dim]:
        raise ValueError(f"gather: sizes {sizes} do not match this rank's piece of length {x.shape[dim]} (rank {sp.rank})")
    moved = x.movedim(dim, 0)
    return _Gather.apply(moved, sp.group, sp.rank, tuple(sizes)).movedim(0, dim)


@dataclass(frozen=True)
class VisionShard:
    """One rank's share of a batch's video frames, in whole temporal patches.

    `patches`: its rows of `pixel_values_videos`; `grid_thw`: the (k, 3) grids of those rows (a
    video cut between ranks appears as two shorter videos); `n_tokens`: embeddings it produces.
    """

    patches: slice
    grid_thw: torch.Tensor
    n_tokens: int


def plan_vision_shards(grid_thw: torch.Tensor, merge_size: int, sp_size: int) -> list[VisionShard]:
    """Split the videos of a batch over `sp_size` ranks by temporal patch, balanced by patch count.

    Qwen2.5-VL's vision tower attends within one temporal patch at a time (windowed and full
    blocks alike) and positions its patches by (h, w) only, so encoding runs of temporal patches
    separately gives exactly the embeddings of encoding whole videos. Ranks take contiguous runs,
    so concatenating their outputs in rank order restores the original token order.
    """
    units: list[tuple[int, int, int]] = []  # (video, h, w) per temporal patch, in order
    for video, (t, h, w) in enumerate(grid_thw.tolist()):
        units.extend([(video, int(h), int(w))] * int(t))
    if len(units) < sp_size:
        raise ValueError(
            f"{len(units)} temporal patches (frames / 2) cannot be shared by {sp_size} SP ranks; "
            "use more frames per video or a smaller sp_degree"
        )
    offsets = [0]  # offsets[i]: patches before temporal patch i (rows of pixel_values_videos)
    for _, h, w in units:
        offsets.append(offsets[-1] + h * w)
    bounds = [0]
    for r in range(1, sp_size):
        target = offsets[-1] * r / sp_size
        end = bounds[-1] + 1  # every rank takes at least one temporal patch...
        last = len(units) - (sp_size - r)  # ...and leaves one for each rank after it
        while end < last and abs(offsets[end + 1] - target) <= abs(offsets[end] - target):
            end += 1
        bounds.append(end)
    bounds.append(len(units))

    shards = []
    for r in range(sp_size):
        lo, hi = bounds[r], bounds[r + 1]
        rows: list[list[int]] = []
        for video, h, w in units[lo:hi]:
            if rows and rows[-1][3] == video:
                rows[-1][0] += 1
            else:
                rows.append([1, h, w, video])
        grid = torch.tensor([row[:3] for row in rows], dtype=torch.long)
        n_tokens = sum(row[0] * row[1] * row[2] for row in rows) // merge_size**2
        shards.append(VisionShard(slice(offsets[lo], offsets[hi]), grid, n_tokens))
    return shards
