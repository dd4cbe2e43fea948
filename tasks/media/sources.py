"""Where source videos come from: a directory, a list file, a Parquet/CSV manifest or a single file
(taken literally: a folder may be named `Season [1080p]`), or `glob:PATTERN`; local or fsspec.

A listing is checked before anything is built on it (`check_listing`): a source that lists no
video, or far fewer than the last complete run did (an unmounted disk, a glob that stopped
matching, a manifest being rewritten), is refused instead of publishing an empty dataset.

Local names that are not valid UTF-8 are listed as percent-encoded `file://` URLs (`location_uri`):
the tables keep the bytes, escaped, and every reader opens the file through `url_to_fs`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import fsspec
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem

from tasks.config import cache_dir
from tasks.engine.store import LOCAL, stable_hash, url_to_fs, write_bytes_atomic
from tasks.media.ffmpeg import MediaError, content_id

GLOB_PREFIX = "glob:"
LIST_SUFFIXES = (".txt", ".lst", ".list")
MANIFEST_SUFFIXES = (".parquet", ".csv")


class SourceError(ValueError):
    """A source that cannot be listed; the message says what was expected."""


@dataclass(frozen=True)
class SourceVideo:
    uri: str
    size: int | None
    mtime: float | None
    content: str | None = None  # local: the sampled content id; object stores: the ETag

    @property
    def identity(self) -> str:
        """What must change for the video to be processed again: where it is and what it holds
        (a rewrite that keeps the size and the modification time is still a new video)."""
        return f"{self.uri}|{self.size}|{self.content}"


def _uri(fs: fsspec.AbstractFileSystem, path: str) -> str:
    return path if isinstance(fs, LocalFileSystem) else fs.unstrip_protocol(path)


def location_uri(path: str) -> str:
    """A local path as tables store it: itself, or a percent-encoded `file://` URL when the name
    is not valid UTF-8 (Arrow strings cannot hold the OS's undecodable bytes)."""
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        return "file://" + quote(os.fsencode(path), safe="/")
    return path


def _stat(uri: str) -> SourceVideo:
    try:
        fs, path = url_to_fs(uri)
        info = fs.info(path)
        if isinstance(fs, LocalFileSystem):
            content = local_content_id(path)
        else:
            content = str(info.get("ETag") or info.get("etag") or info.get("version_id") or info.get("mtime") or "") or None
    except (FileNotFoundError, OSError, ValueError, MediaError):
        return SourceVideo(uri, None, None)  # the clip stage reports it as a failure row
    mtime = info.get("mtime") or info.get("LastModified") or info.get("created")
    if hasattr(mtime, "timestamp"):
        mtime = mtime.timestamp()
    return SourceVideo(uri, info.get("size"), float(mtime) if mtime is not None else None, content)


CONTENT_IDS_DIR = "content-ids"  # under cache_dir(): content ids of local videos, by file version


def local_content_id(path: str) -> str:
    """`content_id` of a local file, computed once per file version (inode, size, modification and
    change times: the change time moves on every write and cannot be set back), so listing a large
    source again reads no video."""
    st = os.stat(path)
    version = stable_hash({"path": os.fsencode(path).hex(), "ino": st.st_ino, "size": st.st_size,
                           "mtime_ns": st.st_mtime_ns, "ctime_ns": st.st_ctime_ns})
    memo = cache_dir() / CONTENT_IDS_DIR / version[:2] / version
    try:
        return memo.read_text()
    except FileNotFoundError:
        pass
    found = content_id(path)
    write_bytes_atomic(LOCAL, str(memo), found.encode())
    return found


def _normalise(entry: str, base: str | None) -> str:
    entry = entry.strip()
    if "://" in entry or entry.startswith("/") or base is None:
        return str(Path(entry).expanduser().resolve()) if "://" not in entry else entry
    return f"{base.rstrip('/')}/{entry}" if "://" in base else str((Path(base) / entry).resolve())


def list_sources(source: str, extensions: Sequence[str]) -> list[SourceVideo]:
    """Every video the source names, sorted by URI. A missing source is an error; a bad video is not (yet)."""
    if not source:
        raise SourceError("no source given: pass --source (a directory, list file, manifest, or glob:PATTERN)")
    exts = {e.lower() for e in extensions}
    pattern = source.startswith(GLOB_PREFIX)
    fs, path = url_to_fs(source.removeprefix(GLOB_PREFIX))
    local = isinstance(fs, LocalFileSystem)
    if local:
        path = str(Path(path).expanduser())
    if pattern:
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
        hint = f" (paths are taken literally; for a pattern write {GLOB_PREFIX}{source})" if any(c in path for c in "*?[") else ""
        raise SourceError(f"source {source!r} does not exist{hint}")
    if local:
        uris = [location_uri(str(Path(u).resolve())) if "://" not in u else u for u in uris]
    return [_stat(u) for u in sorted(set(uris))]


def check_listing(source: str, listed: int, previous: int | None, max_shrink: float, allow_shrink: bool) -> None:
    """Refuse a listing that would wipe the dataset: none at all, or fewer than `max_shrink` of the
    `previous` complete run's videos unless `allow_shrink`. Raises SourceError naming both counts."""
    before = f"; the last complete run listed {previous}" if previous is not None else ""
    if listed == 0:
        raise SourceError(f"source {source!r} lists no videos{before}. Nothing was changed: is it mounted, and does it hold videos?")
    if previous and not allow_shrink and listed < max_shrink * previous:
        raise SourceError(
            f"source {source!r} lists {listed} videos{before} (below clip.max_shrink={max_shrink:g} of it). Nothing was "
            "changed: if the source really shrank, rerun with --allow-shrink (execution.allow_shrink=true)"
        )


def source_fingerprint(videos: Sequence[SourceVideo]) -> list[str]:
    return [v.identity for v in videos]


def video_exists(uri: str) -> bool:
    fs, path = url_to_fs(uri)
    return bool(fs.exists(path))
