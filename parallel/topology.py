"""Which ranks share a sequence: the sequence-parallel (SP) and data-parallel (DP) groups."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class SPGroup:
    """This rank's sequence-parallel group: `size` ranks that hold the same batch and each process
    one contiguous `1/size` slice of its sequence. `group` is None when `size` is 1."""

    group: Any  # torch.distributed.ProcessGroup | None
    rank: int
    size: int

    def __post_init__(self) -> None:
        if self.size < 1 or not 0 <= self.rank < self.size:
            raise ValueError(f"bad SP group: rank {self.rank} of size {self.size}")
        if self.size > 1 and self.group is None:
            raise ValueError("an SP group of more than one rank needs a process group")

    @classmethod
    def single(cls) -> SPGroup:
        """No sequence parallelism: this rank holds whole sequences."""
        return cls(None, 0, 1)


@dataclass(frozen=True)
class Topology:
    """World = `dp_size` data-parallel replicas x `sp.size` sequence-parallel ranks.

    SP groups are blocks of consecutive global ranks, so with `sp_degree <= nproc_per_node` the
    all-to-alls of attention stay inside a node; the replica index `dp_rank` picks the batch.
    """

    rank: int
    world_size: int
    sp: SPGroup
    dp_rank: int
    dp_size: int


def sp_layout(world_size: int, sp_degree: int) -> list[list[int]]:
    """The global ranks of each SP group, in order."""
    if sp_degree < 1 or world_size % sp_degree:
        raise ValueError(f"sp_degree ({sp_degree}) must divide the number of processes ({world_size})")
    return [list(range(start, start + sp_degree)) for start in range(0, world_size, sp_degree)]


def kv_repeat_factor(num_heads: int, num_kv_heads: int, sp_size: int) -> int:
    """How many times to repeat each KV head before the all-to-all so that KV heads split evenly
    over the SP ranks and every rank's query heads find their own KV heads locally.

    Query head h uses KV head h // (num_heads / kv_heads); after repeating each KV head r times
    (interleaved) that mapping is unchanged, and it stays rank-local exactly when the repeated KV
    head count divides both by the SP size and into the query heads. The smallest such r is used.
    """
    if num_heads % num_kv_heads:
        raise ValueError(f"{num_heads} query heads are not a multiple of {num_kv_heads} KV heads")
    if num_heads % sp_size:
        raise ValueError(
            f"Ulysses attention splits heads over the SP group: {num_heads} attention heads do not divide over "
            f"sp_degree={sp_size}; pick an SP degree that divides {num_heads}"
        )
    groups = num_heads // num_kv_heads
    for r in range(1, groups + 1):
        kv = num_kv_heads * r
        if kv % sp_size == 0 and num_heads % kv == 0:
            return r
    raise AssertionError("unreachable: r = num_heads / num_kv_heads always qualifies")


def init_topology(sp_degree: int) -> Topology:
    """Create the SP groups (a collective: every rank must call it, in the same order as any other
    `new_group`); needs `torch.distributed` initialised, except for a single process."""
    import torch.distributed as dist  # here, not at the top: the config validates SP layouts without torch

    if not dist.is_initialized():
        if sp_degree != 1:
            raise RuntimeError(f"sp_degree={sp_degree} needs torch.distributed initialised (run under torchrun)")
        return Topology(0, 1, SPGroup.single(), 0, 1)
    rank, world = dist.get_rank(), dist.get_world_size()
    mine = None
    for ranks in sp_layout(world, sp_degree):
        # new_group is collective over the world: every rank creates every group.
        group = dist.new_group(ranks) if sp_degree > 1 else None
        if rank in ranks:
            mine = SPGroup(group, ranks.index(rank), sp_degree)
    assert mine is not None
    return Topology(rank, world, mine, rank // sp_degree, world // sp_degree)
