"""Run CPU-heavy, model-independent work (decoding and resizing frames) ahead of the model.

`Prefetcher.map(fn, items)` calls `fn` on each item in worker processes and hands back one future
per item, in input order, with at most `depth` items submitted and not yet handed back: the workers
stay `depth` items ahead of the caller, and memory holds at most `depth` results besides those the
caller holds. While the caller runs the model on some items the workers prepare the next ones, so
throughput approaches the slower of the two sides instead of their sum.

`future.result()` re-raises an exception of `fn` for that item only; the items after it are still
prepared. Workers are forked from a `forkserver` process, not from the caller (which has torch and its
thread pools loaded: forking it is unsafe); the server imports the main module once, so a new pool
starts in milliseconds after the first. Workers run single-threaded: each is one core of
prefetching, and the model keeps the rest.

`read_resized_frames` is the frame job of the stages that show clips to a Qwen-style model: it reads
a clip's frames and resizes them as the model's preprocessing would, so that the model's own
`preprocess_video` finds them at size and only normalizes them.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.util
import os
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass
from typing import Self, TypeVar

from models.video import (
    FrameSampling,
    SampledFrames,
    VideoPreprocessConfig,
    VideoTokenBudget,
    presized_frames,
    read_frames,
)

T = TypeVar("T")
R = TypeVar("R")

_THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


def _single_threaded() -> None:
    # Runs before `fn`'s module is unpickled; libraries the main module already imported in the fork
    # server read the variables earlier, hence torch's own setting too.
    for var in _THREAD_VARS:
        os.environ[var] = "1"
    import sys

    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(1)


def _shut_down(pool: ProcessPoolExecutor) -> None:
    pool.shutdown(wait=True, cancel_futures=True)


class Prefetcher:
    """A pool of `workers` processes, started on first use (or by `start()`) and kept until `close()`:
    pools are slow to start (the first one starts the fork server, which imports the main module),
    so a captioner keeps one for all its shards. A pool left open is shut down when its process exits,
    also a process started by multiprocessing (see `_executor`)."""

    def __init__(self, workers: int, depth: int):
        if workers < 1:
            raise ValueError(f"workers must be at least 1, got {workers}")
        if depth < 1:
            raise ValueError(f"depth must be at least 1, got {depth}")
        self.workers = workers
        self.depth = depth
        self._pool: ProcessPoolExecutor | None = None
        self._shutdown: multiprocessing.util.Finalize | None = None
        self._lock = threading.Lock()

    def _executor(self) -> ProcessPoolExecutor:
        with self._lock:
            if self._pool is None:
                self._pool = ProcessPoolExecutor(
                    self.workers, mp_context=multiprocessing.get_context("forkserver"), initializer=_single_threaded
                )
                # A process started by multiprocessing (a shard worker of `execution.task_runner=processes`,
                # whose stage keeps its prefetcher for the next shard) joins its children on exit before
                # Python's exit hooks would shut this pool down, and the pool's workers wait for work until
                # then: the process never exited. Finalizers with an exit priority run before that join, the
                # highest first; this one before the pool's queues close theirs (priority 10), or the
                # workers' stop signals would never leave the queue.
                self._shutdown = multiprocessing.util.Finalize(self, _shut_down, args=(self._pool,), exitpriority=20)
                for _ in range(self.workers):  # each submit starts one worker (and waits for the fork server)
                    self._pool.submit(int)
            return self._pool

    def start(self) -> None:
        """Start the workers in the background, e.g. while the model loads."""
        threading.Thread(target=self._executor, name="prefetch-start", daemon=True).start()

    def map(self, fn: Callable[[T], R], items: Iterable[T]) -> Iterator[Future[R]]:
        """One future per item, in input order; `items` is read lazily: at most `depth` items are
        submitted and not yet handed back. `fn` must be picklable (a module-level function)."""
        pool = self._executor()
        source = iter(items)
        pending: deque[Future[R]] = deque()

        def submit_next() -> None:
            for item in source:
                pending.append(pool.submit(fn, item))
                return

        for _ in range(self.depth):
            submit_next()
        try:
            while pending:
                head = pending.popleft()
                submit_next()  # the workers keep `depth` items ahead while the caller uses this one
                yield head
        finally:
            for future in pending:  # the caller stopped early: drop what is queued
                future.cancel()

    def close(self) -> None:
        with self._lock:
            if self._shutdown is not None:
                self._shutdown()  # runs once: the pool is shut down and the exit hook dropped
                self._shutdown = None
                self._pool = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass(frozen=True)
class FrameJob:
    """One clip to read and resize: `preprocess` and `budget` are the model's (see `HFVideoLM`)."""

    path: str
    sampling: FrameSampling
    preprocess: VideoPreprocessConfig
    budget: VideoTokenBudget | None = None


def read_resized_frames(job: FrameJob) -> SampledFrames:
    """`read_frames` of the clip with the frames resized as the model's preprocessing would
    (`models.video.presized_frames`)."""
    return presized_frames(read_frames(job.path, job.sampling), job.preprocess, job.budget)
