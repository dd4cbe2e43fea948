"""Clip stage: probe each source video and cut it into ~`clip.seconds` clips with true boundaries."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import traceback
from pathlib import Path
from typing import Any

import pyarrow as pa

from data_schemas import CLIPS, VIDEOS
from tasks.engine.manifest import read_manifest
from tasks.engine.stage import (
    ShardResult,
    Stage,
    StageContext,
    StageError,
    WorkItem,
    is_environment_fault,
)
from tasks.engine.store import Failure, stable_hash, sync_filesystem
from tasks.media.cache import local_copy
from tasks.media.ffmpeg import (
    ClipFile,
    MediaError,
    VideoProbe,
    content_id,
    cut_video,
    plan_cuts,
    probe_video,
)
from tasks.media.sources import (
    SourceError,
    SourceVideo,
    check_listing,
    list_sources,
    source_fingerprint,
)

log = logging.getLogger("lvr.clip")

MEDIA_DIR = "_media"


class ClipStage(Stage):
    name = "clip"
    code_version = "2"  # 2: sampled content ids for files over 64 MiB
    output = CLIPS
    side_outputs = (VIDEOS,)
    item_columns = {CLIPS.name: "source_uri", VIDEOS.name: "uri"}

    def __init__(self) -> None:
        self._listing: tuple[str, list[SourceVideo]] | None = None

    def _sources(self, ctx: StageContext) -> list[SourceVideo]:
        source = ctx.source or ctx.config.source
        if not source:
            raise StageError("the clip stage needs a source: pass --source or set `source:` in the config")
        if self._listing is None or self._listing[0] != source:
            last = read_manifest(ctx.workdir, self.name)
            try:
                videos = list_sources(source, ctx.config.clip.extensions)
                check_listing(
                    source, len(videos), last["items"] if last else None, ctx.config.clip.max_shrink,
                    ctx.config.execution.allow_shrink,
                )
            except SourceError as exc:
                raise StageError(str(exc)) from exc
            self._listing = (source, videos)
        return self._listing[1]

    def input_fingerprints(self, ctx: StageContext) -> dict[str, str]:
        return {"source": stable_hash(source_fingerprint(self._sources(ctx)))}

    def list_items(self, ctx: StageContext) -> list[WorkItem]:
        return [WorkItem(item_id=v.uri, key=v.identity) for v in self._sources(ctx)]

    def media_dir(self, ctx: StageContext) -> str:
        # Clips of different settings never overwrite each other, so cached shards stay valid.
        return ctx.stage_path(self.name, MEDIA_DIR, stable_hash(self.settings(ctx), 12))

    def process_shard(self, ctx: StageContext, items: list[WorkItem]) -> ShardResult:
        video_rows: list[dict[str, Any]] = []
        clip_rows: list[dict[str, Any]] = []
        failures: list[Failure] = []
        written: set[str] = set()  # local clip folders to flush before the shard is vouched for
        for item in items:
            try:
                video, clips = self._clip_one(ctx, item.item_id, written)
            except MediaError as exc:
                log.warning("clip: %s: %s (%s)", item.item_id, exc.kind, exc.message)
                failures.append(Failure(item.item_id, exc.kind, exc.message))
                continue
            except Exception as exc:  # one broken input must not stop the other videos
                if is_environment_fault(exc):
                    raise
                if isinstance(exc, FileNotFoundError):  # deleted since the listing
                    failures.append(Failure(item.item_id, "missing", f"{type(exc).__name__}: {exc}"))
                    continue
                log.exception("clip: unexpected error on %s", item.item_id)
                failures.append(Failure(item.item_id, "unexpected", f"{type(exc).__name__}: {exc}", traceback.format_exc()))
                continue
            video_rows.append(video)
            clip_rows.extend(clips)
        _flush(written)
        return ShardResult({VIDEOS.name: VIDEOS.from_rows(video_rows), CLIPS.name: CLIPS.from_rows(clip_rows)}, failures)

    def _clip_one(self, ctx: StageContext, uri: str, written: set[str]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        cfg = ctx.config.clip
        with local_copy(uri) as local:
            probe = probe_video(local, tool_timeout_s=cfg.tool_timeout_s)
            video_id = content_id(local)
            plan = plan_cuts(probe.duration_s, probe.keyframe_times, cfg.seconds, cfg.min_seconds, cfg.max_deviation_s, cfg.mode)
            media = f"{self.media_dir(ctx)}/{video_id}"
            workdir = ctx.workdir
            if workdir.is_local:
                written.add(media)
                files = cut_video(local, media, plan, stem=video_id, video_codec=cfg.video_codec, crf=cfg.crf, preset=cfg.preset, source=probe,
                                  tool_timeout_s=cfg.tool_timeout_s, flush="later")
                uris = [f.path for f in files]
            else:
                scratch = Path(tempfile.mkdtemp(prefix="lvr-clip-"))
                try:
                    # Scratch is uploaded and deleted: nothing to flush.
                    files = cut_video(local, scratch, plan, stem=video_id, video_codec=cfg.video_codec, crf=cfg.crf, preset=cfg.preset, source=probe,
                                  tool_timeout_s=cfg.tool_timeout_s, flush="never")
                    uris = []
                    for f in files:
                        target = f"{media}/{Path(f.path).name}"
                        workdir.fs.put(f.path, target)
                        uris.append(workdir.fs.unstrip_protocol(target))
                finally:
                    shutil.rmtree(scratch, ignore_errors=True)
        return _video_row(uri, video_id, probe, plan.mode, plan.max_snap_deviation_s, len(files)), [
            _clip_row(uri, video_id, probe, f, u) for f, u in zip(files, uris)
        ]

    def finalize(self, ctx, tables: dict[str, pa.Table], failures: list[Failure]):
        """The same bytes under two paths are one video: keep the first URI, report the others."""
        videos = tables[VIDEOS.name].to_pylist()
        seen: dict[str, str] = {}
        duplicates: set[str] = set()
        keep_videos = []
        for row in videos:
            first = seen.setdefault(row["video_id"], row["uri"])
            if first != row["uri"]:
                duplicates.add(row["uri"])
                failures.append(Failure(row["uri"], "duplicate", f"same content as {first} (video_id {row['video_id']})"))
            else:
                keep_videos.append(row)
        if not duplicates:
            return tables, failures
        clips = [r for r in tables[CLIPS.name].to_pylist() if r["source_uri"] not in duplicates]
        return {VIDEOS.name: VIDEOS.from_rows(keep_videos), CLIPS.name: CLIPS.from_rows(clips)}, failures


def _flush(folders: set[str]) -> None:
    """Make a shard's clips and their renames durable: one filesystem sync per device instead of
    an fsync per clip and folder. It runs before process_shard returns, so before the engine writes
    the tables and the marker that vouch for the clips."""
    devices: dict[int, str] = {}
    for folder in sorted(folders):
        try:
            devices.setdefault(os.stat(folder).st_dev, folder)
        except FileNotFoundError:  # the video failed before its folder was made
            continue
    for folder in devices.values():
        sync_filesystem(folder)


def _video_row(uri: str, video_id: str, probe: VideoProbe, mode: str, deviation: float, n_clips: int) -> dict[str, Any]:
    return {
        "video_id": video_id,
        "uri": uri,
        "size_bytes": probe.size_bytes,
        "duration_s": probe.duration_s,
        "fps": probe.fps,
        "width": probe.width,
        "height": probe.height,
        "rotation": probe.rotation,
        "video_codec": probe.video_codec,
        "pix_fmt": probe.pix_fmt,
        "has_audio": probe.has_audio,
        "audio_codec": probe.audio_codec,
        "container": probe.container,
        "bit_rate": probe.bit_rate,
        "n_frames": probe.n_frames,
        "n_keyframes": len(probe.keyframe_times),
        "clip_mode": mode,
        "max_snap_deviation_s": deviation,
        "n_clips": n_clips,
    }


def _clip_row(source_uri: str, video_id: str, probe: VideoProbe, clip: ClipFile, clip_uri: str) -> dict[str, Any]:
    return {
        "clip_id": f"{video_id}-{clip.index:05d}",
        "video_id": video_id,
        "clip_index": clip.index,
        "clip_uri": clip_uri,
        "source_uri": source_uri,
        "start_s": clip.start_s,
        "end_s": clip.end_s,
        "duration_s": clip.end_s - clip.start_s,
        "n_frames": clip.n_frames,
        "mode": clip.mode,
        "fps": probe.fps,
        "width": probe.width,
        "height": probe.height,
    }
