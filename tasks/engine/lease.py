"""One writer per stage of a workdir: a lease file taken before a stage plans and given back after it
publishes.

Two runs on one workdir (a nightly refresh and a run started from the UI) would otherwise each
withdraw the other's manifest, collect the other's shards as garbage and race on training files.
A run takes `<stage>/_lock.json` with an exclusive create (`O_EXCL` on a local or mounted disk, an
`If-None-Match: *` PUT on S3), renews it from a thread every `stale_s / 4` seconds, and deletes it
when the stage ends. A second run waits (logging who holds it) or, when told not to wait, fails at
once naming the owner. A lease not renewed for `stale_s` seconds, or held by a process of this host
that no longer exists, belongs to a dead run and is taken over.

Heartbeats compare the holder's clock with the reader's: `stale_s` (minutes by default) must exceed
the clock skew between machines sharing a workdir.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

from tasks.engine.stage import StageError
from tasks.engine.store import Workdir, read_json, write_json_atomic

log = logging.getLogger("lvr.lease")

LOCK_FILE = "_lock.json"


class StageBusy(StageError):
    """Another live run is writing the stage and this run was told not to wait."""


@dataclass(frozen=True)
class Holder:
    token: str  # unique per acquisition: renewals and releases touch only our own lease
    owner: str  # the run that holds it (run id, or host:pid)
    host: str
    pid: int
    acquired_at: float
    heartbeat_at: float

    def describe(self) -> str:
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(self.acquired_at))
        return f"run {self.owner} (host {self.host}, pid {self.pid}, since {since} UTC)"


def _holder(data: dict[str, Any] | None) -> Holder | None:
    if not data:
        return None
    try:
        return Holder(**{k: data[k] for k in Holder.__dataclass_fields__})
    except (KeyError, TypeError):
        return None


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def is_stale(holder: Holder, stale_s: float, now: float | None = None) -> bool:
    """A lease whose run is gone: not renewed for `stale_s`, or held by a dead process of this host."""
    now = time.time() if now is None else now
    if now - holder.heartbeat_at > stale_s:
        return True
    return holder.host == socket.gethostname() and not _process_alive(holder.pid)


def create_exclusive(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> bool:
    """Write `path` only if it does not exist; False when it does. Atomic on local disks and S3."""
    if isinstance(fs, LocalFileSystem):
        fs.makedirs(path.rpartition("/")[0], exist_ok=True)
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        return True
    try:
        if "s3" in fs.protocol or "s3a" in fs.protocol:
            fs.pipe_file(path, data, mode="create")  # PUT with If-None-Match: *
        else:
            with fs.open(path, "xb") as fh:
                fh.write(data)
    except FileExistsError:
        return False
    except OSError as exc:
        if exc.errno == errno.EINVAL and fs.exists(path):  # s3fs reports some 412 answers this way
            return False
        raise
    return True


class StageLease:
    """`with StageLease(workdir, stage, owner, wait=..., stale_s=...)`: the stage is ours inside."""

    def __init__(
        self, workdir: Workdir, stage: str, owner: str, *, wait: bool = True, stale_s: float = 120.0, poll_s: float = 1.0
    ) -> None:
        self.workdir, self.stage, self.owner = workdir, stage, owner
        self.wait, self.stale_s, self.poll_s = wait, stale_s, poll_s
        self.path = workdir.path(stage, LOCK_FILE)
        self.holder: Holder | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _new_holder(self) -> Holder:
        now = time.time()
        return Holder(uuid.uuid4().hex, self.owner, socket.gethostname(), os.getpid(), now, now)

    def _read(self) -> Holder | None:
        return _holder(read_json(self.workdir.fs, self.path))

    def acquire(self) -> None:
        fs = self.workdir.fs
        announced = None
        while True:
            mine = self._new_holder()
            if create_exclusive(fs, self.path, json.dumps(asdict(mine)).encode()):
                self.holder = mine
                break
            current = self._read()
            if current is None:
                # Unreadable (a torn write by a foreign tool) or gone meanwhile: wait a poll, then
                # treat an unreadable lease like a stale one.
                time.sleep(min(self.poll_s, 0.2))
                if self._read() is None:
                    with contextlib.suppress(FileNotFoundError):
                        fs.rm_file(self.path)
                continue
            if is_stale(current, self.stale_s):
                log.warning("%s: taking over the lease of %s, which is gone (no heartbeat for %.0f s)",
                            self.stage, current.describe(), time.time() - current.heartbeat_at)
                if self._read() == current:  # not renewed or taken over by someone else meanwhile
                    with contextlib.suppress(FileNotFoundError):
                        fs.rm_file(self.path)
                continue
            where = self.workdir.uri(self.stage)
            if not self.wait:
                raise StageBusy(f"{self.stage}: {where} is being written by {current.describe()}; "
                                "rerun when it is done, or without --no-wait to wait for it")
            if announced != current.token:
                log.info("%s: waiting for %s, which is writing %s", self.stage, current.describe(), where)
                announced = current.token
            time.sleep(self.poll_s)
        self._thread = threading.Thread(target=self._renew, name=f"lvr-lease-{self.stage}", daemon=True)
        self._thread.start()

    def _renew(self) -> None:
        interval = max(0.05, self.stale_s / 4)
        while not self._stop.wait(interval):
            try:
                current = self._read()
                if current is None or self.holder is None or current.token != self.holder.token:
                    log.error("%s: lost the lease of %s to %s", self.stage, self.workdir.uri(self.stage),
                              current.describe() if current else "nobody")
                    return
                self.holder = Holder(**{**asdict(self.holder), "heartbeat_at": time.time()})
                write_json_atomic(self.workdir.fs, self.path, asdict(self.holder))
            except Exception:  # a failed renewal is retried at the next beat; the stage goes on
                log.warning("%s: could not renew the lease", self.stage, exc_info=True)

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        current = self._read()
        if current is not None and self.holder is not None and current.token == self.holder.token:
            with contextlib.suppress(FileNotFoundError):
                self.workdir.fs.rm_file(self.path)
        self.holder = None

    def __enter__(self) -> StageLease:
        self.acquire()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()
