"""Training on any workdir: trainers write plain files to a local staging folder mirrored to the
workdir, and models stored in the workdir are fetched once into a local cache.

The torchrun workers (DeepSpeed's checkpoint writer, `save_pretrained`) need a local filesystem.
For a local workdir the staging folder is the stage's folder itself and nothing is copied. For an
object-store workdir (`s3://...`), `<cache>/staging/<workdir hash>/<stage>/` stands in for
`<workdir>/<stage>/` with the same layout, and `mirrored_training` around the launch:

- before it, downloads the newest complete checkpoint of the run from the workdir, so a retry on a
  fresh machine resumes where the lost one last uploaded;
- during it, uploads each checkpoint as soon as the trainer has renamed it into place (a poller
  thread), so a machine that dies costs at most `save_every` steps, not the whole run;
- after it, uploads the last checkpoint, the run's work folder (result, metrics, and the workers'
  tracebacks when it failed) and, when it succeeded, the model.

Object stores cannot rename a folder into place, so a folder's completeness there is a marker
file uploaded last and removed first: a checkpoint's `trainer_state.json`, a model's
`lvr_train.json`, a run's `result.json`. Single objects are written whole by the store itself.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fsspec

from tasks.config import cache_dir
from tasks.engine.stage import StageError
from tasks.engine.store import WORK_DIR, Workdir, stable_hash
from tasks.training import checkpoints as ckpt
from tasks.training.loop import CHECKPOINTS_DIR, MODEL_DIR, RESULT_FILE

log = logging.getLogger("lvr.staging")

STAGING_DIR = "staging"  # under cache_dir(): local stand-ins of remote stage folders
TRAIN_DIR = "train"  # <stage>/_work/train/<run key>/: one training run's job, metrics, result
ERRORS_DIR = "errors"  # in a run's folder: the workers' tracebacks (every node writes there)
POLL_S = 1.0  # how often the uploader looks for a new checkpoint (a local directory listing)



@dataclass(frozen=True)
class StagedDir:
    """A training stage's folder as the trainer sees it (`local`) and as the workdir holds it."""

    workdir: Workdir
    stage: str
    local: Path

    @property
    def mirrored(self) -> bool:
        return not self.workdir.is_local

    def local_path(self, *parts: str) -> Path:
        return self.local.joinpath(*parts)

    def remote_path(self, *parts: str) -> str:
        return self.workdir.path(self.stage, *parts)

    def push(self, *parts: str, marker: str | None = None) -> None:
        """Upload the local folder `parts` over its workdir counterpart (nothing to do when local)."""
        if self.mirrored:
            push_dir(self.local_path(*parts), self.workdir.fs, self.remote_path(*parts), marker)


def staged_dir(workdir: Workdir, stage: str) -> StagedDir:
    if workdir.is_local:
        return StagedDir(workdir, stage, Path(workdir.path(stage)))
    # Keyed by the normalised workdir URL: two runs in one bucket never share staging.
    return StagedDir(workdir, stage, cache_dir() / STAGING_DIR / stable_hash(workdir.uri()) / stage)


# ------------------------------------------------------------------------------------------------
# Folders
# ------------------------------------------------------------------------------------------------
def _transient(relative: str) -> bool:
    """Files being written by an atomic writer (`.<name>.tmp...`): never part of a folder's state."""
    return any(part.startswith(".") and ".tmp" in part for part in relative.split("/"))


def push_dir(local: Path, fs: fsspec.AbstractFileSystem, remote: str, marker: str | None = None) -> None:
    """Make `remote` hold exactly the files of `local`. The marker (when `local` has it) goes last
    and an old one is removed first, so `remote` never looks complete while it is half replaced.
    Raises FileNotFoundError when `local` vanishes meanwhile (the marker is then not uploaded)."""
    files = {p.relative_to(local).as_posix(): p for p in sorted(local.rglob("*")) if p.is_file()}
    files = {rel: p for rel, p in files.items() if not _transient(rel)}
    if not files:
        raise FileNotFoundError(f"{local} has no files to upload")
    existing = set(fs.find(remote)) if fs.exists(remote) else set()
    marker_path = f"{remote}/{marker}" if marker else None
    if marker_path in existing:
        fs.rm_file(marker_path)
    stale = sorted(existing - {f"{remote}/{rel}" for rel in files} - {marker_path})
    if stale:
        fs.rm(stale)
    body = [rel for rel in files if rel != marker]
    if body:
        fs.put([str(files[rel]) for rel in body], [f"{remote}/{rel}" for rel in body])
    if marker in files:
        fs.put_file(str(files[marker]), marker_path)


def pull_dir(fs: fsspec.AbstractFileSystem, remote: str, dest: Path, marker: str | None = None, replace: bool = True) -> bool:
    """Download the folder `remote` to `dest` through a temporary sibling renamed into place, so
    `dest` is always a whole copy. False (and nothing written) when `remote` has no files, or not
    the marker. With `replace=False` an existing `dest` (another process was quicker) is kept."""
    files = sorted(fs.find(remote)) if fs.exists(remote) else []
    prefix = remote.rstrip("/") + "/"
    relative = [f[len(prefix):] for f in files if f.startswith(prefix)]
    if not relative or (marker and marker not in relative):
        return False
    tmp = dest.with_name(f".{dest.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        targets = [tmp / rel for rel in relative]
        for target in targets:
            target.parent.mkdir(parents=True, exist_ok=True)
        fs.get([prefix + rel for rel in relative], [str(t) for t in targets])
        if replace:
            ckpt.replace_dir(tmp, dest)
        else:
            with contextlib.suppress(OSError):  # dest appeared meanwhile: keep it, drop ours
                tmp.rename(dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return True


def _delete_remote_dir(fs: fsspec.AbstractFileSystem, folder: str, marker: str) -> None:
    """Marker first: a deletion cut short never leaves a partial folder that looks complete."""
    with contextlib.suppress(FileNotFoundError):
        fs.rm_file(f"{folder}/{marker}")
    with contextlib.suppress(FileNotFoundError):
        fs.rm(folder, recursive=True)


# ------------------------------------------------------------------------------------------------
# Checkpoints
# ------------------------------------------------------------------------------------------------
def remote_checkpoints(staged: StagedDir, run_key: str | None) -> list[tuple[str, ckpt.TrainerState | None]]:
    """The workdir's checkpoint folders, newest first: with their state when complete and of
    `run_key` (any run for None), else None (partial uploads, other runs', foreign folders)."""
    fs = staged.workdir.fs
    root = staged.remote_path(CHECKPOINTS_DIR)
    if not fs.exists(root):
        return []
    found: list[tuple[str, ckpt.TrainerState | None]] = []
    for folder in fs.ls(root, detail=False):
        folder = folder.rstrip("/")
        state = None
        if ckpt.is_step_dir(folder.rsplit("/", 1)[-1]):
            try:
                state = ckpt.TrainerState.parse(fs.cat_file(f"{folder}/{ckpt.STATE_FILE}"))
            except FileNotFoundError:
                state = None
        if state is not None and run_key is not None and state.run_key != run_key:
            state = None
        found.append((folder, state))
    return sorted(found, key=lambda item: item[1].step if item[1] else -1, reverse=True)


def pull_newest_checkpoint(staged: StagedDir, run_key: str) -> int | None:
    """Download the run's newest checkpoint from the workdir unless this machine has one at least
    as new; returns the step the trainer will resume after (None: no checkpoint anywhere)."""
    complete = [(folder, state) for folder, state in remote_checkpoints(staged, run_key) if state is not None]
    root = staged.local_path(CHECKPOINTS_DIR)
    local = ckpt.checkpoints(root, run_key)
    local_step = local[0][1].step if local else None
    if not complete:
        return local_step
    folder, state = complete[0]
    if local_step is not None and local_step >= state.step:
        return local_step
    log.info("%s: downloading checkpoint step-%d from %s", staged.stage, state.step, staged.workdir.fs.unstrip_protocol(folder))
    pull_dir(staged.workdir.fs, folder, ckpt.step_dir(root, state.step), marker=ckpt.STATE_FILE)
    return state.step


def prune_remote_checkpoints(staged: StagedDir, run_key: str, keep: int) -> None:
    """The local rule (`checkpoints.prune`) in the workdir: the run's `keep` newest complete
    checkpoints stay; partial uploads and other runs' checkpoints go."""
    entries = remote_checkpoints(staged, run_key)
    kept = [folder for folder, state in entries if state is not None][:keep]
    for folder, _ in entries:
        if folder not in kept:
            _delete_remote_dir(staged.workdir.fs, folder, ckpt.STATE_FILE)


class CheckpointUploader:
    """Uploads the trainer's newest local checkpoint whenever a new one appears, from a thread,
    while the launch blocks the stage; `sync` once more when it ends catches the last one."""

    def __init__(self, staged: StagedDir, run_key: str, keep: int, interval_s: float = POLL_S):
        self.staged, self.run_key, self.keep, self.interval_s = staged, run_key, keep, interval_s
        self.uploaded = {state.step for _, state in remote_checkpoints(staged, run_key) if state is not None}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, name=f"lvr-{staged.stage}-checkpoint-upload", daemon=True)

    def sync(self, prune: bool = False) -> None:
        """Upload the newest local checkpoint if it is new, then prune the workdir's (always when
        `prune`: the end of a launch also clears partial uploads left by a machine that died)."""
        with self._lock:
            newest = ckpt.checkpoints(self.staged.local_path(CHECKPOINTS_DIR), self.run_key)[:1]
            if not newest or newest[0][1].step in self.uploaded:
                if prune:
                    prune_remote_checkpoints(self.staged, self.run_key, self.keep)
                return
            folder, state = newest[0]
            remote = self.staged.remote_path(CHECKPOINTS_DIR, folder.name)
            try:
                push_dir(folder, self.staged.workdir.fs, remote, marker=ckpt.STATE_FILE)
            except FileNotFoundError:
                # The trainer pruned it while it was uploading: a newer one exists, next poll.
                log.info("%s: checkpoint step-%d was replaced while uploading", self.staged.stage, state.step)
                return
            self.uploaded.add(state.step)
            prune_remote_checkpoints(self.staged, self.run_key, self.keep)
            log.info("%s: checkpoint step-%d uploaded to %s", self.staged.stage, state.step, self.staged.workdir.fs.unstrip_protocol(remote))

    def _poll(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.sync()
            except Exception:  # an upload that failed is retried at the next poll; training goes on
                log.warning("%s: checkpoint upload failed; retrying", self.staged.stage, exc_info=True)

    def __enter__(self) -> CheckpointUploader:
        self._thread.start()
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        self._stop.set()
        self._thread.join()
        if exc is None:
            self.sync(prune=True)
        else:
            _best_effort(self.sync, f"{self.staged.stage}: last checkpoint upload after a failed launch", prune=True)


def _best_effort(action: Any, what: str, *args: Any, **kwargs: Any) -> None:
    """For uploads on a path that is already failing: log their own failure, keep the first one."""
    try:
        action(*args, **kwargs)
    except Exception:
        log.warning("%s failed", what, exc_info=True)


@contextlib.contextmanager
def mirrored_training(staged: StagedDir, run_key: str, keep_checkpoints: int, nnodes: int) -> Iterator[None]:
    """Around a training launch that writes to `staged.local`: the checkpoint download before,
    uploads during, and the run's outputs after (see the module docstring). No-op when local."""
    if not staged.mirrored:
        yield
        return
    if nnodes > 1:
        # Every rank writes its own part of a DeepSpeed checkpoint: ranks on other nodes would
        # write theirs to those nodes' local disks, where no upload ever finds them.
        raise StageError(
            f"{staged.stage}: multi-node training needs a workdir every node mounts, not {staged.workdir.url} "
            f"(an object store): ranks on other nodes write checkpoint parts to their own disks"
        )
    pull_newest_checkpoint(staged, run_key)
    work = (WORK_DIR, TRAIN_DIR, run_key)
    try:
        with CheckpointUploader(staged, run_key, keep_checkpoints):
            yield
    except BaseException:
        _best_effort(staged.push, f"{staged.stage}: uploading the failed run's work folder", *work, marker=RESULT_FILE)
        raise
    staged.push(MODEL_DIR, marker=ckpt.TRAIN_INFO_FILE)
    staged.push(*work, marker=RESULT_FILE)  # last: a run whose result is in the workdir has its model there


def run_dir(staged: StagedDir, run_key: str) -> Path:
    """One training run's local folder: its job file, metrics, result and the workers' tracebacks."""
    return staged.local_path(WORK_DIR, TRAIN_DIR, run_key)
