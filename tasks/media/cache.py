"""The media cache: a local path for every video or clip URI, remote files downloaded once per
content into `<cache>/media/` and evicted least recently used above $LVR_MEDIA_CACHE_GB."""

from __future__ import annotations

import contextlib
import os
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import fsspec
from fsspec.implementations.local import LocalFileSystem

from tasks.config import cache_dir
from tasks.engine.store import stable_hash, url_to_fs

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
