"""Where source videos come from: a directory, a glob, a list file, or a Parquet/CSV manifest; local or fsspec."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import fsspec
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem

from tasks.engine.store import url_to_fs

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


def video_exists(uri: str) -> bool:
    fs, path = url_to_fs(uri)
    return bool(fs.exists(path))
