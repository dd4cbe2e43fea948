"""Our own video frame sampling and Qwen2-VL / Qwen2.5-VL video preprocessing.

Why this exists: transformers' Qwen2-VL *video* processor (and torchcodec-based video loading)
needs torchvision, which we cannot install.  This module reproduces exactly what the
PIL-backend Qwen2-VL processing does (``Qwen2VLImageProcessorPil`` in transformers 5.x: PIL
bicubic resize to :func:`smart_resize` size, x/255, CLIP mean/std) and lays the patches out the
way ``Qwen2VLVideoProcessor.patchify`` does, with numpy + PIL only.

Pipeline::

    frames = read_frames(path, FrameSampling(num_frames=16))          # SampledFrames, (T,H,W,3) uint8
    inputs = build_video_inputs(tokenizer, messages, [frames], cfg)   # ready for model(**inputs) / generate

:func:`read_frames` is THE frame-sampling function every stage uses (dataset building, training,
evaluation), so frame indices and timestamps agree everywhere.

Frame sampling rules (:func:`sample_frame_indices`):

* The frames considered are those whose timestamp ``i / fps`` lies in ``[start_s, end_s)``
  (the whole video by default).
* ``num_frames`` mode asks for that many frames; ``fps`` mode asks for
  ``round(span_seconds * fps)`` frames clamped to ``[min_frames, max_frames]`` (``max_frames``
  first floored to a multiple of the temporal patch size).
* The count is rounded UP to a multiple of the temporal patch size (2): the model pays for a
  whole temporal patch anyway, so 7 requested frames give 8 distinct frames, not 7 plus a copy.
* The count is capped at the number of frames in the range (the same frame is never sampled
  twice to fill a quota), and the indices are the centres of ``m`` equal segments:
  ``lo + ((2k + 1) * n_avail) // (2m)`` - strictly increasing, uniform (gaps differ by at most
  one frame), inside the range.
* Only when that cap leaves an odd count (a range of 1, 3, 5... frames) is the last index
  repeated once, which is exactly how Qwen's video processor pads an odd-length clip
  (``patchify`` repeats the last frame), so nothing downstream changes shape.

Video token budgets (:class:`VideoTokenBudget`, :func:`budgeted_preprocess`): without one, each
frame gets the checkpoint's per-frame pixel limit (512 frames of 720p are ~300K tokens for
Qwen2.5-VL-7B).  A budget caps the tokens per frame and/or per video; every frame then gets the
largest of Qwen's smart_resize sizes that fits (:func:`frame_size`), the same way wherever lvr
preprocesses video, and :func:`max_video_tokens_for` / :func:`worst_case_frames` bound a setting's
tokens for any input without decoding anything.
"""

from __future__ import annotations

import json
import math
import numbers
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from fractions import Fraction
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch

# transformers.image_utils.OPENAI_CLIP_MEAN / OPENAI_CLIP_STD (Qwen2-VL's normalisation).
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

VIDEO_PREPROCESSOR_FILE = "lvr_video_preprocessor.json"
VIDEO_TOKEN = "<|video_pad|>"
# The values of mm_token_type_ids (what get_rope_index reads): text, image, video.
TEXT_TOKEN_TYPE, IMAGE_TOKEN_TYPE, VIDEO_TOKEN_TYPE = 0, 1, 2
IMAGE_TOKEN = "<|image_pad|>"

_UNSET: Any = object()


def token_types(input_ids: torch.Tensor, video_token_id: int, image_token_id: int | None = None) -> torch.Tensor:
    """`mm_token_type_ids` read off the token ids: video (and image) pad tokens, the rest text."""
    types = (input_ids == video_token_id).long() * VIDEO_TOKEN_TYPE
    if image_token_id is not None:
        types += (input_ids == image_token_id).long() * IMAGE_TOKEN_TYPE
    return types


class VideoReadError(RuntimeError):
    """A video file could not be opened or decoded by any backend."""


# ---------------------------------------------------------------------------------------------
# Frame sampling
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class FrameSampling:
    """How many frames to take from a video (or a time range of it).

    Exactly one of ``num_frames`` / ``fps``.  ``FrameSampling()`` means 16 frames;
    ``FrameSampling(fps=1.0)`` means one frame per second (``num_frames`` then defaults to None),
    clamped to ``[min_frames, max_frames]``.  ``min_frames`` / ``max_frames`` only apply in
    ``fps`` mode.  ``temporal_patch_size``: the returned count is a multiple of it.
    """

    num_frames: int | None = _UNSET  # 16 unless fps is given
    fps: float | None = None
    min_frames: int = 4
    max_frames: int = 64
    temporal_patch_size: int = 2

    def __post_init__(self) -> None:
        if self.num_frames is _UNSET:
            object.__setattr__(self, "num_frames", None if self.fps is not None else 16)
        if (self.num_frames is None) == (self.fps is None):
            raise ValueError(
                f"FrameSampling needs exactly one of num_frames / fps, got num_frames={self.num_frames}, fps={self.fps}"
            )
        if self.num_frames is not None:
            if isinstance(self.num_frames, bool) or not isinstance(self.num_frames, numbers.Integral) or self.num_frames < 1:
                raise ValueError(f"num_frames must be a positive int, got {self.num_frames!r}")
            object.__setattr__(self, "num_frames", int(self.num_frames))
        if self.fps is not None and not (self.fps > 0 and math.isfinite(self.fps)):
            raise ValueError(f"fps must be a positive number, got {self.fps!r}")
        if not (1 <= self.min_frames <= self.max_frames):
            raise ValueError(f"need 1 <= min_frames <= max_frames, got {self.min_frames}, {self.max_frames}")
        if self.temporal_patch_size < 1:
            raise ValueError(f"temporal_patch_size must be >= 1, got {self.temporal_patch_size}")


def frame_range(
    total_frames: int, video_fps: float, start_s: float | None = None, end_s: float | None = None
) -> tuple[int, int]:
    """Half-open index range ``[lo, hi)`` of the frames with ``start_s <= i / fps < end_s``.

    ``start_s`` / ``end_s`` default to the video's start / end and are clipped to it.  A range
    that is valid but falls between two frames yields the one frame at or before ``start_s``.
    Raises ``ValueError`` for an empty video, a bad fps, ``end_s <= start_s``, or a range
    entirely outside the video.
    """
    if total_frames < 1:
        raise ValueError(f"video has no frames (total_frames={total_frames})")
    if not (video_fps > 0 and math.isfinite(video_fps)):
        raise ValueError(f"video_fps must be a positive number, got {video_fps!r}")
    duration = total_frames / video_fps
    start = 0.0 if start_s is None else float(start_s)
    end = duration if end_s is None else float(end_s)
    if end <= start:
        raise ValueError(f"empty time range: start_s={start_s}, end_s={end_s}")
    if start >= duration or end <= 0:
        raise ValueError(f"time range [{start_s}, {end_s}) s lies outside the video (duration {duration:.3f} s)")
    start, end = max(start, 0.0), min(end, duration)
    eps = 1e-9
    lo = max(0, math.ceil(start * video_fps - eps))
    hi = min(total_frames, math.ceil(end * video_fps - eps))
    if hi <= lo:  # the range sits between two frame timestamps
        lo = min(total_frames - 1, max(0, math.floor(start * video_fps + eps)))
        hi = lo + 1
    return lo, hi


def sample_frame_indices(
    total_frames: int,
    video_fps: float,
    sampling: FrameSampling,
    start_s: float | None = None,
    end_s: float | None = None,
) -> list[int]:
    """Uniformly spaced frame indices (see the module docstring for the exact rules).

    Always non-decreasing, inside ``frame_range(...)``, length a positive multiple of
    ``sampling.temporal_patch_size``; all distinct except when the range holds fewer frames
    than that, where the last index is repeated to fill the temporal patch.
    """
    lo, hi = frame_range(total_frames, video_fps, start_s, end_s)
    n_avail = hi - lo
    tp = sampling.temporal_patch_size
    if sampling.num_frames is not None:
        n = sampling.num_frames
    else:
        max_frames = max(tp, sampling.max_frames // tp * tp)
        n = round(n_avail / video_fps * sampling.fps)
        n = min(max(n, sampling.min_frames), max_frames)
    n = -(-n // tp) * tp  # round up to a multiple of the temporal patch size
    m = max(1, min(n, n_avail))  # never more distinct frames than the range holds
    indices = [lo + ((2 * k + 1) * n_avail) // (2 * m) for k in range(m)]
    if pad := -m % tp:  # only when the range is short: repeat the last frame (as Qwen's patchify does)
        indices.extend([indices[-1]] * pad)
    return indices


# ---------------------------------------------------------------------------------------------
# Decoding
# ---------------------------------------------------------------------------------------------
@dataclass
class SampledFrames:
    """Frames sampled from one video.

    ``frames``: (T, H, W, 3) uint8 RGB.  ``timestamps_s[i] = indices[i] / source_fps``.
    ``sampled_fps``: frames per second of the sample over the span it covers
    (``T / span_seconds``) - what Qwen calls the video fps when computing
    ``second_per_grid_ts = temporal_patch_size / fps``.  ``span_s``: the (start, end) seconds of the
    frame range sampled from.  ``total_frames``: frames in the whole source video.
    """

    frames: np.ndarray
    timestamps_s: list[float]
    indices: list[int]
    source_fps: float
    backend: str
    sampled_fps: float = 0.0
    span_s: tuple[float, float] = (0.0, 0.0)
    total_frames: int = 0

    def __len__(self) -> int:
        return int(self.frames.shape[0])


class _DecordReader:
    name = "decord"

    def __init__(self, path: str):
        import decord

        self._vr = decord.VideoReader(path, ctx=decord.cpu(0), num_threads=1)
        self.total_frames = len(self._vr)
        self.fps = float(self._vr.get_avg_fps())
        if self.total_frames < 1 or not (self.fps > 0):
            raise VideoReadError(f"decord: no frames or no frame rate (frames={self.total_frames}, fps={self.fps})")

    def read(self, indices: list[int]) -> np.ndarray:
        uniq = sorted(set(indices))
        batch = self._vr.get_batch(uniq).asnumpy()
        pos = {idx: i for i, idx in enumerate(uniq)}
        return np.ascontiguousarray(batch[[pos[i] for i in indices]])

    def close(self) -> None:
        self._vr = None


class _PyAVReader:
    """PyAV decoding of chosen frame indices.

    A frame's index is ``round((pts - stream.start_time) * time_base * fps)`` (its ordinal
    position for constant-frame-rate video, which is how decord counts).  Seeks to the keyframe
    before the first wanted frame rather than decoding from the start.  A wanted index never hit
    exactly (gaps in the timestamps) takes the first decoded frame past it; indices at most
    ``_PYAV_END_SLACK`` frames past the end of the stream take the last frame, beyond that the
    file is reported as truncated (decord instead indexes only the frames that exist).
    """

    name = "pyav"

    def __init__(self, path: str):
        import av

        self._c = av.open(path)
        try:
            if not self._c.streams.video:
                raise VideoReadError("PyAV: no video stream")
            stream = self._c.streams.video[0]
            rate = stream.average_rate or stream.guessed_rate or stream.base_rate
            if not rate:
                raise VideoReadError("PyAV: the video stream has no frame rate")
            self.fps = float(rate)
            self._fps = Fraction(rate)
            total = int(stream.frames or 0)
            if total <= 0:  # e.g. webm / mkv do not store a frame count
                if stream.duration is not None and stream.time_base is not None:
                    seconds = float(stream.duration * stream.time_base)
                elif self._c.duration is not None:
                    seconds = self._c.duration / 1_000_000  # in av.time_base units
                else:
                    seconds = 0.0
                total = int(round(seconds * self.fps))
            if total <= 0:  # last resort: count them
                total = sum(1 for _ in self._c.decode(stream))
                self._c.seek(0)
            if total <= 0:
                raise VideoReadError("PyAV: the video has no frames")
            self.total_frames = total
        except BaseException:
            self._c.close()
            raise

    def read(self, indices: list[int]) -> np.ndarray:
        stream = self._c.streams.video[0]
        stream.thread_type = "AUTO"
        tb = stream.time_base or Fraction(1, 1)
        t0 = stream.start_time or 0
        wanted = sorted(set(indices))
        if wanted[0] > 0:
            target = t0 + math.floor(Fraction(wanted[0]) / self._fps / tb)
            self._c.seek(max(int(target) - 1, 0), stream=stream, backward=True, any_frame=False)
        got: dict[int, np.ndarray] = {}
        k = 0
        last = None
        last_idx = -1
        for frame in self._c.decode(stream):
            if frame.pts is None:
                continue
            idx = round((frame.pts - t0) * tb * self._fps)
            last_idx = max(last_idx, idx)
            if idx < wanted[k]:
                continue
            img = frame.to_ndarray(format="rgb24")
            last = img
            while k < len(wanted) and wanted[k] <= idx:
                got[wanted[k]] = img
                k += 1
            if k == len(wanted):
                break
        if k < len(wanted):
            # The container promised more frames than it delivered.  A frame or two short is
            # normal (frame counts estimated from the duration); more means a truncated file.
            if last is None or wanted[-1] - last_idx > _PYAV_END_SLACK:
                raise VideoReadError(
                    f"PyAV: stream ended at frame {last_idx} but frame {wanted[-1]} was wanted "
                    f"(container claims {self.total_frames} frames; truncated file?)"
                )
            for w in wanted[k:]:
                got[w] = last
        return np.stack([got[i] for i in indices])

    def close(self) -> None:
        self._c.close()


_PYAV_END_SLACK = 2
_READERS = {"decord": _DecordReader, "pyav": _PyAVReader}


def read_frames(
    path: str | os.PathLike,
    sampling: FrameSampling | None = None,
    *,
    start_s: float | None = None,
    end_s: float | None = None,
    backend: str = "auto",
) -> SampledFrames:
    """Sample frames from ``path`` (optionally only from ``[start_s, end_s)`` seconds).

    ``backend``: ``"decord"``, ``"pyav"``, or ``"auto"`` (decord, falling back to PyAV if decord
    is missing or fails on the file).  Both backends return the same indices and timestamps, and
    (up to colour-conversion rounding) the same pixels.  Raises ``FileNotFoundError`` for a
    missing file, ``VideoReadError`` for a file no backend can decode, ``ValueError`` for a bad
    time range or sampling.
    """
    sampling = sampling or FrameSampling()
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"video not found: {p}")
    if backend not in ("auto", "decord", "pyav"):
        raise ValueError(f"backend must be 'auto', 'decord' or 'pyav', got {backend!r}")
    order = ["decord", "pyav"] if backend == "auto" else [backend]
    errors: list[str] = []
    for name in order:
        try:
            reader = _READERS[name](str(p))
        except Exception as exc:  # ImportError, decord.DECORDError, av.error.*, VideoReadError
            errors.append(f"{name}: {type(exc).__name__}: {exc}")
            continue
        try:
            # A ValueError here (bad time range) is the caller's mistake: let it propagate.
            indices = sample_frame_indices(reader.total_frames, reader.fps, sampling, start_s, end_s)
            lo, hi = frame_range(reader.total_frames, reader.fps, start_s, end_s)
            try:
                frames = reader.read(indices)
            except Exception as exc:
                errors.append(f"{name}: {type(exc).__name__}: {exc}")
                continue
        finally:
            reader.close()
        if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8 or len(frames) != len(indices):
            errors.append(f"{name}: unexpected frame array {frames.shape} {frames.dtype}")
            continue
        span = (lo / reader.fps, hi / reader.fps)
        return SampledFrames(
            frames=frames,
            timestamps_s=[i / reader.fps for i in indices],
            indices=list(indices),
            source_fps=reader.fps,
            backend=name,
            sampled_fps=len(indices) / (span[1] - span[0]),
            span_s=span,
            total_frames=reader.total_frames,
        )
    raise VideoReadError(f"cannot read video {p}: " + "; ".join(errors))


# ---------------------------------------------------------------------------------------------
# Preprocessing (Qwen2-VL layout)
# ---------------------------------------------------------------------------------------------
def smart_resize(
    height: int, width: int, factor: int = 28, min_pixels: int = 56 * 56, max_pixels: int = 14 * 14 * 4 * 1280
) -> tuple[int, int]:
    """Qwen2-VL's smart_resize (identical to ``transformers...qwen2_vl...smart_resize``).

    Both sides divisible by ``factor``, ``min_pixels <= h*w <= max_pixels`` (as nearly as the
    grid allows), aspect ratio kept as closely as possible.
    """
    if max(height, width) / min(height, width) > 200:
        raise ValueError(
            f"absolute aspect ratio must be smaller than 200, got {max(height, width) / min(height, width)}"
        )
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


@dataclass(frozen=True)
class VideoPreprocessConfig:
    """Qwen2-VL video preprocessing parameters.

    Defaults are those of transformers' ``Qwen2VLVideoProcessor`` (per frame
    ``min_pixels = 128*28*28``, ``max_pixels = 768*28*28``).  The tiny test model ships its own
    (smaller) values in ``lvr_video_preprocessor.json``: load them with :meth:`from_pretrained`.

    ``max_tokens_per_temporal_patch``: a token budget's cap (set by :func:`budgeted_preprocess`,
    never by a checkpoint) on the tokens of one temporal patch, i.e. of ``temporal_patch_size``
    frames: ``grid_h * grid_w / merge_size**2``.  None: frames are sized by Qwen's rule alone
    (see :func:`frame_size`).
    """

    patch_size: int = 14
    merge_size: int = 2
    temporal_patch_size: int = 2
    min_pixels: int = 128 * 28 * 28
    max_pixels: int = 768 * 28 * 28
    image_mean: tuple[float, float, float] = OPENAI_CLIP_MEAN
    image_std: tuple[float, float, float] = OPENAI_CLIP_STD
    rescale_factor: float = 1 / 255
    max_tokens_per_temporal_patch: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "image_mean", tuple(float(x) for x in self.image_mean))
        object.__setattr__(self, "image_std", tuple(float(x) for x in self.image_std))
        if not (0 < self.min_pixels <= self.max_pixels):
            raise ValueError(f"need 0 < min_pixels <= max_pixels, got {self.min_pixels}, {self.max_pixels}")
        if self.max_tokens_per_temporal_patch is not None and self.max_tokens_per_temporal_patch < 1:
            raise ValueError(f"max_tokens_per_temporal_patch must be >= 1, got {self.max_tokens_per_temporal_patch}")

    @property
    def factor(self) -> int:
        return self.patch_size * self.merge_size

    def to_dict(self) -> dict:
        d = asdict(self)
        d["image_mean"] = list(self.image_mean)
        d["image_std"] = list(self.image_std)
        d["processor"] = "lvr.models.video.VideoPreprocessConfig"
        d["resample"] = "PIL.BICUBIC"
        return d

    @classmethod
    def from_dict(cls, d: dict) -> VideoPreprocessConfig:
        names = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in d.items() if k in names})

    def save_pretrained(self, folder: str | os.PathLike) -> Path:
        out = Path(folder) / VIDEO_PREPROCESSOR_FILE
        out.write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n", encoding="utf-8")
        return out

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike) -> VideoPreprocessConfig:
        return cls.from_dict(json.loads((Path(folder) / VIDEO_PREPROCESSOR_FILE).read_text(encoding="utf-8")))


# ---------------------------------------------------------------------------------------------
# Frame size and video token budgets
# ---------------------------------------------------------------------------------------------
MAX_ASPECT_RATIO = 200  # smart_resize refuses frames at least this elongated
_NUDGE = 1e-9  # relative: just below / above a max_pixels at which smart_resize's size steps


@dataclass(frozen=True)
class VideoTokenBudget:
    """How many LLM tokens one video may take: either limit, both (the tighter wins) or neither.

    Qwen2-VL packs ``temporal_patch_size`` (2) consecutive frames into one temporal patch of
    ``grid_h * grid_w / merge_size**2`` tokens, and a video takes ``grid_t`` of them.
    ``tokens_per_frame`` counts video tokens per sampled frame, ``tokens / (grid_t *
    temporal_patch_size)`` (a video is padded to whole temporal patches): T tokens per frame let
    a frame pair take 2T tokens, frames of up to ``2T * (patch_size * merge_size)**2`` pixels.
    ``max_video_tokens``: all of one video's tokens, however many frames were sampled.
    """

    tokens_per_frame: int | None = None
    max_video_tokens: int | None = None

    def __post_init__(self) -> None:
        for name in ("tokens_per_frame", "max_video_tokens"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1):
                raise ValueError(f"{name} must be a positive int or None, got {value!r}")

    def tokens_per_temporal_patch(self, num_frames: int, temporal_patch_size: int = 2) -> int | None:
        """The most tokens one temporal patch of a ``num_frames``-frame video may take; None when
        neither limit is set.  ``ValueError`` when ``max_video_tokens`` leaves a temporal patch
        less than one token (one merged block of ``merge_size**2`` patches)."""
        if num_frames < 1:
            raise ValueError(f"num_frames must be >= 1, got {num_frames}")
        tp = temporal_patch_size
        grid_t = -(-num_frames // tp)
        caps = []
        if self.tokens_per_frame is not None:
            caps.append(self.tokens_per_frame * tp)
        if self.max_video_tokens is not None:
            if self.max_video_tokens < grid_t:
                raise ValueError(
                    f"max_video_tokens={self.max_video_tokens} is below one token per temporal patch: {num_frames} frames "
                    f"make {grid_t} temporal patches of {tp} frames, each at least one token; raise it or sample fewer frames"
                )
            caps.append(self.max_video_tokens // grid_t)
        return min(caps) if caps else None


def _tokens(size: tuple[int, int], factor: int) -> int:
    return size[0] * size[1] // (factor * factor)


def frame_size(height: int, width: int, cfg: VideoPreprocessConfig | None = None) -> tuple[int, int]:
    """The (height, width) preprocessing resizes a ``height`` x ``width`` frame to.

    Without a token cap: Qwen's :func:`smart_resize` under ``cfg``'s min / max pixels.  Under
    ``cfg.max_tokens_per_temporal_patch`` (a budget, see :func:`budgeted_preprocess`): Qwen's
    size when it fits, else the largest of the sizes smart_resize gives this frame for a lower
    ``max_pixels`` (``min_pixels`` lowered with it when above it) whose tokens fit - the frame's
    pixel limit lowered only as far as this frame needs; among sizes of equal tokens, the shape
    nearest the frame's.  (Setting ``max_pixels`` to the cap itself would land up to a grid step
    below the cap, and above it for frames more elongated than the cap in blocks, whose short
    side smart_resize keeps at one block, or frames scaled up to ``min_pixels``, whose sides it
    rounds up.)
    """
    cfg = cfg or VideoPreprocessConfig()
    f = cfg.factor
    size = smart_resize(height, width, factor=f, min_pixels=cfg.min_pixels, max_pixels=cfg.max_pixels)
    cap = cfg.max_tokens_per_temporal_patch
    if cap is None or _tokens(size, f) <= cap:
        return size
    candidates = (
        smart_resize(height, width, factor=f, min_pixels=min(cfg.min_pixels, p), max_pixels=p)
        for p in _size_steps(height, width, cfg)
    )
    fitting = [s for s in candidates if _tokens(s, f) <= cap]
    if not fitting:  # the smallest step is one block, and a cap is at least one token
        raise AssertionError(f"no size of a {height}x{width} frame fits {cap} tokens")
    return max(fitting, key=lambda s: (_tokens(s, f), -abs(math.log(s[1] * height / (s[0] * width)))))


def _size_steps(height: int, width: int, cfg: VideoPreprocessConfig) -> list[float]:
    """``max_pixels`` values (up to ``cfg.max_pixels``) at and around which smart_resize's size of
    this frame can change, so that evaluating smart_resize there meets every size it gives.

    A downscaled side is ``floor(sqrt(max_pixels * side / other) / factor)`` blocks and a side
    scaled up to ``min_pixels`` the ceiling of the same, so each side steps at ``k**2 * factor**2 *
    other / side``; the branch changes at the frame's rounded area and, as ``min(min_pixels,
    max_pixels)`` is the floor, at ``min_pixels``.  Each point is taken just below, at and just
    above it.
    """
    f2 = cfg.factor**2
    points = {float(cfg.max_pixels), float(cfg.min_pixels)}
    rounded = round(height / cfg.factor) * round(width / cfg.factor) * f2
    if rounded:
        points.add(float(rounded))
    for ratio in (width / height, height / width):
        k = 1
        while (p := k * k * f2 * ratio) <= cfg.max_pixels:
            points.add(p)
            k += 1
    steps = {q for p in points for q in (p * (1 - _NUDGE), p, p * (1 + _NUDGE))}
    return sorted(q for q in steps if q <= cfg.max_pixels)


def _max_tokens_per_temporal_patch(cfg: VideoPreprocessConfig) -> int:
    """The most tokens one temporal patch takes under ``cfg``, for frames of any size (aspect
    ratio below :data:`MAX_ASPECT_RATIO`)."""
    f2 = cfg.factor**2
    most = int(cfg.max_pixels) // f2  # smart_resize's sizes stay within max_pixels, except for:
    # frames more elongated than max_pixels in blocks: their short side stays one block and the
    # long one gets floor(sqrt(max_pixels * aspect) / factor) blocks, b with b*b*f2 < 200 * max_pixels;
    most = max(most, math.isqrt((MAX_ASPECT_RATIO * int(cfg.max_pixels) - 1) // f2))
    # frames scaled up to min_pixels with both sides rounded up: below (a + 1)(b + 1) blocks, a*b = min_pixels / f2.
    m = cfg.min_pixels / f2
    most = max(most, math.floor(m + math.sqrt(m * MAX_ASPECT_RATIO) + math.sqrt(m / MAX_ASPECT_RATIO) + 1))
    cap = cfg.max_tokens_per_temporal_patch
    return most if cap is None else min(most, cap)


def budgeted_preprocess(cfg: VideoPreprocessConfig, num_frames: int, budget: VideoTokenBudget | None) -> VideoPreprocessConfig:
    """``cfg`` for a video of ``num_frames`` frames under ``budget``: the per-patch token cap the
    budget allows (``max_tokens_per_temporal_patch``), ``min_pixels`` lowered to it when above it.
    :func:`frame_size` then gives every frame the largest of Qwen's smart_resize sizes that fits,
    so :func:`preprocess_video` of ``num_frames`` frames of any size takes at most
    ``budget.max_video_tokens`` tokens, ``budget.tokens_per_frame`` per frame.

    ``cfg`` itself when there is no budget or it cannot bind (frames of any size fit it anyway):
    preprocessing is then exactly as without one.  ``ValueError`` when the budget leaves less than
    one token per temporal patch.
    """
    cap = budget.tokens_per_temporal_patch(num_frames, cfg.temporal_patch_size) if budget is not None else None
    if cap is None or cap >= _max_tokens_per_temporal_patch(cfg):
        return cfg
    return replace(cfg, min_pixels=min(cfg.min_pixels, cap * cfg.factor**2), max_tokens_per_temporal_patch=cap)


def max_video_tokens_for(num_frames: int, cfg: VideoPreprocessConfig | None = None, budget: VideoTokenBudget | None = None) -> int:
    """The most video tokens :func:`preprocess_video` gives up to ``num_frames`` frames of any size
    (aspect ratio below 200) under ``budget``: whether a sequence fits the context, without decoding
    anything.  Fewer frames count too: under ``max_video_tokens`` a short video's per-patch share
    rounds down less, so it can take a few tokens more than ``num_frames`` frames would."""
    cfg = cfg or VideoPreprocessConfig()
    tp = cfg.temporal_patch_size
    grid_t = -(-num_frames // tp)
    counts = range(1, grid_t + 1) if budget is not None and budget.max_video_tokens is not None else (grid_t,)
    return max(g * _max_tokens_per_temporal_patch(budgeted_preprocess(cfg, g * tp, budget)) for g in counts)


def worst_case_frames(sampling: FrameSampling, temporal_patch_size: int | None = None) -> int:
    """The most frames ``sampling`` takes from any video, in whole temporal patches of
    ``temporal_patch_size`` (default the sampling's own): ``num_frames``, or in fps mode
    ``max_frames`` (floored to the sampling's temporal patch), however long the video."""
    own = sampling.temporal_patch_size
    if sampling.num_frames is not None:
        n = -(-sampling.num_frames // own) * own
    else:
        n = max(own, sampling.max_frames // own * own)
    tp = temporal_patch_size or own
    return -(-n // tp) * tp


def _as_frame_array(frames) -> np.ndarray:
    if isinstance(frames, SampledFrames):
        frames = frames.frames
    if isinstance(frames, (list, tuple)):
        frames = np.stack([np.asarray(f) for f in frames])
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be (T, H, W, 3) RGB, got shape {frames.shape}")
    if frames.dtype != np.uint8:
        raise ValueError(f"frames must be uint8, got {frames.dtype}")
    if frames.shape[0] < 1:
        raise ValueError("no frames")
    return frames


def resized_frames(frames, cfg: VideoPreprocessConfig | None = None) -> np.ndarray:
    """Resize (T, H, W, 3) uint8 frames to :func:`frame_size` with PIL bicubic (uint8 out)."""
    from PIL import Image

    cfg = cfg or VideoPreprocessConfig()
    frames = _as_frame_array(frames)
    t, h, w, _ = frames.shape
    rh, rw = frame_size(h, w, cfg)
    if (rh, rw) == (h, w):
        return frames
    out = np.empty((t, rh, rw, 3), dtype=np.uint8)
    for i in range(t):
        out[i] = np.asarray(Image.fromarray(frames[i]).resize((rw, rh), resample=Image.Resampling.BICUBIC))
    return out


def presized_frames(sampled: SampledFrames, cfg: VideoPreprocessConfig, budget: VideoTokenBudget | None = None) -> SampledFrames:
    """``sampled`` with its frames resized as :func:`preprocess_video` would resize them for this frame
    count under ``budget``, so that preprocessing them later only normalizes them: the same model inputs
    from frames a fraction of the decoded size. Kept unresized in the rare case where a resized frame
    would be resized again (frames too elongated for the pixel grid)."""
    sized = budgeted_preprocess(cfg, len(sampled), budget)
    resized = resized_frames(sampled.frames, sized)
    if frame_size(resized.shape[1], resized.shape[2], sized) != resized.shape[1:3]:
        return sampled
    return replace(sampled, frames=resized)


@dataclass(frozen=True)
class EngineVideo:
    """Frames already resized as `preprocess_video` would under a budget, and the per-frame pixel limits
    that make an engine with Qwen's own processor (vLLM) keep them at that size: the same inputs, hence
    the same video tokens, as the hf backend and the trainers get for the same settings."""

    frames: np.ndarray
    processor_kwargs: dict[str, int]


def engine_video(frames, cfg: VideoPreprocessConfig, budget: VideoTokenBudget | None) -> EngineVideo:
    array = _as_frame_array(frames)
    resized = resized_frames(array, budgeted_preprocess(cfg, len(array), budget))
    pixels = int(resized.shape[1] * resized.shape[2])  # a multiple of factor**2: smart_resize leaves it as it is
    return EngineVideo(resized, {"min_pixels": pixels, "max_pixels": pixels})


def preprocess_video(frames, cfg: VideoPreprocessConfig | None = None, budget: VideoTokenBudget | None = None) -> dict:
    """One video -> ``{"pixel_values_videos": (grid_t*grid_h*grid_w, C*tp*p*p) float32,
    "video_grid_thw": (1, 3) int64}``, laid out exactly like Qwen2-VL's video processor.

    ``frames``: (T, H, W, 3) uint8 RGB array, a list of (H, W, 3) arrays, or a SampledFrames.
    An odd T is padded by repeating the last frame (as Qwen's processor does).  Per frame this
    is exactly ``Qwen2VLImageProcessorPil``: PIL bicubic resize, ``x.astype(float64) / 255`` cast to
    float32, then ``(x - mean) / std`` in float32.  ``budget``: the frames are sized by
    ``budgeted_preprocess(cfg, T, budget)`` (see :func:`frame_size`); None sizes them by ``cfg``.
    """
    import torch

    frames = _as_frame_array(frames)
    cfg = budgeted_preprocess(cfg or VideoPreprocessConfig(), frames.shape[0], budget)
    x = resized_frames(frames, cfg)
    tp, p, m = cfg.temporal_patch_size, cfg.patch_size, cfg.merge_size
    if pad := -x.shape[0] % tp:
        x = np.concatenate([x, np.repeat(x[-1:], pad, axis=0)], axis=0)
    t, h, w, c = x.shape
    if h % (p * m) or w % (p * m):
        raise AssertionError(f"resized frame {h}x{w} is not a multiple of {p * m}")
    grid_t, grid_h, grid_w = t // tp, h // p, w // p
    # Patches in Qwen2VLVideoProcessor's order (grid_t, gh/m, gw/m, mh, mw, C, tp, ph, pw), laid out
    # while the pixels are still uint8 (a quarter of the bytes the float32 copy would move).
    x = x.reshape(grid_t, tp, grid_h // m, m, p, grid_w // m, m, p, c).transpose(0, 2, 5, 3, 6, 8, 1, 4, 7)
    x = np.ascontiguousarray(x)
    # uint8 -> float: one lookup table per channel, built with exactly the image processor's
    # arithmetic (float64 rescale cast to float32, then (x - mean) / std in float32), so the
    # result is bit-identical while using one float32 copy of the video instead of float64.
    lut = _normalization_lut(cfg)  # (256, C) float32
    y = np.empty(x.shape, dtype=np.float32)
    for ch in range(c):
        np.take(lut[:, ch], x[:, :, :, :, :, ch], out=y[:, :, :, :, :, ch], mode="clip")  # uint8 indices are in range
    y = y.reshape(grid_t * grid_h * grid_w, c * tp * p * p)
    return {
        "pixel_values_videos": torch.from_numpy(y),
        "video_grid_thw": torch.tensor([[grid_t, grid_h, grid_w]], dtype=torch.long),
    }


def _normalization_lut(cfg: VideoPreprocessConfig) -> np.ndarray:
    values = (np.arange(256, dtype=np.float64) * cfg.rescale_factor).astype(np.float32)  # rescale
    mean = np.asarray(cfg.image_mean, dtype=np.float32)
    std = np.asarray(cfg.image_std, dtype=np.float32)
    return (values[:, None] - mean[None, :]) / std[None, :]  # normalize, float32


def video_grid_thw_for(
    num_frames: int, height: int, width: int, cfg: VideoPreprocessConfig | None = None, budget: VideoTokenBudget | None = None
) -> tuple[int, int, int]:
    """The ``video_grid_thw`` that :func:`preprocess_video` gives for ``num_frames`` frames of
    ``height`` x ``width`` (under ``budget``) - for budgeting tokens without decoding anything."""
    cfg = budgeted_preprocess(cfg or VideoPreprocessConfig(), num_frames, budget)
    rh, rw = frame_size(height, width, cfg)
    tp = cfg.temporal_patch_size
    return (-(-num_frames // tp), rh // cfg.patch_size, rw // cfg.patch_size)


def num_video_tokens(video_grid_thw, merge_size: int = 2) -> int:
    """LLM placeholder tokens for one video: ``grid_t * grid_h * grid_w // merge_size**2``."""
    t, h, w = (int(v) for v in (video_grid_thw.reshape(-1).tolist() if hasattr(video_grid_thw, "reshape")
                                else video_grid_thw))
    return t * h * w // (merge_size**2)


def _is_conversation(x) -> bool:
    return isinstance(x, (list, tuple)) and len(x) > 0 and all(isinstance(m, dict) for m in x)


def _prompt_token_ids(tokenizer, messages_or_prompt, n_videos: int, add_generation_prompt: bool) -> list[list[int]]:
    """Each sample rendered (chat template) and tokenized; ``ValueError`` unless they hold ``n_videos`` placeholders in all."""
    if isinstance(messages_or_prompt, str) or _is_conversation(messages_or_prompt):
        samples = [messages_or_prompt]
    else:
        samples = list(messages_or_prompt)
    if not samples:
        raise ValueError("no prompts")

    texts = []
    for s in samples:
        if isinstance(s, str):
            texts.append(s)
        elif _is_conversation(s):
            texts.append(tokenizer.apply_chat_template(s, tokenize=False, add_generation_prompt=add_generation_prompt))
        else:
            raise TypeError(f"a sample must be a prompt string or a list of message dicts, got {type(s).__name__}")

    video_id = tokenizer.convert_tokens_to_ids(VIDEO_TOKEN)
    image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    encoded = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    n_placeholders = sum(ids.count(video_id) for ids in encoded)
    if n_placeholders != n_videos:
        raise ValueError(f"the prompts hold {n_placeholders} {VIDEO_TOKEN} placeholders but {n_videos} videos were given")
    if image_id is not None and any(image_id in ids for ids in encoded):
        raise ValueError(f"{IMAGE_TOKEN} found: build_video_inputs handles videos only")
    return encoded


def _text_inputs(tokenizer, encoded: list[list[int]], counts: Sequence[int], padding_side: str) -> dict:
    """``input_ids``, ``attention_mask``, ``mm_token_type_ids`` of tokenized samples, the i-th ``<|video_pad|>`` expanded to ``counts[i]`` copies."""
    import torch

    video_id = tokenizer.convert_tokens_to_ids(VIDEO_TOKEN)
    rows: list[list[int]] = []
    vi = 0
    for ids in encoded:
        row: list[int] = []
        for tok in ids:
            if tok == video_id:
                row.extend([video_id] * counts[vi])
                vi += 1
            else:
                row.append(tok)
        rows.append(row)

    pad_id = tokenizer.pad_token_id
    if pad_id is None:
        raise ValueError("the tokenizer has no pad token")
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    length = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
    for b, r in enumerate(rows):
        sl = slice(length - len(r), length) if padding_side == "left" else slice(0, len(r))
        input_ids[b, sl] = torch.tensor(r, dtype=torch.long)
        attention_mask[b, sl] = 1
    mm_token_type_ids = token_types(input_ids, video_id) * attention_mask

    return {"input_ids": input_ids, "attention_mask": attention_mask, "mm_token_type_ids": mm_token_type_ids}


def video_text_inputs(
    tokenizer, messages_or_prompt, video_tokens: Sequence[int], *, add_generation_prompt: bool = True, padding_side: str = "left"
) -> dict:
    """The text side of :func:`build_video_inputs` for videos whose token counts are known (embeddings
    read from a cache): ``input_ids``, ``attention_mask``, ``mm_token_type_ids``, the i-th ``<|video_pad|>``
    expanded to ``video_tokens[i]`` copies, equal to what :func:`build_video_inputs` gives for videos of
    those token counts. No frame is needed."""
    encoded = _prompt_token_ids(tokenizer, messages_or_prompt, len(video_tokens), add_generation_prompt)
    return _text_inputs(tokenizer, encoded, [int(n) for n in video_tokens], padding_side)


def build_video_inputs(
    tokenizer,
    messages_or_prompt,
    videos: Sequence,
    cfg: VideoPreprocessConfig | None = None,
    *,
    fps_per_video: float | Sequence[float] | None = None,
    budget: VideoTokenBudget | None = None,
    add_generation_prompt: bool = True,
    padding_side: str = "left",
) -> dict:
    """Tokenize chat(s) and preprocess their videos into Qwen2.5-VL model inputs.

    ``messages_or_prompt``: one sample or a batch (a list of samples).  A sample is either a
    conversation (list of ``{"role", "content"}`` dicts, rendered with the tokenizer's chat
    template, with ``add_generation_prompt``) or an already rendered prompt string.  Each
    ``<|video_pad|>`` in a sample stands for one video.

    ``videos``: all videos of the batch, flat, in order of appearance; each a (T, H, W, 3) uint8
    array, a list of frames, or a SampledFrames.

    ``fps_per_video``: the sampled frame rate of each video (one number for all, or one per
    video); ``None`` takes ``SampledFrames.sampled_fps``.  Gives
    ``second_per_grid_ts = temporal_patch_size / fps``, which sets the spacing of the temporal
    M-RoPE positions (``tokens_per_second * second_per_grid_ts`` per temporal patch).

    ``budget``: each video is preprocessed under it for the frames it has (:func:`preprocess_video`).

    Returns torch tensors: ``input_ids`` (B, L), ``attention_mask`` (B, L), ``mm_token_type_ids``
    (B, L; 0 text, 2 video - transformers 5.x needs it to compute the 3D M-RoPE positions, without
    it the model silently falls back to 1D text positions), and, when there are videos,
    ``pixel_values_videos`` (sum of patches, C*tp*p*p), ``video_grid_thw`` (V, 3),
    ``second_per_grid_ts`` (V,).  Each ``<|video_pad|>`` is expanded to
    ``grid_t*grid_h*grid_w // merge**2`` copies.  Padding uses the tokenizer's pad id, on the
    left by default (for generation).
    """
    import torch

    cfg = cfg or VideoPreprocessConfig()
    videos = list(videos)
    encoded = _prompt_token_ids(tokenizer, messages_or_prompt, len(videos), add_generation_prompt)

    if fps_per_video is None:
        fps_list = []
        for v in videos:
            if not isinstance(v, SampledFrames) or not v.sampled_fps:
                raise ValueError("fps_per_video is required unless every video is a SampledFrames")
            fps_list.append(float(v.sampled_fps))
    elif isinstance(fps_per_video, (int, float)):
        fps_list = [float(fps_per_video)] * len(videos)
    else:
        fps_list = [float(f) for f in fps_per_video]
        if len(fps_list) != len(videos):
            raise ValueError(f"{len(fps_list)} fps values for {len(videos)} videos")
    if any(not (f > 0) for f in fps_list):
        raise ValueError(f"fps values must be positive, got {fps_list}")

    processed = [preprocess_video(v, cfg, budget) for v in videos]
    counts = [num_video_tokens(pv["video_grid_thw"], cfg.merge_size) for pv in processed]

    out = _text_inputs(tokenizer, encoded, counts, padding_side)
    if processed:
        out["pixel_values_videos"] = torch.cat([pv["pixel_values_videos"] for pv in processed], dim=0)
        out["video_grid_thw"] = torch.cat([pv["video_grid_thw"] for pv in processed], dim=0)
        out["second_per_grid_ts"] = torch.tensor(
            [cfg.temporal_patch_size / f for f in fps_list], dtype=torch.float32
        )
    return out


__all__ = [
    "OPENAI_CLIP_MEAN",
    "OPENAI_CLIP_STD",
    "VIDEO_PREPROCESSOR_FILE",
    "FrameSampling",
    "SampledFrames",
    "VideoPreprocessConfig",
    "VideoReadError",
    "VideoTokenBudget",
    "budgeted_preprocess",
    "build_video_inputs",
    "frame_range",
    "frame_size",
    "max_video_tokens_for",
    "num_video_tokens",
    "preprocess_video",
    "presized_frames",
    "read_frames",
    "resized_frames",
    "sample_frame_indices",
    "smart_resize",
    "video_grid_thw_for",
    "video_text_inputs",
    "worst_case_frames",
]
