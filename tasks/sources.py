"""Where source videos come from: a directory, a glob, a list file, or a Parquet/CSV manifest; local or fsspec."""

from __future__ import annotations

import contextlib
import os
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import fsspec
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem

from tasks.artifacts import stable_hash, url_to_fs
from tasks.config import cache_dir

LIST_SUFFIXES = (".txt", ".lst", ".list")
MANIFEST_SUFFIXES = (".parquet", ".csv")


class SourceError(ValueError):
    """A source that cannot be listed; the message says what was expected."""


@dataclass(frozen=True)
class SourceVideo:
    uri: str
    size: int | None
    mtime: float | None

    @property
    def identity(self) -> str:
        """What must change for the video to be processed again (content hashing happens later)."""
        return f"{self.uri}|{self.size}|{self.mtime}"


def _uri(fs: fsspec.AbstractFileSystem, path: str) -> str:
    return path if isinstance(fs, LocalFileSystem) else fs.unstrip_protocol(path)


def _stat(uri: str) -> SourceVideo:
    try:
        fs, path = url_to_fs(uri)
        info = fs.info(path)
    except (FileNotFoundError, OSError, ValueError):
        return SourceVideo(uri, None, None)  # the clip stage reports it as a failure row
    mtime = info.get("mtime") or info.get("LastModified") or info.get("created")
    if hasattr(mtime, "timestamp"):
        mtime = mtime.timestamp()
    return SourceVideo(uri, info.get("size"), float(mtime) if mtime is not None else None)


def _normalise(entry: str, base: str | None) -> str:
    entry = entry.strip()
    if "://" in entry or entry.startswith("/") or base is None:
        return str(Path(entry).expanduser().resolve()) if "://" not in entry else entry
    return f"{base.rstrip('/')}/{entry}" if "://" in base else str((Path(base) / entry).resolve())


def list_sources(source: str, extensions: Sequence[str]) -> list[SourceVideo]:
    """Every video the source names, sorted by URI. A missing source is an error; a bad video is not (yet)."""
    if not source:
        raise SourceError("no source given: pass --source (a directory, glob, list file or manifest)")
    exts = {e.lower() for e in extensions}
    fs, path = url_to_fs(source)
    local = isinstance(fs, LocalFileSystem)
    if local:
        path = str(Path(path).expanduser())
    if any(ch in path for ch in "*?["):
        uris = [_uri(fs, p) for p in fs.glob(path) if fs.isfile(p)]
    elif fs.isdir(path):
        uris = [_uri(fs, p) for p in fs.find(path) if Path(p).suffix.lower() in exts]
    elif fs.isfile(path):
        suffix = Path(path).suffix.lower()
        base = _uri(fs, path.rpartition("/")[0]) if not local else str(Path(path).resolve().parent)
        if suffix in LIST_SUFFIXES:
            with fs.open(path, "rt") as fh:
                lines = [ln for ln in (raw.strip() for raw in fh) if ln and not ln.startswith("#")]
            uris = [_normalise(ln, base) for ln in lines]
        elif suffix in MANIFEST_SUFFIXES:
            with fs.open(path, "rb") as fh:
                table = pq.read_table(fh) if suffix == ".parquet" else pacsv.read_csv(fh)
            if "uri" not in table.column_names:
                raise SourceError(f"manifest {source} has no 'uri' column (columns: {', '.join(table.column_names)})")
            uris = [_normalise(str(u), base) for u in table.column("uri").to_pylist() if u]
        else:
            uris = [_uri(fs, path)]
    else:
        raise SourceError(f"source {source!r} does not exist")
    if local:
        uris = [str(Path(u).resolve()) if "://" not in u else u for u in uris]
    return [_stat(u) for u in sorted(set(uris))]


def source_fingerprint(videos: Sequence[SourceVideo]) -> list[str]:
    return [v.identity for v in videos]


MEDIA_CACHE_DIR = "media"  # under cache_dir(): remote videos and clips, downloaded once
MEDIA_CACHE_GB_ENV = "LVR_MEDIA_CACHE_GB"
MEDIA_CACHE_GB_DEFAULT = 50.0
RECENTLY_USED_S = 600  # never evicted: another process may be about to open it
EVICT_EVERY = 0.05  # of the limit, downloaded by this process: scanning the cache after every clip would be quadratic
_downloaded_since_eviction = 0


@contextlib.contextmanager
def local_copy(uri: str) -> Iterator[Path]:
    """A local path for ffmpeg and decord: the file itself when local, else a copy in the media cache.

    Remote files are read many times (SFT and GRPO load a video's frames every step, filter and eval
    once per shard): each is downloaded once per content (URI, size, ETag or modification time) into
    `<cache>/media/`, held near $LVR_MEDIA_CACHE_GB (default 50) by evicting the least
    recently used files.
    """
    fs, path = url_to_fs(uri)
    if isinstance(fs, LocalFileSystem):
        yield Path(path)
        return
    yield cached_download(fs, path)


def cached_download(fs: fsspec.AbstractFileSystem, path: str) -> Path:
    info = fs.info(path)
    version = info.get("ETag") or info.get("etag") or info.get("LastModified") or info.get("mtime")
    key = stable_hash({"uri": fs.unstrip_protocol(path), "size": info.get("size"), "version": str(version)})
    root = cache_dir() / MEDIA_CACHE_DIR
    target = root / key[:2] / f"{key}{Path(path).suffix}"
    if target.is_file():
        target.touch()  # the eviction order is least recently used
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        fs.get_file(path, str(partial))
        os.replace(partial, target)  # processes downloading the same file at once: one wins, both whole
    finally:
        partial.unlink(missing_ok=True)
    global _downloaded_since_eviction
    _downloaded_since_eviction += target.stat().st_size
    if _downloaded_since_eviction >= EVICT_EVERY * media_cache_limit():
        _downloaded_since_eviction = 0
        evict_media(root, keep=target)
    return target


def media_cache_limit() -> float:
    """Bytes the media cache may hold ($LVR_MEDIA_CACHE_GB)."""
    return float(os.environ.get(MEDIA_CACHE_GB_ENV, MEDIA_CACHE_GB_DEFAULT)) * 2**30


def evict_media(root: Path, keep: Path | None = None) -> list[Path]:
    """Delete the least recently used files of the media cache while it is over its size limit;
    files used in the last few minutes stay whatever the size. Returns the deleted files."""
    limit = media_cache_limit()
    entries = []
    for path in root.glob("*/*"):
        if path.name.startswith("."):
            continue
        with contextlib.suppress(FileNotFoundError):
            stat = path.stat()
            entries.append((stat.st_mtime, stat.st_size, path))
    total = sum(size for _, size, _ in entries)
    deleted = []
    now = time.time()
    for mtime, size, path in sorted(entries):
        if total <= limit:
            break
        if path == keep or now - mtime < RECENTLY_USED_S:
            continue
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
            deleted.append(path)
        total -= size
    return deleted
