"""Run a function on a few local processes joined in a gloo group (tests, CPU benchmarks).

`torchrun` is the way to launch training; this is for checking distributed code from inside one
Python process: `run_local(fn, 2, x)` calls `fn(x)` on ranks 0 and 1 of a fresh gloo group and
returns both results. `fn` must be importable by name (a module-level function), as the worker
processes are spawned, not forked.
"""

from __future__ import annotations

import os
import socket
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _entry(rank: int, world_size: int, port: int, out_dir: str, fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
    # The variables torchrun would set, for libraries that read them (DeepSpeed does).
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        result = fn(*args)
        torch.save(result, Path(out_dir) / f"rank-{rank}.pt")
    finally:
        dist.destroy_process_group()


def run_local(fn: Callable[..., Any], world_size: int, *args: Any) -> list[Any]:
    """`fn(*args)` on `world_size` spawned processes of one gloo group; results in rank order.

    A failure in any process raises here with that process's traceback.
    """
    with tempfile.TemporaryDirectory(prefix="lvr-local-") as out_dir:
        mp.start_processes(_entry, args=(world_size, free_port(), out_dir, fn, args), nprocs=world_size, join=True, start_method="spawn")
        # weights_only: results are tensors and plain containers; nothing here unpickles arbitrary objects.
        return [torch.load(Path(out_dir) / f"rank-{r}.pt", weights_only=True) for r in range(world_size)]
