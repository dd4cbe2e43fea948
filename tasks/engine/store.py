"""The artifact store: a run's workdir (local path or fsspec URL) and atomic Parquet/JSON I/O.

Layout of stage S under the workdir:
    S/part-00000.parquet ...      the stage's main table (`pandas.read_parquet("S")` reads exactly this)
    S/_<table>/part-*.parquet     side tables (e.g. clip/_videos)
    S/_failures.parquet           one row per failed input item, always present (may be empty)
    S/_manifest.json              written last: its presence with a matching fingerprint means "complete"
    S/_work/shards/<key>/         per-shard results, reused after a crash
Names beginning with "_" are skipped by Arrow's dataset discovery, so side files never leak into
the main table when a directory is read.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import io
import json
import os
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote_to_bytes

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem

from data_schemas import FAILURES, INPUT_FAULT, SchemaError, TableSchema, validate_table

MANIFEST = "_manifest.json"
FAILURES_FILE = "_failures.parquet"
WORK_DIR = "_work"
PART_PATTERN = "part-{:05d}.parquet"
# This machine's filesystem, for the atomic writers of files that are local by nature (job files,
# trainer state, caches): the same temp-and-rename as for workdir files.
LOCAL = LocalFileSystem()


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def stable_hash(obj: Any, length: int = 16) -> str:
    return hashlib.sha256(canonical_json(obj).encode()).hexdigest()[:length]


def is_local_uri(uri: str) -> bool:
    """A plain path (or file://), as opposed to an fsspec URL of another filesystem. Model ids
    such as `Qwen/Qwen2.5-VL-7B-Instruct` count as local: they are not ours to fetch."""
    protocol, _ = fsspec.core.split_protocol(uri)
    return protocol in (None, "file", "local")


def url_to_fs(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem and path of a local path or fsspec URL, never answering from a cached listing.

    fsspec keeps one filesystem instance per URL kind for the life of the process, with its
    directory listings. Other machines write into the same workdir and source (a stage's own
    deployment, the nodes of a training run, new videos in a bucket), so a long-lived worker
    would not see their files.
    """
    if url.startswith("file://"):
        # A file URL is percent-encoded (RFC 8089): how a name that is not valid UTF-8 travels in
        # tables and manifests (`tasks.media.sources.location_uri`), decoded back to the OS's bytes.
        return LOCAL, os.fsdecode(unquote_to_bytes(url[len("file://"):]))
    if is_local_uri(url):
        return fsspec.core.url_to_fs(url)
    return fsspec.core.url_to_fs(url, use_listings_cache=False)


@dataclass
class Workdir:
    """A run's root: everything a run writes lives under it, locally or in object storage."""

    url: str
    fs: fsspec.AbstractFileSystem = field(init=False, repr=False)
    root: str = field(init=False)

    def __post_init__(self) -> None:
        fs, root = url_to_fs(self.url)
        if isinstance(fs, LocalFileSystem):
            root = str(Path(root).expanduser().resolve())
            self.url = root
        self.fs, self.root = fs, root.rstrip("/")

    @property
    def is_local(self) -> bool:
        return isinstance(self.fs, LocalFileSystem)

    def path(self, *parts: str) -> str:
        return "/".join([self.root, *(p.strip("/") for p in parts if p)])

    def uri(self, *parts: str) -> str:
        """A path as a user can open it: plain for local files, with the protocol for remote ones."""
        path = self.path(*parts)
        return path if self.is_local else self.fs.unstrip_protocol(path)

    def exists(self, *parts: str) -> bool:
        return self.fs.exists(self.path(*parts))

    def makedirs(self, *parts: str) -> str:
        path = self.path(*parts)
        self.fs.makedirs(path, exist_ok=True)
        return path


def _temp_sibling(path: str) -> str:
    head, _, tail = path.rpartition("/")
    return f"{head}/.{tail}.tmp-{uuid.uuid4().hex[:8]}"


def fsync_path(path: str | os.PathLike[str]) -> None:
    """Flush a local file or directory to disk. A rename survives a power cut only once its
    directory is flushed too: markers written last must not outlive what they vouch for."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sync_filesystem(path: str | os.PathLike[str]) -> None:
    """Flush everything written to the filesystem holding `path`: data, inodes and renames (Linux
    `syncfs`; elsewhere `os.sync`). One call makes a batch of files durable for the price of one
    journal commit instead of an fsync per file and directory; like those, it must return before
    any marker vouches for the batch."""
    fd = os.open(path, os.O_RDONLY)
    try:
        syncfs = getattr(_libc(), "syncfs", None)
        if syncfs is None or syncfs(fd) != 0:
            os.sync()
    finally:
        os.close(fd)


_SYNC_FILE_RANGE_WRITE = 2  # <linux/fs.h>: start writing dirty pages back, do not wait


def start_writeback(path: str | os.PathLike[str]) -> None:
    """Ask the kernel to start writing a finished file to disk without waiting (Linux
    `sync_file_range`; elsewhere nothing), so that a later `sync_filesystem` finds little left to
    wait for. A hint only: durability still comes from that flush."""
    sync_file_range = _sync_file_range()
    if sync_file_range is None:
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        sync_file_range(fd, 0, 0, _SYNC_FILE_RANGE_WRITE)
    finally:
        os.close(fd)


@functools.cache
def _sync_file_range() -> Any:
    function = getattr(_libc(), "sync_file_range", None)
    if function is not None:
        function.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    return function


@functools.cache
def _libc() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None


# Object stores, where one PUT (or a completed multipart upload) is atomic and there is no rename.
OBJECT_STORE_PROTOCOLS = frozenset({"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "adl", "oci", "oss"})


def is_object_store(fs: fsspec.AbstractFileSystem) -> bool:
    protocols = (fs.protocol,) if isinstance(fs.protocol, str) else tuple(fs.protocol)
    return not OBJECT_STORE_PROTOCOLS.isdisjoint(protocols)


def write_bytes_atomic(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    """Readers see the old file or the new one, never half of one. On object storage that is a
    single PUT: a temp object + `mv` there is a copy and a delete, and a writer killed between them
    left the temp object in the bucket for good. Elsewhere, temp file + rename; on a local disk the
    file and then its directory are flushed, so a marker is durable once this returns."""
    if is_object_store(fs):
        fs.pipe_file(path, data)
        return
    directory = path.rpartition("/")[0]
    fs.makedirs(directory, exist_ok=True)
    tmp = _temp_sibling(path)
    try:
        with fs.open(tmp, "wb") as fh:
            fh.write(data)
            if isinstance(fs, LocalFileSystem):
                fh.flush()
                os.fsync(fh.fileno())
        fs.mv(tmp, path)
        if isinstance(fs, LocalFileSystem):
            fsync_path(directory)
    finally:
        if fs.exists(tmp):
            fs.rm(tmp)


def write_json_atomic(fs: fsspec.AbstractFileSystem, path: str, obj: Any) -> None:
    write_bytes_atomic(fs, path, (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode())


def read_json(fs: fsspec.AbstractFileSystem, path: str) -> dict[str, Any] | None:
    try:
        with fs.open(path, "rb") as fh:
            return json.loads(fh.read())
    except FileNotFoundError:
        return None
    except json.JSONDecodeError:
        return None  # a torn write from a foreign tool: treat as absent, never trust it


def write_table_atomic(fs: fsspec.AbstractFileSystem, path: str, table: pa.Table, schema: TableSchema) -> None:
    table = validate_table(table, schema)
    table = table.replace_schema_metadata({**(table.schema.metadata or {}), b"lvr_schema": f"{schema.name}:{schema.version}".encode()})
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    write_bytes_atomic(fs, path, buf.getvalue())


def read_table_file(fs: fsspec.AbstractFileSystem, path: str, schema: TableSchema) -> pa.Table:
    with fs.open(path, "rb") as fh:
        table = pq.read_table(fh)
    try:
        return validate_table(table, schema)
    except SchemaError as exc:
        raise SchemaError(f"{path}: {exc}") from exc


def list_parts(fs: fsspec.AbstractFileSystem, directory: str) -> list[str]:
    if not fs.exists(directory):
        return []
    return sorted(p for p in fs.ls(directory, detail=False) if p.rsplit("/", 1)[-1].startswith("part-") and p.endswith(".parquet"))


def read_dataset(fs: fsspec.AbstractFileSystem, directory: str, schema: TableSchema) -> pa.Table:
    parts = list_parts(fs, directory)
    if not parts:
        return schema.empty()
    return pa.concat_tables([read_table_file(fs, p, schema) for p in parts])


def write_dataset(
    fs: fsspec.AbstractFileSystem, directory: str, table: pa.Table, schema: TableSchema, rows_per_part: int = 100_000
) -> list[str]:
    """Write `table` as part files (an empty table still gets one part, so readers see the schema)."""
    fs.makedirs(directory, exist_ok=True)
    old = set(list_parts(fs, directory))
    written = []
    n_parts = max(1, -(-table.num_rows // rows_per_part))
    for i in range(n_parts):
        path = f"{directory}/{PART_PATTERN.format(i)}"
        write_table_atomic(fs, path, table.slice(i * rows_per_part, rows_per_part), schema)
        written.append(path)
    for stale in old - set(written):
        fs.rm(stale)
    return written


def failures_table(stage: str, failures: list["Failure"]) -> pa.Table:
    return FAILURES.from_rows(
        [
            {"item_id": f.item_id, "stage": stage, "error_kind": f.error_kind, "message": f.message, "detail": f.detail,
             "failure_class": f.failure_class}
            for f in failures
        ]
    )


@dataclass(frozen=True)
class Failure:
    """An input item a stage could not process, and why."""

    item_id: str
    error_kind: str
    message: str
    detail: str | None = None
    failure_class: str | None = INPUT_FAULT  # FAILURE_CLASSES; None only for rows of older files

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> "Failure":
        return cls(row["item_id"], row["error_kind"], row["message"], row["detail"], row.get("failure_class"))
