"""Starting distributed workers with `torchrun`, and the worker side of that contract.

Launcher side (`launch`): torchrun is started from an argv list (never a shell string) with
stdout and stderr merged; each line is handed to a logger as it arrives. When a worker fails, the
error raised (`WorkerFailed`) carries that worker's Python traceback: every worker runs its main
function through `run_worker`, which writes the traceback of an uncaught exception to a file in
the directory named by `$LVR_WORKER_ERROR_DIR` before dying. The first traceback written is the
root cause; workers torchrun then stops leave none.

torchrun dies with the process that launched it: it runs in a session of its own (a terminal's
Ctrl-C or a killed process group reaches `launch`, which stops it) and asks Linux for SIGTERM when
its parent dies (PR_SET_PDEATHSIG), which it forwards to its workers. So a pipeline killed with
SIGKILL, alone or with its group, never leaves a training run behind, writing checkpoints next to
the rerun. `timeout_s` bounds a launch the same way: torchrun is stopped and `LaunchTimeout` raised.

Worker side (`run_worker`): besides the traceback file, an orphan guard ends the worker when its
torchrun agent disappears (torchrun starts workers in their own sessions, so a torchrun killed with
SIGKILL would otherwise leave them training).

Multi-node: every node runs the same torchrun command with its own `node_rank` and node 0's
`master_addr:master_port` (static rendezvous, so global ranks follow node ranks);
`torchrun_argv(spec, node_rank=k)` gives node k's command. A single node uses `--standalone`
(a free local port: concurrent runs never collide).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

ERROR_DIR_ENV = "LVR_WORKER_ERROR_DIR"
TRACEBACK_PATTERN = "rank-{rank:05d}.traceback"
EXIT_ORPHANED = 70
_LOG_TAIL_LINES = 200
_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


@dataclass(frozen=True)
class LaunchSpec:
    """What to run on every worker and how many workers.

    `module` is run as `python -m module *args` by each of `nproc_per_node` processes per node.
    `env` is added to this process's environment for the workers.
    """

    module: str
    args: tuple[str, ...] = ()
    nproc_per_node: int = 1
    nnodes: int = 1
    node_rank: int = 0
    master_addr: str | None = None
    master_port: int = 29500
    env: Mapping[str, str] = field(default_factory=dict)
    python: str = sys.executable

    def __post_init__(self) -> None:
        if self.nproc_per_node < 1 or self.nnodes < 1:
            raise ValueError(f"need nproc_per_node >= 1 and nnodes >= 1, got {self.nproc_per_node}, {self.nnodes}")
        if not 0 <= self.node_rank < self.nnodes:
            raise ValueError(f"node_rank {self.node_rank} is not in [0, {self.nnodes})")
        if self.nnodes > 1 and not self.master_addr:
            raise ValueError("a multi-node launch needs master_addr (the address of node 0, reachable from every node)")


@dataclass(frozen=True)
class LaunchResult:
    argv: list[str]
    wall_s: float


class WorkerFailed(RuntimeError):
    """A distributed run that did not succeed. `traceback` is the first failing worker's, when it
    left one (a worker killed by a signal leaves none: then `log_tail` tells the story)."""

    def __init__(self, returncode: int, rank: int | None, worker_traceback: str | None, log_tail: list[str]):
        self.returncode = returncode
        self.rank = rank
        self.worker_traceback = worker_traceback
        self.log_tail = log_tail
        if worker_traceback:
            detail = f"worker rank {rank} failed:\n{worker_traceback.rstrip()}"
        else:
            detail = "no worker left a traceback (killed by a signal, or torchrun itself failed); last output:\n" + "\n".join(
                log_tail[-30:]
            )
        super().__init__(f"distributed run exited with code {returncode}; {detail}")


class LaunchTimeout(RuntimeError):
    """A distributed run stopped because it outlived its time limit (`timeout_s` of `launch`)."""

    def __init__(self, timeout_s: float, log_tail: list[str]):
        self.timeout_s = timeout_s
        self.log_tail = log_tail
        super().__init__(
            f"distributed run did not finish within {timeout_s:g} s; torchrun and its workers were stopped; last output:\n"
            + "\n".join(log_tail[-30:])
        )


def torchrun_argv(spec: LaunchSpec, node_rank: int | None = None) -> list[str]:
    """The torchrun command for node `node_rank` (default: the spec's)."""
    argv = [spec.python, "-m", "torch.distributed.run", f"--nproc-per-node={spec.nproc_per_node}", "--max-restarts=0"]
    if spec.nnodes == 1:
        argv.append("--standalone")
    else:
        rank = spec.node_rank if node_rank is None else node_rank
        argv += [
            f"--nnodes={spec.nnodes}",
            f"--node-rank={rank}",
            f"--master-addr={spec.master_addr}",
            f"--master-port={spec.master_port}",
        ]
    return [*argv, "-m", spec.module, *spec.args]


def launch(
    spec: LaunchSpec, log: logging.Logger, error_dir: str | os.PathLike, node_rank: int | None = None,
    timeout_s: float | None = None,
) -> LaunchResult:
    """Run `spec` with torchrun on this node (node `node_rank`, default the spec's), streaming
    every output line to `log`.

    Raises `WorkerFailed` if any worker fails, `LaunchTimeout` if the run takes longer than
    `timeout_s` (None: no limit). If this call is interrupted (an exception such as
    KeyboardInterrupt or a cancelled task), torchrun is terminated, which stops its workers; if
    this process dies, torchrun is sent SIGTERM (see the module docstring). The parent-death
    signal follows the thread that started torchrun, and this call blocks that thread until
    torchrun has exited, so the signal never fires early.
    On a multi-node run `error_dir` is on storage every node sees: all ranks leave their
    tracebacks there, and only node 0, which starts the run, clears the previous attempt's.
    """
    rank = spec.node_rank if node_rank is None else node_rank
    errors = Path(error_dir)
    errors.mkdir(parents=True, exist_ok=True)
    if rank == 0:
        for stale in errors.glob("rank-*.traceback"):
            stale.unlink()
    argv = torchrun_argv(spec, node_rank=rank)
    env = {**os.environ, **spec.env, ERROR_DIR_ENV: str(errors), "PYTHONUNBUFFERED": "1"}
    log.info("launching: %s", " ".join(argv))
    started = time.perf_counter()
    tail: deque[str] = deque(maxlen=_LOG_TAIL_LINES)
    prctl = _linux_prctl()
    proc = subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
        text=True, errors="replace", bufsize=1, start_new_session=True,
        preexec_fn=functools.partial(_die_with_parent, prctl, os.getpid()) if prctl is not None else None,  # noqa: PLW1509 -- it takes no lock: prctl and getppid only
    )
    timed_out = threading.Event()

    def expire() -> None:
        if proc.poll() is not None:  # finished just in time
            return
        timed_out.set()
        log.error("the run is over its time limit of %g s: stopping torchrun", timeout_s)
        _stop(proc)

    # The output loop blocks until torchrun and its workers close the pipe: the limit acts from aside.
    timer = threading.Timer(timeout_s, expire) if timeout_s is not None else None
    if timer is not None:
        timer.daemon = True
        timer.start()
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            line = line.rstrip("\n")
            tail.append(line)
            log.info("%s", line)
        returncode = proc.wait()
    except BaseException:
        _stop(proc)
        raise
    finally:
        if timer is not None:
            timer.cancel()
    if timed_out.is_set():
        raise LaunchTimeout(timeout_s, list(tail))
    if returncode != 0:
        rank, text = first_traceback(errors)
        raise WorkerFailed(returncode, rank, text, list(tail))
    return LaunchResult(argv, time.perf_counter() - started)


def _linux_prctl() -> Callable[..., int] | None:
    """libc's prctl, looked up before forking (loading a library in the forked child is unsafe);
    None off Linux, where torchrun then relies on `launch` stopping it."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True).prctl
    except (OSError, AttributeError):
        return None


def _die_with_parent(prctl: Callable[..., int], parent_pid: int) -> None:
    """In torchrun's process between fork and exec: SIGTERM it when its parent dies (kept across exec)."""
    prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent_pid:  # the parent died before the request took effect
        os._exit(1)


def _stop(proc: subprocess.Popen, grace_s: float = 30.0) -> None:
    """SIGTERM torchrun (it forwards the signal to its workers), then SIGKILL if it lingers."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def first_traceback(error_dir: Path) -> tuple[int | None, str | None]:
    """The earliest traceback file a worker wrote (the root cause), as (rank, text)."""
    files = sorted(error_dir.glob("rank-*.traceback"), key=lambda p: (p.stat().st_mtime_ns, p.name))
    if not files:
        return None, None
    first = files[0]
    return int(first.stem.split("-")[1]), first.read_text(errors="replace")


# --- worker side --------------------------------------------------------------------------------
def worker_rank() -> int:
    return int(os.environ.get("RANK", "0"))


def configure_worker_logging(logger: str, level: int = logging.INFO) -> None:
    """Log lines that say which rank wrote them (they arrive interleaved at the launcher): `logger`
    and its children at `level`, everything else (libraries) at WARNING."""
    logging.basicConfig(
        level=logging.WARNING, stream=sys.stdout, force=True,
        format=f"%(asctime)s [rank {worker_rank()}] %(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger(logger).setLevel(level)


def run_worker(main: Callable[[], None], orphan_check_s: float = 0.5) -> None:
    """Run a torchrun worker's `main`: a traceback file on failure, and exit when orphaned."""
    _start_orphan_guard(orphan_check_s)
    try:
        main()
    except SystemExit as exc:
        if exc.code not in (0, None):
            _write_traceback()
        raise
    except BaseException:
        _write_traceback()
        raise


def _write_traceback() -> None:
    directory = os.environ.get(ERROR_DIR_ENV)
    if not directory:
        return
    path = Path(directory) / TRACEBACK_PATTERN.format(rank=worker_rank())
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(traceback.format_exc())
    os.replace(tmp, path)


def _start_orphan_guard(interval_s: float) -> None:
    parent = os.getppid()

    def watch() -> None:
        while True:
            time.sleep(interval_s)
            if os.getppid() != parent:  # re-parented: the torchrun agent is gone
                os._exit(EXIT_ORPHANED)

    threading.Thread(target=watch, name="lvr-orphan-guard", daemon=True).start()
