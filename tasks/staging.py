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
import json
import logging
import shutil
import threading
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import fsspec
import pyarrow as pa

from data_schemas import TRAIN_METRICS, TableSchema
from parallel.launch import LaunchSpec, launch, torchrun_argv
from tasks.artifacts import WORK_DIR, Failure, Workdir, is_local_uri, read_json, stable_hash, url_to_fs, write_table_atomic
from tasks.config import cache_dir
from tasks.sft import checkpoints as ckpt
from tasks.training import CHECKPOINTS_DIR, JOB_FILE, METRICS_FILE, MODEL_DIR, RESULT_FILE
from tasks.report_charts import inline_images, read_report_file
from tasks.stage import Stage, StageContext, StageError, WorkItem

log = logging.getLogger("lvr.staging")

STAGING_DIR = "staging"  # under cache_dir(): local stand-ins of remote stage folders
MODELS_DIR = "models"  # under cache_dir(): models downloaded from workdirs
TRAIN_DIR = "train"  # <stage>/_work/train/<run key>/: one training run's job, metrics, result
METRICS_TABLE = "metrics.parquet"  # a training stage's table: one file, the folder also holds model/
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


class TrainingJob(Protocol):
    """What a trainer's workers read from the job file (`TrainJob`, `GRPOJob`)."""

    run_key: str
    model_path: str

    def save(self, path: Path) -> None: ...


def launch_training(
    staged: StagedDir, job: TrainingJob, make_spec: Callable[[Path], LaunchSpec], keep_checkpoints: int
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Write the job file, tell the other nodes how to join, run this node's ranks with torchrun
    (mirrored to the workdir when it is remote) and return the run's result and metric rows."""
    work = run_dir(staged, job.run_key)
    work.mkdir(parents=True, exist_ok=True)
    job.save(work / JOB_FILE)
    spec = make_spec(work / JOB_FILE)
    stage_log = logging.getLogger(f"lvr.{staged.stage}")
    for node in range(1, spec.nnodes):
        stage_log.info(
            "%s: node %d joins with `lvr train-node %s --node-rank %d` (same workdir, config and overrides), which runs: %s",
            staged.stage, node, staged.stage, node, " ".join(torchrun_argv(spec, node_rank=node)),
        )
    with mirrored_training(staged, job.run_key, keep_checkpoints, spec.nnodes):
        launch(spec, logging.getLogger(f"lvr.{staged.stage}.workers"), work / ERRORS_DIR)
    result = json.loads((work / RESULT_FILE).read_text())
    stage_log.info(
        "%s: trained %d steps (%s) in %.1f s", staged.stage, result["steps"],
        f"resumed after step {result['resumed_from_step']}" if result["resumed_from_step"] else f"from {job.model_path}",
        result["train_time_s"],
    )
    return result, ckpt.read_metrics(work / METRICS_FILE)


def finished_run(staged: StagedDir, run_key: str) -> dict[str, Any]:
    """The result record of training run `run_key`, read from the workdir once its model is there;
    other runs' work folders are dropped (in the workdir and in local staging)."""
    fs = staged.workdir.fs
    info = read_json(fs, staged.remote_path(MODEL_DIR, ckpt.TRAIN_INFO_FILE)) or {}
    if info.get("run_key") != run_key:
        raise StageError(
            f"{staged.workdir.uri(staged.stage, MODEL_DIR)} does not hold the model this configuration trains (run {run_key}); "
            f"it was replaced by an interrupted run of another configuration. Delete {staged.workdir.uri(staged.stage, WORK_DIR)} "
            "and rerun to retrain"
        )
    result = read_json(fs, staged.remote_path(WORK_DIR, TRAIN_DIR, run_key, RESULT_FILE))
    if result is None:
        raise StageError(f"{staged.workdir.uri(staged.stage, WORK_DIR, TRAIN_DIR, run_key)} has no {RESULT_FILE}: rerun to retrain")
    train_dir = staged.remote_path(WORK_DIR, TRAIN_DIR)
    for other in fs.ls(train_dir, detail=False):
        if other.rstrip("/").rsplit("/", 1)[-1] != run_key:
            fs.rm(other, recursive=True)
    local_train = staged.local_path(WORK_DIR, TRAIN_DIR)
    if staged.mirrored and local_train.is_dir():
        for other in local_train.iterdir():
            if other.name != run_key:
                shutil.rmtree(other, ignore_errors=True)
    return result


class TrainingStage(Stage):
    """What the sft and grpo stages share: one item (the whole run), settings without the keys
    that only say where and how often state is written, a run key that checkpoints must match,
    the metrics as one file (the folder also holds `model/`), and the report page."""

    inputs = ("filter",)
    output = TRAIN_METRICS
    execution_keys: tuple[str, ...] = ("save_every", "keep_checkpoints", "node_rank", "master_addr", "master_port")
    report_file: str

    def settings(self, ctx: StageContext) -> dict[str, Any]:
        settings = ctx.config.section(self.name)
        for key in self.execution_keys:
            settings.pop(key)
        return settings

    def run_key(self, ctx: StageContext, item: WorkItem) -> str:
        """Identifies one training run (data, initial model, settings, code): checkpoints of
        another run key are never resumed from."""
        return stable_hash({"item": item.key, "settings": self.settings(ctx), "code": self.code_version})

    def publish_table(self, ctx: StageContext, schema: TableSchema, table: pa.Table) -> list[str]:
        path = ctx.stage_path(self.name, METRICS_TABLE)
        write_table_atomic(ctx.workdir.fs, path, table, schema)
        return [path]

    def finalize(
        self, ctx: StageContext, tables: dict[str, pa.Table], failures: list[Failure]
    ) -> tuple[dict[str, pa.Table], list[Failure]]:
        (item,) = self.list_items(ctx)
        result = finished_run(staged_dir(ctx.workdir, self.name), self.run_key(ctx, item))
        self.write_report(ctx, tables[TRAIN_METRICS.name].to_pylist(), result)
        return tables, failures

    def write_report(self, ctx: StageContext, metrics: list[dict[str, Any]], result: dict[str, Any]) -> None:
        raise NotImplementedError

    def report_markdown(self, ctx: StageContext, manifest: dict[str, Any]) -> str | None:
        data = read_report_file(ctx.workdir, self.report_file)
        return inline_images(data.decode(), ctx.workdir) if data is not None else None


# ------------------------------------------------------------------------------------------------
# Models stored in a workdir
# ------------------------------------------------------------------------------------------------
_MODELS_LOCK = threading.Lock()


def local_model(uri: str, identity: str) -> str:
    """A model folder as a local path for `from_pretrained`: itself when local (or a model id),
    else a copy under `<cache>/models/` downloaded once per (URI, identity), where identity is
    what changes when the folder is rewritten (the producing stage's manifest fingerprint)."""
    if is_local_uri(uri):
        return uri
    dest = cache_dir() / MODELS_DIR / stable_hash({"uri": uri, "identity": identity})
    with _MODELS_LOCK:  # eval shards in threads ask for the same model at once: download it once
        if not dest.is_dir():
            fs, path = url_to_fs(uri)
            log.info("downloading model %s to %s", uri, dest)
            dest.parent.mkdir(parents=True, exist_ok=True)
            if not pull_dir(fs, path, dest, replace=False):
                raise FileNotFoundError(f"no model files under {uri}")
    return str(dest)
