"""Progress people can see: a stage's units done out of its total, on a terminal or elsewhere.

`ProgressReporter` is what a front end implements (the terminal one is here; Prefect's progress
artifact lives in `flows/`). The engine reports through `StageContext.progress(done, total)`;
`engine_progress(reporter, stage)` turns those calls into `start` / `advance` / `finish`, so a
stage never talks to a reporter itself. `Throttled` bounds how often a costly front end (one HTTP
call per update) hears of advances, and `InBackground` makes those calls on a thread of their own,
so that no shard waits for them.
"""

from __future__ import annotations

import contextvars
import logging
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import Protocol, TextIO

log = logging.getLogger("lvr.progress")


class ProgressReporter(Protocol):
    def start(self, stage: str, total: int, unit: str = "shards") -> None: ...

    def advance(self, n: int = 1) -> None: ...

    def finish(self) -> None: ...


class TerminalProgress:
    """A bar redrawn in place on a terminal; on anything else (a log file, CI), one plain log line
    per tenth of the work, so logs stay short however many units a stage has."""

    def __init__(self, stream: TextIO | None = None, width: int = 30) -> None:
        self.stream = stream or sys.stderr
        self.width = width
        self.stage, self.unit, self.total, self.done = "", "", 0, 0
        self._started = 0.0
        self._logged_tenths = -1

    @property
    def interactive(self) -> bool:
        return bool(getattr(self.stream, "isatty", lambda: False)())

    def start(self, stage: str, total: int, unit: str = "shards") -> None:
        self.stage, self.unit, self.total, self.done = stage, unit, max(0, total), 0
        self._started = time.monotonic()
        self._logged_tenths = -1
        self._show()

    def advance(self, n: int = 1) -> None:
        self.done = min(self.total, self.done + n)
        self._show()

    def finish(self) -> None:
        self.done = self.total
        self._show()
        if self.interactive:
            self.stream.write("\n")
            self.stream.flush()

    def _show(self) -> None:
        elapsed = time.monotonic() - self._started
        if self.interactive:
            filled = self.width * self.done // self.total if self.total else self.width
            bar = "#" * filled + "." * (self.width - filled)
            self.stream.write(f"\r{self.stage:<8} [{bar}] {self.done}/{self.total} {self.unit} {elapsed:6.1f}s")
            self.stream.flush()
            return
        tenths = 10 * self.done // self.total if self.total else 10
        if tenths > self._logged_tenths:
            self._logged_tenths = tenths
            log.info("%s: %d/%d %s done (%.1f s)", self.stage, self.done, self.total, self.unit, elapsed)


class FanOut:
    """Several reporters as one (the terminal and Prefect's progress artifact)."""

    def __init__(self, reporters: Sequence[ProgressReporter]) -> None:
        self.reporters = list(reporters)

    def start(self, stage: str, total: int, unit: str = "shards") -> None:
        for r in self.reporters:
            r.start(stage, total, unit)

    def advance(self, n: int = 1) -> None:
        for r in self.reporters:
            r.advance(n)

    def finish(self) -> None:
        for r in self.reporters:
            r.finish()


class Throttled:
    """A reporter that passes `start` and `finish` on at once and advances at most once per
    `interval_s`, summed: a stage of 600 quick shards makes a handful of updates, not 600. What is
    still held back when the stage finishes is covered by `finish` (everything done)."""

    def __init__(self, reporter: ProgressReporter, interval_s: float = 1.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.reporter, self.interval_s, self.clock = reporter, interval_s, clock
        self._held = 0
        self._last = float("-inf")
        self._lock = threading.Lock()

    def start(self, stage: str, total: int, unit: str = "shards") -> None:
        with self._lock:
            self._held, self._last = 0, self.clock()
        self.reporter.start(stage, total, unit)

    def advance(self, n: int = 1) -> None:
        with self._lock:
            self._held += n
            now = self.clock()
            if now - self._last < self.interval_s:
                return
            n, self._held, self._last = self._held, 0, now
        self.reporter.advance(n)

    def finish(self) -> None:
        with self._lock:
            self._held = 0
        self.reporter.finish()


class InBackground:
    """A reporter whose calls run in order on a thread of its own: a front end that answers slowly
    (Prefect's progress artifact: an HTTP call, ~25 ms on 2 cores) no longer holds up the shard that
    reported, which for 75 shards of a 600-video clip stage was ~2 s. Each call runs in the caller's
    context (Prefect links an artifact to the run it finds there). Advances queued behind a call in
    flight are summed into one. `finish` returns once it and everything before it have run; a failed
    call is logged, never raised (progress must not fail a stage)."""

    def __init__(self, reporter: ProgressReporter) -> None:
        self.reporter = reporter
        self._queue: list[tuple[contextvars.Context, str, tuple]] = []
        self._pending = 0  # queued or running
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None

    def start(self, stage: str, total: int, unit: str = "shards") -> None:
        self._put("start", (stage, total, unit))

    def advance(self, n: int = 1) -> None:
        with self._cond:
            if self._queue and self._queue[-1][1] == "advance":
                context, _, (queued,) = self._queue[-1]
                self._queue[-1] = (context, "advance", (queued + n,))
                return
        self._put("advance", (n,))

    def finish(self) -> None:
        self._put("finish", ())
        with self._cond:
            self._cond.wait_for(lambda: self._pending == 0)

    def _put(self, method: str, args: tuple) -> None:
        with self._cond:
            self._queue.append((contextvars.copy_context(), method, args))
            self._pending += 1
            if self._thread is None:
                self._thread = threading.Thread(target=self._deliver, name="progress", daemon=True)
                self._thread.start()
            self._cond.notify_all()

    def _deliver(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: bool(self._queue))
                context, method, args = self._queue.pop(0)
            try:
                context.run(getattr(self.reporter, method), *args)
            except Exception:  # noqa: BLE001 -- a progress bar that cannot be updated must not stop the work
                log.warning("progress: %s%s failed", method, args, exc_info=True)
            with self._cond:
                self._pending -= 1
                self._cond.notify_all()
                if method == "finish" and not self._queue:  # the stage is over: no thread waits on for more
                    self._thread = None
                    return


def engine_progress(reporter: ProgressReporter, stage: str, unit: str = "shards") -> Callable[[int, int], None]:
    """A `StageContext.progress` callback: the engine's `(done, total)` after each unit as
    start (on the first call, which may be `(0, total)`), advance, and finish (when done reaches total)."""
    state = {"started": False, "done": 0}

    def progress(done: int, total: int) -> None:
        if not state["started"]:
            state["started"] = True
            reporter.start(stage, total, unit)
        if done > state["done"]:
            reporter.advance(done - state["done"])
            state["done"] = done
        if done >= total:
            reporter.finish()

    return progress
