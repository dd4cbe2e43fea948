"""Media layer of the clip stage: identify, probe, plan cuts for and cut videos.

Plain functions over ffprobe/ffmpeg (always run with argv lists, never a shell);
orchestration, retries and storage live elsewhere.
"""

from __future__ import annotations

import bisect
import csv
import hashlib
import itertools
import json
import logging
import math
import os
import shutil
import stat
import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Literal, get_args

from tasks.engine.store import fsync_path, start_writeback

log = logging.getLogger("lvr.media")

FFMPEG = "ffmpeg"
FFPROBE = "ffprobe"
# A hung ffmpeg (a stalled network mount, a pathological file) must not hold a shard forever; an
# hour is far beyond any honest cut of one video on one core (`clip.tool_timeout_s`).
DEFAULT_TOOL_TIMEOUT_S = 3600.0

MediaErrorKind = Literal[
    "missing",
    "unreadable",
    "empty_file",
    "not_a_video",
    "no_video_stream",
    "corrupt",
    "ffmpeg_failed",
    "timeout",
]
CutMode = Literal["copy", "exact"]
Flush = Literal["now", "later", "never"]

_MIB = 1 << 20
_FULL_HASH_MAX_BYTES = 64 * _MIB
_HASH_SAMPLES = 32
_SAMPLE_BYTES = 64 << 10
_HASH_CHUNK_BYTES = 1 << 20
_STDERR_TAIL_CHARS = 2000
_SEGMENT_LIST = "segments.csv"
# How often a running tool is checked on while the caller works beside it.
_TOOL_POLL_S = 0.01
# A video whose packets stop well before its declared duration was cut short
# (e.g. an interrupted download of a file with its index at the front).
_TRUNCATION_TOLERANCE_S = 1.0
_TRUNCATION_TOLERANCE_FRACTION = 0.02
# Opening a file makes libavformat decode a frame or two of each stream to complete what it knows of
# them, unless no decoder may be used: the facts read here (sample tables, durations, timestamps)
# need none, and that decoding cost several times the rest of reading a clip's header.
_HEADER_ONLY = {"codec_whitelist": "none"}
# Video codecs whose MP4/MOV packets the demuxer passes through no parser: their keyframe flags are
# exactly the index's (stss), so keyframes can be found without reading every packet.
_INDEXED_KEYFRAME_CODECS = frozenset({"h264", "hevc"})
# A seek to a keyframe and the read of its packet cost about as much as reading this many packets in a row.
_PACKETS_PER_SEEK = 4


class MediaError(Exception):
    """A media file cannot be used; `kind` says why in a machine-checkable way."""

    def __init__(self, kind: MediaErrorKind, message: str) -> None:
        if kind not in get_args(MediaErrorKind):
            raise ValueError(f"unknown MediaError kind {kind!r}")
        # Both go to Exception.__init__ so the error survives pickling between
        # worker processes (pickle rebuilds exceptions from self.args).
        super().__init__(kind, message)
        self.kind: MediaErrorKind = kind
        self.message = message

    def __str__(self) -> str:
        return f"[{self.kind}] {self.message}"


@dataclass(frozen=True)
class VideoProbe:
    duration_s: float
    fps: float
    width: int  # as stored; see `rotation` for how it is displayed
    height: int
    video_codec: str
    pix_fmt: str
    rotation: int  # clockwise degrees a player turns the stored picture: 0, 90, 180 or 270
    has_audio: bool
    audio_codec: str | None
    container: str
    size_bytes: int
    bit_rate: int | None
    n_frames: int  # stream nb_frames when the container states it, else the packets counted
    keyframe_times: tuple[float, ...]  # seconds on ffmpeg's timeline (file start = 0)


@dataclass(frozen=True)
class CutPlan:
    cut_points: tuple[float, ...]
    mode: CutMode
    max_snap_deviation_s: float


@dataclass(frozen=True)
class ClipFile:
    index: int
    path: str
    start_s: float
    end_s: float
    n_frames: int
    mode: CutMode


@dataclass(frozen=True)
class _Packet:
    time_s: float
    duration_s: float
    is_keyframe: bool


def run_tool(
    argv: Sequence[str],
    *,
    stdin_path: Path | None = None,
    timeout_s: float | None = DEFAULT_TOOL_TIMEOUT_S,
    while_running: Callable[[], None] | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run ffmpeg/ffprobe from an argv list (never a shell); a missing binary is a MediaError, and so
    is a run longer than `timeout_s` (kind "timeout"; the process is killed; None: no limit).

    `while_running` is called every few milliseconds until the tool exits, so work on what it has
    already written overlaps the rest of the run. Output goes to temporary files, not pipes: a tool
    that prints much can never stall on a full pipe while nobody reads it.
    """
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    stdin_source = stdin_path.open("rb") if stdin_path is not None else nullcontext(subprocess.DEVNULL)
    with stdin_source as stdin, tempfile.TemporaryFile() as stdout, tempfile.TemporaryFile() as stderr:
        try:
            process = subprocess.Popen(list(argv), stdin=stdin, stdout=stdout, stderr=stderr)
        except FileNotFoundError as exc:
            raise MediaError(
                "ffmpeg_failed",
                f"{argv[0]!r} is not on PATH; install it (Debian package: ffmpeg): {exc}",
            ) from exc
        try:
            while True:
                wait_s = None if deadline is None else max(deadline - time.monotonic(), 0.0)
                if while_running is not None:
                    wait_s = _TOOL_POLL_S if wait_s is None else min(wait_s, _TOOL_POLL_S)
                try:
                    returncode = process.wait(timeout=wait_s)
                    break
                except subprocess.TimeoutExpired:
                    pass
                if deadline is not None and time.monotonic() >= deadline:
                    raise MediaError(
                        "timeout",
                        f"{Path(argv[0]).name} ran longer than its limit of {timeout_s:g} s (clip.tool_timeout_s) and was killed: "
                        f"{' '.join(argv)}",
                    )
                if while_running is not None:
                    while_running()
        finally:
            if process.poll() is None:  # timed out, or while_running raised: kill and reap it
                process.kill()
                process.wait()
        return subprocess.CompletedProcess(list(argv), returncode, _read_text(stdout), _read_text(stderr))


def _read_text(output: IO[bytes]) -> str:
    """A tool's output as subprocess's text mode decodes it (UTF-8, bad bytes replaced, universal newlines)."""
    output.seek(0)
    return output.read().decode("utf-8", errors="replace").replace("\r\n", "\n").replace("\r", "\n")


def stderr_tail(stderr: str) -> str:
    tail = stderr.strip()[-_STDERR_TAIL_CHARS:]
    return tail or "(no output on stderr)"


def content_id(path: str | os.PathLike[str]) -> str:
    """A stable id from the file's bytes (first 16 hex chars of a sha256): same bytes, same id.

    Files up to `_FULL_HASH_MAX_BYTES` are hashed whole. Larger ones hash their size, first and
    last MiB and `_HASH_SAMPLES` evenly spaced 64 KiB blocks: reading a multi-GB video only to
    name it would cost more than cutting it. Encoded video bytes are high-entropy and container
    indexes sit at the head or tail, so two different videos collide only if crafted to.
    """
    file = Path(path)
    size = _check_readable_file(file)
    digest = hashlib.sha256()
    with file.open("rb") as stream:
        if size <= _FULL_HASH_MAX_BYTES:
            while chunk := stream.read(_HASH_CHUNK_BYTES):
                digest.update(chunk)
        else:
            digest.update(f"sampled:{size}".encode())
            offsets = [0, size - _MIB] + [size * k // (_HASH_SAMPLES + 1) for k in range(1, _HASH_SAMPLES + 1)]
            for offset, length in zip(offsets, [_MIB, _MIB] + [_SAMPLE_BYTES] * _HASH_SAMPLES):
                stream.seek(offset)
                digest.update(stream.read(length))
    return digest.hexdigest()[:16]


def _check_readable_file(path: Path) -> int:
    """Size in bytes of a regular file we can open, else the matching MediaError."""
    try:
        info = path.stat()
    except (FileNotFoundError, NotADirectoryError) as exc:
        raise MediaError("missing", f"{path}: no such file") from exc
    except OSError as exc:
        raise MediaError("unreadable", f"{path}: cannot be read: {exc.strerror or exc}") from exc
    if stat.S_ISDIR(info.st_mode):
        raise MediaError("unreadable", f"{path}: is a directory, not a file")
    # Opening a FIFO or device for reading can block forever.
    if not stat.S_ISREG(info.st_mode):
        raise MediaError("unreadable", f"{path}: is not a regular file")
    try:
        with path.open("rb") as stream:
            stream.read(1)
    except OSError as exc:
        raise MediaError("unreadable", f"{path}: cannot be read: {exc.strerror or exc}") from exc
    return info.st_size


def probe_video(path: str | os.PathLike[str], *, tool_timeout_s: float | None = DEFAULT_TOOL_TIMEOUT_S) -> VideoProbe:
    """Describe a video file, or raise MediaError saying why it is unusable (each ffprobe run is
    limited to `tool_timeout_s`)."""
    file = Path(path)
    size_bytes = _check_readable_file(file)
    if size_bytes == 0:
        raise MediaError("empty_file", f"{file}: file is empty (0 bytes)")
    info = _ffprobe_container(file, tool_timeout_s)
    _reject_non_video_formats(file, str(info["format"].get("format_name", "")))
    video = _first_video_stream(file, info["streams"])
    audio = next((s for s in info["streams"] if s.get("codec_type") == "audio"), None)
    start_s = _float_or_none(info["format"].get("start_time")) or 0.0
    keyframe_times = _keyframes_from_index(file, info["format"], video, start_s, size_bytes, tool_timeout_s)
    if keyframe_times is not None:  # the index vouched for every packet: nothing else to read
        duration_s = float(video["duration"])
        n_frames = int(video["nb_frames"])
    else:
        packets = _read_video_packets(file, video["index"], start_s, tool_timeout_s)
        duration_s = _video_duration(file, info["format"], video, packets)
        keyframe_times = tuple(sorted(p.time_s for p in packets if p.is_keyframe))
        n_frames = _int_or_none(video.get("nb_frames")) or len(packets)
    if not keyframe_times:
        raise MediaError("corrupt", f"{file}: no video keyframe could be read")
    return VideoProbe(
        duration_s=duration_s,
        fps=_frame_rate(video) or n_frames / duration_s,
        width=int(video["width"]),
        height=int(video["height"]),
        video_codec=str(video.get("codec_name", "unknown")),
        pix_fmt=str(video.get("pix_fmt", "unknown")),
        rotation=_rotation_cw(video),
        has_audio=audio is not None,
        audio_codec=None if audio is None else str(audio.get("codec_name", "unknown")),
        container=str(info["format"].get("format_name", "unknown")),
        size_bytes=size_bytes,
        bit_rate=_int_or_none(info["format"].get("bit_rate")),
        n_frames=n_frames,
        keyframe_times=keyframe_times,
    )


def _ffprobe_container(file: Path, timeout_s: float | None) -> dict:
    result = run_tool(
        [FFPROBE, "-v", "error", "-show_format", "-show_streams", "-of", "json", str(file)], timeout_s=timeout_s
    )
    if result.returncode != 0:
        detected = _sniff_format(file, timeout_s)
        if detected is None:
            raise MediaError(
                "not_a_video",
                f"{file}: no ffmpeg demuxer recognises its content: {stderr_tail(result.stderr)}",
            )
        raise MediaError(
            "corrupt",
            f"{file}: looks like {detected} but cannot be read: {stderr_tail(result.stderr)}",
        )
    info = json.loads(result.stdout)
    info.setdefault("streams", [])
    info.setdefault("format", {})
    return info


def _sniff_format(file: Path, timeout_s: float | None) -> str | None:
    """Demuxer that recognises the bytes alone, or None.

    ffprobe falls back to the file extension when the content is unknown, so a
    text file named .mp4 fails exactly like a truncated mp4 does.  Feeding the
    bytes through a pipe hides the name; libavformat logs the probed format at
    debug level.
    """
    result = run_tool([FFPROBE, "-v", "debug", "-i", "pipe:0"], stdin_path=file, timeout_s=timeout_s)
    marker = "] Format "
    for line in result.stderr.splitlines():
        if marker in line and " probed with size=" in line:
            return line.split(marker, 1)[1].split(" probed with size=", 1)[0]
    return None


def _reject_non_video_formats(file: Path, format_name: str) -> None:
    """Refuse what ffmpeg can decode as pictures but is no video."""
    demuxers = format_name.split(",")
    if "tty" in demuxers:
        raise MediaError("not_a_video", f"{file}: is plain text (ffmpeg would render it as ANSI art)")
    if "image2" in demuxers or any(name.endswith("_pipe") for name in demuxers):
        raise MediaError("not_a_video", f"{file}: is a still image ({format_name}), not a video")


def _first_video_stream(file: Path, streams: list[dict]) -> dict:
    for stream in streams:
        # Cover art in audio files is a one-picture "video" stream.
        if stream.get("codec_type") == "video" and not stream.get("disposition", {}).get("attached_pic"):
            return stream
    found = ", ".join(str(s.get("codec_type")) for s in streams) or "none"
    raise MediaError("no_video_stream", f"{file}: no video stream (streams found: {found})")


def _read_video_packets(file: Path, stream_index: int, start_s: float, timeout_s: float | None) -> list[_Packet]:
    """The stream's packets, demuxed in-process with PyAV (the libav demuxer ffprobe uses).

    A second ffprobe process per video cost more than the demux itself. Times are those ffprobe
    prints (`ts * av_q2d(time_base)` rounded to the microsecond), so probes match the ffprobe ones
    exactly. Like ffprobe, a read error mid-file ends the packets (the duration check then calls
    the file truncated). `timeout_s` is checked between packets: a read blocked in the kernel is not cut short.
    """
    import av

    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    packets = []
    try:
        container = av.open(str(file))
    except (av.error.FFmpegError, OSError) as exc:
        raise MediaError("corrupt", f"{file}: video packets cannot be read: {exc}") from exc
    with container:
        stream = container.streams[stream_index]
        tb = stream.time_base
        seconds_per_tick = tb.numerator / tb.denominator
        try:
            for packet in container.demux(stream):
                if deadline is not None and len(packets) % 1024 == 0 and time.monotonic() > deadline:
                    raise MediaError(
                        "timeout",
                        f"{file}: reading its video packets took longer than the limit of {timeout_s:g} s (clip.tool_timeout_s)",
                    )
                ts = packet.pts if packet.pts is not None else packet.dts
                if ts is None:  # also demux()'s closing flush packet
                    continue
                # The ffmpeg CLI shifts inputs so the file starts at 0; cut times must use that timeline.
                packets.append(
                    _Packet(
                        round(ts * seconds_per_tick, 6) - start_s,
                        round(packet.duration * seconds_per_tick, 6) if packet.duration else 0.0,
                        packet.is_keyframe,
                    )
                )
        except av.error.FFmpegError as exc:
            log.debug("%s: packets end early at a read error: %s", file, exc)
    return packets


def _keyframes_from_index(
    file: Path, fmt: dict, video: dict, start_s: float, size_bytes: int, timeout_s: float | None
) -> tuple[float, ...] | None:
    """Keyframe times from the demuxer's index, or None where only reading every packet can tell.

    The MP4/MOV demuxer builds its index from the sample tables (stss marks the keyframes), so
    reading the whole file's packets to find its keyframes repeats work already done. The index
    holds decode timestamps while cut times are presentation timestamps (they differ under
    B-frames and edit lists), so each keyframe's own packet is read after a seek to it: the same
    packet, hence the same time, as a full read gives. The index vouches only when it lists the
    stream's declared frame count, every sample of every stream lies within the file (a full
    read would end early at the first one beyond it; such a file is read in full and reported
    truncated), the codec is one for which the demuxer sets no parser (a parser could flag
    keyframes the index does not), and the packets after the last keyframe reach the declared
    duration. Anything else is read in full, as before; so are videos whose keyframes are so
    dense that seeking to each costs more than reading everything.
    """
    import av

    n_frames = _int_or_none(video.get("nb_frames"))
    duration = _float_or_none(video.get("duration"))
    if (
        "mov" not in str(fmt.get("format_name", "")).split(",")
        or video.get("codec_name") not in _INDEXED_KEYFRAME_CODECS
        or not n_frames
        or duration is None
        or not (math.isfinite(duration) and duration > 0)
    ):
        return None
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    try:
        container = av.open(str(file), container_options=_HEADER_ONLY)
    except (av.error.FFmpegError, OSError):
        return None  # the full read reports why
    with container:
        stream = container.streams[video["index"]]
        if stream.type != "video":
            return None
        samples = [(e.timestamp, e.is_keyframe, e.pos + e.size) for e in stream.index_entries]
        if len(samples) != n_frames or max(end for _, _, end in samples) > size_bytes:
            return None
        for other in container.streams:
            if other.index != stream.index:
                if max((e.pos + e.size for e in other.index_entries), default=0) > size_bytes:
                    return None
                other.discard = av.stream.Discard.all  # seeks and reads skip its samples
        keyframe_dts = [ts for ts, is_keyframe, _ in samples if is_keyframe]
        if not keyframe_dts or any(a >= b for a, b in itertools.pairwise(keyframe_dts)):
            return None
        if len(keyframe_dts) * _PACKETS_PER_SEEK > len(samples):
            return None  # keyframes so dense that reading every packet costs less than a seek to each
        # A seek takes a presentation time, which the demuxer shifts onto the decode timeline by the
        # stream's reorder delay before it looks up the keyframe at or before it: aiming halfway to the
        # next keyframe lands on this one whatever that (small) shift; the packet read checks it did.
        stream_end = max(ts for ts, _, _ in samples) + 1
        ends = keyframe_dts[1:] + [stream_end + (stream_end - keyframe_dts[-1])]
        targets = [dts + (end - dts) // 2 for dts, end in zip(keyframe_dts, ends)]
        tb = stream.time_base
        seconds_per_tick = tb.numerator / tb.denominator
        times = []
        tail_end = 0.0
        try:
            for n, (dts, target) in enumerate(zip(keyframe_dts, targets)):
                if deadline is not None and time.monotonic() > deadline:
                    raise MediaError(
                        "timeout",
                        f"{file}: reading its keyframes took longer than the limit of {timeout_s:g} s (clip.tool_timeout_s)",
                    )
                container.seek(target, stream=stream)
                packets = container.demux(stream)
                packet = next(packets)
                if packet.dts != dts or not packet.is_keyframe or packet.pts is None:
                    return None
                times.append(round(packet.pts * seconds_per_tick, 6) - start_s)
                if n == len(keyframe_dts) - 1:  # the packets from the last keyframe on end the stream
                    for p in itertools.chain([packet], packets):
                        ts = p.pts if p.pts is not None else p.dts
                        if ts is not None:
                            end = round(ts * seconds_per_tick, 6) - start_s
                            end += round(p.duration * seconds_per_tick, 6) if p.duration else 0.0
                            tail_end = max(tail_end, end)
        except (av.error.FFmpegError, StopIteration):
            return None
    if _falls_short(duration, tail_end):
        return None  # the full read decides, and words the error
    return tuple(sorted(times))


def _falls_short(declared: float, readable_end: float) -> bool:
    """Whether readable packets end too long before the declared duration (a truncated file)."""
    # Containers such as Matroska only declare the whole file's duration, which a
    # longer audio track can exceed, hence the proportional slack.
    return readable_end < declared - max(_TRUNCATION_TOLERANCE_S, _TRUNCATION_TOLERANCE_FRACTION * declared)


def _video_duration(file: Path, fmt: dict, video: dict, packets: list[_Packet]) -> float:
    stream_duration = _float_or_none(video.get("duration"))
    declared = stream_duration if stream_duration is not None else _float_or_none(fmt.get("duration"))
    readable_end = max((p.time_s + p.duration_s for p in packets), default=0.0)
    if declared is not None and _falls_short(declared, readable_end):
        raise MediaError(
            "corrupt",
            f"{file}: video packets stop at {readable_end:.3f} s but the file declares "
            f"{declared:.3f} s (truncated?)",
        )
    duration = stream_duration if stream_duration is not None else readable_end
    if not (math.isfinite(duration) and duration > 0):
        raise MediaError("corrupt", f"{file}: video duration is unknown or zero")
    return duration


def _frame_rate(video: dict) -> float | None:
    for key in ("avg_frame_rate", "r_frame_rate"):
        num, _, den = str(video.get(key, "0/0")).partition("/")
        try:
            rate = float(num) / float(den or 1)
        except (ValueError, ZeroDivisionError):
            continue
        if rate > 0:
            return rate
    return None


def _rotation_cw(video: dict) -> int:
    """Clockwise display rotation, the convention of the legacy `rotate` tag.

    libavutil reports a display matrix's angle counter-clockwise, hence the sign flip.
    """
    for side_data in video.get("side_data_list", []):
        if side_data.get("side_data_type") == "Display Matrix" and "rotation" in side_data:
            return round(-float(side_data["rotation"])) % 360
    tag = video.get("tags", {}).get("rotate")
    return round(float(tag)) % 360 if tag is not None else 0


def _float_or_none(value: object) -> float | None:
    try:
        return float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None


def _int_or_none(value: object) -> int | None:
    try:
        return int(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None


def plan_cuts(
    duration_s: float,
    keyframe_times: Sequence[float],
    seconds: float,
    min_seconds: float,
    max_deviation_s: float,
    mode: str,
) -> CutPlan:
    """Choose where to cut a video into clips of about `seconds` each.

    In copy mode cuts must land on keyframes (stream copy cannot cut elsewhere),
    so each target mark snaps to its nearest keyframe; if that moves any cut by
    more than `max_deviation_s` the video is re-encoded (exact mode) instead.
    """
    _validate_plan_args(duration_s, seconds, min_seconds, max_deviation_s, mode)
    marks = _target_marks(duration_s, seconds, min_seconds)
    exact = CutPlan(cut_points=marks, mode="exact", max_snap_deviation_s=0.0)
    if mode == "exact":
        return exact
    keyframes = sorted(keyframe_times)
    snapped = [(_nearest(keyframes, mark), mark) for mark in marks] if keyframes else []
    # No keyframes, or one mark far from every keyframe: copy mode would miss the clip length badly.
    if marks and (not snapped or any(abs(cut - mark) > max_deviation_s for cut, mark in snapped)):
        return exact
    kept = _drop_short_clips(snapped, duration_s, min_seconds)
    return CutPlan(
        cut_points=tuple(cut for cut, _ in kept),
        mode="copy",
        max_snap_deviation_s=max((abs(cut - mark) for cut, mark in kept), default=0.0),
    )


def _validate_plan_args(
    duration_s: float, seconds: float, min_seconds: float, max_deviation_s: float, mode: str
) -> None:
    if mode not in get_args(CutMode):
        raise ValueError(f"mode must be one of {get_args(CutMode)}, got {mode!r}")
    if not duration_s > 0:
        raise ValueError(f"duration_s must be > 0, got {duration_s}")
    if not seconds > 0:
        raise ValueError(f"seconds must be > 0, got {seconds}")
    # A tail shorter than min_seconds merges into the previous clip; that only
    # yields clips of at least min_seconds when min_seconds <= seconds.
    if not 0 <= min_seconds <= seconds:
        raise ValueError(f"min_seconds must be within [0, seconds={seconds}], got {min_seconds}")
    if not max_deviation_s >= 0:
        raise ValueError(f"max_deviation_s must be >= 0, got {max_deviation_s}")


def _target_marks(duration_s: float, seconds: float, min_seconds: float) -> tuple[float, ...]:
    # k * seconds rather than a running sum, so marks do not drift by rounding.
    last_k = math.ceil(duration_s / seconds)
    marks = [float(k * seconds) for k in range(1, last_k + 1) if k * seconds < duration_s]
    if marks and duration_s - marks[-1] < min_seconds:
        marks.pop()
    return tuple(marks)


def _drop_short_clips(
    snapped: list[tuple[float, float]], duration_s: float, min_seconds: float
) -> list[tuple[float, float]]:
    """Keep (cut, mark) pairs, in order, whose clips all last at least min_seconds."""
    kept: list[tuple[float, float]] = []
    for cut, mark in snapped:
        previous = kept[-1][0] if kept else 0.0
        if cut > previous and cut - previous >= min_seconds:
            kept.append((cut, mark))
    while kept and duration_s - kept[-1][0] < min_seconds:
        kept.pop()
    return kept


def _nearest(sorted_values: Sequence[float], target: float) -> float:
    """Value closest to target, the earlier one on a tie; sorted_values must not be empty."""
    i = bisect.bisect_left(sorted_values, target)
    candidates = sorted_values[max(i - 1, 0) : i + 1]
    return min(candidates, key=lambda v: (abs(v - target), v))


def cut_video(
    src: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    plan: CutPlan,
    *,
    stem: str,
    video_codec: str = "libx264",
    crf: int = 23,
    preset: str = "veryfast",
    threads: int = 0,
    source: VideoProbe | None = None,
    tool_timeout_s: float | None = DEFAULT_TOOL_TIMEOUT_S,
    flush: Flush = "now",
) -> list[ClipFile]:
    """Cut `src` by `plan` in one ffmpeg pass (limited to `tool_timeout_s`); return the clips with their true times.

    Times come from what ffmpeg actually wrote (its segment list plus one in-process header
    read of each file), not from the plan, so a cut that lands elsewhere is still recorded
    truthfully. Each clip is measured as soon as ffmpeg has finished it, while it cuts the next
    ones. Clips appear under their final names only once all are complete. `flush` says who
    makes them durable: "now", each clip and then `out_dir` are flushed before this returns;
    "later", the caller flushes them (`sync_filesystem`, once for many videos) before anything
    vouches for them, and each clip's write-back to disk starts as soon as it is finished so
    that flush finds little left to wait for; "never", for scratch copies uploaded elsewhere.
    """
    if not stem or Path(stem).name != stem:
        raise ValueError(f"stem must be a bare file name prefix, got {stem!r}")
    if flush not in get_args(Flush):
        raise ValueError(f"flush must be one of {get_args(Flush)}, got {flush!r}")
    source = source or probe_video(src, tool_timeout_s=tool_timeout_s)  # callers that planned the cut have probed already
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{stem}-", suffix=".partial", dir=out))
    measured: dict[str, tuple[float, int]] = {}

    def measure_finished_segments() -> None:
        # The muxer lists a segment as it ends it; one listed before another is closed for good.
        for name in _listed_segments(work)[:-1]:
            if name not in measured:
                try:
                    measured[name] = measure_clip(work / name)
                except MediaError:
                    continue  # measured again once ffmpeg is done, which reports it in order
                if flush != "never":
                    start_writeback(work / name)

    try:
        argv = _segment_argv(Path(src), work, plan, source, stem, video_codec, crf, preset, threads)
        result = run_tool(argv, timeout_s=tool_timeout_s, while_running=measure_finished_segments)
        if result.returncode != 0:
            raise MediaError("ffmpeg_failed", f"cutting {src} failed: {stderr_tail(result.stderr)}")
        clips = _measure_segments(work, out, plan.mode, 1.0 / source.fps, measured)
        for clip in clips:  # durable before the shard's marker vouches for them
            if flush == "now":
                fsync_path(work / Path(clip.path).name)
            os.replace(work / Path(clip.path).name, clip.path)
        if flush == "now":
            fsync_path(out)
        return clips
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _listed_segments(work: Path) -> list[str]:
    """Names of the segments ffmpeg has listed so far (complete lines of its segment list)."""
    try:
        text = (work / _SEGMENT_LIST).read_text()
    except FileNotFoundError:
        return []
    complete = text[: text.rfind("\n") + 1]
    return [row[0] for row in csv.reader(complete.splitlines()) if row]


def _segment_argv(
    src: Path,
    work: Path,
    plan: CutPlan,
    source: VideoProbe,
    stem: str,
    video_codec: str,
    crf: int,
    preset: str,
    threads: int,
) -> list[str]:
    times = ",".join(f"{t:.6f}" for t in plan.cut_points)
    if plan.mode == "copy":
        codec_args = ["-c", "copy"]
    else:
        codec_args = [
            "-c:v", video_codec, "-crf", str(crf), "-preset", preset, "-threads", str(threads),
            # ffmpeg treats segment output as constant-rate and would duplicate or drop
            # frames of a variable-rate source; clips must keep the source's frames.
            "-fps_mode", "passthrough",
            *(["-force_key_frames", times] if times else []),
            "-c:a", "aac",
        ]
    # Without -segment_times the muxer falls back to 2 s segments; a single clip
    # needs a segment length beyond the end of the video instead.
    split_args = (
        ["-segment_times", times] if times else ["-segment_time", str(math.ceil(source.duration_s) + 1)]
    )
    return [
        FFMPEG, "-hide_banner", "-nostdin", "-v", "error", "-y",
        "-i", str(src),
        # V excludes cover art; the trailing ? makes audio optional.
        "-map", "0:V:0", "-map", "0:a:0?",
        *codec_args,
        # Keep the source timeline: the default shift for negative (priming)
        # timestamps would offset every segment-list time and delay clip 0's video.
        "-avoid_negative_ts", "disabled",
        "-f", "segment", "-segment_format", "mp4",
        *split_args,
        # Printed cut times are rounded to the microsecond and can land just after
        # the keyframe they name; half a frame of slack makes the cut happen on it.
        "-segment_time_delta", f"{0.5 / source.fps:.6f}",
        "-segment_list", str(work / _SEGMENT_LIST), "-segment_list_type", "csv",
        "-reset_timestamps", "1",
        str(work / f"{stem.replace('%', '%%')}-%05d.mp4"),
    ]


def _measure_segments(
    work: Path, out: Path, mode: CutMode, frame_s: float, measured: dict[str, tuple[float, int]]
) -> list[ClipFile]:
    """The clips ffmpeg listed, with their measured times; `measured` holds those measured already."""
    with (work / _SEGMENT_LIST).open(newline="") as listing:
        rows = [row for row in csv.reader(listing) if row]
    clips = []
    for index, (name, start, listed_end) in enumerate(rows):
        duration_s, n_frames = measured[name] if name in measured else measure_clip(work / name)
        start_s = float(start)
        end_s = start_s + duration_s
        if abs(end_s - float(listed_end)) > frame_s:
            raise MediaError(
                "ffmpeg_failed",
                f"segment {name}: ffmpeg listed it as ending at {listed_end} s but the written "
                f"file runs {start_s:.6f}+{duration_s:.6f} s",
            )
        clips.append(ClipFile(index, str(out / name), start_s, end_s, n_frames, mode))
    return clips


def measure_clip(path: str | os.PathLike[str]) -> tuple[float, int]:
    """(duration in seconds, exact frame count) of a clip's first video stream.

    Read in-process with PyAV (the same libav demuxer as ffprobe, same numbers), from the header
    alone with no frame decoded: a clip stage measures every clip it writes, and an ffprobe process
    per clip cost more than the cut itself.
    """
    import av

    file = Path(path)
    _check_readable_file(file)
    try:
        with av.open(str(file), container_options=_HEADER_ONLY) as container:
            if not container.streams.video:
                raise MediaError("no_video_stream", f"{file}: no video stream")
            stream = container.streams.video[0]
            # Our clips are MP4s whose sample table gives the exact frame count without reading
            # the data; other containers are counted packet by packet (demux() ends with an
            # empty flush packet, which is not a frame).
            n_frames = stream.frames or sum(1 for packet in container.demux(stream) if packet.size > 0)
            if stream.duration is not None:
                duration = float(stream.duration * stream.time_base)
            elif container.duration is not None:
                duration = container.duration / av.time_base
            else:
                raise MediaError("corrupt", f"{file}: duration unknown")
    except av.error.FFmpegError as exc:
        raise MediaError("corrupt", f"{file}: cannot be measured: {exc}") from exc
    return duration, n_frames
