"""MR-SP stage 1: every video of a step through the vision tower once, and an on-disk cache.

`encode_requests` turns a step's prompts into an `models.vlm.EncodedVideoBatch`: the text inputs
of `build_video_inputs` and one embedding tensor per prompt, so the G rollouts, the old-policy
and reference log-probs and the update all reuse it and none of them calls the tower again.

- Videos are identified by `VideoRequest.video_key` (source video, frame sampling, token budget): prompts
  about the same video share one encoding, whatever their frames objects.
- The cache is looked up by key before any frame is touched: a request's frames may be a function
  that reads them, called only for a video the cache misses, and a cache entry holds what the text
  side needs besides the embeddings (`video_grid_thw`, `second_per_grid_ts`), so a step whose videos
  are all cached decodes and preprocesses nothing.
- Across a sequence-parallel group (ranks holding the same prompts), the missing videos' frames
  are split by temporal patch and the embeddings all-gathered (`models.qwen_sp.sp_video_embeddings`).
- The vision tower is frozen during GRPO, which is what makes reuse in the update exact, and lets
  embeddings survive across steps and runs in `EmbeddingCache`: one safetensors file per video,
  under a namespace that hashes the tower's weights, the preprocessing and the dtype, so a changed
  tower or frame geometry never reads a stale entry.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from models.qwen_sp import sp_video_embeddings
from models.video import (
    SampledFrames,
    VideoPreprocessConfig,
    VideoTokenBudget,
    preprocess_video,
    video_text_inputs,
)
from models.vlm import EncodedVideoBatch
from parallel.loss import count_sum
from parallel.topology import SPGroup

CACHE_VERSION = 2  # 2: entries carry video_grid_thw and second_per_grid_ts


@dataclass(frozen=True)
class VideoRequest:
    """One prompt: its chat (one video part), its frames, and the identity of that video sample.

    `frames`: the frames, or a function that reads them, called only when the video is not cached."""

    messages: list[dict[str, Any]]
    frames: SampledFrames | Callable[[], SampledFrames]
    video_key: str  # equal keys promise equal inputs (same video, same frame sampling, same token budget)

    def sampled_frames(self) -> SampledFrames:
        return self.frames() if callable(self.frames) else self.frames


@dataclass(frozen=True)
class EncodedVideo:
    """One video through the tower: its embeddings and what the text side needs of it (no pixels)."""

    embeds: torch.Tensor  # (tokens, hidden)
    grid_thw: torch.Tensor  # (3,) int64, the `video_grid_thw` row
    second_per_grid_ts: torch.Tensor  # () float32

    @property
    def tokens(self) -> int:
        return int(self.embeds.shape[0])


@dataclass
class EncodeStats:
    videos: int = 0  # distinct videos in the batch
    encoded: int = 0  # of those, sent through the vision tower
    cache_hits: int = 0  # of those, read from the on-disk cache
    patch_rows: int = 0  # patch rows of the encoded videos (an SP rank's tower sees about 1/SP of them)


def vision_tower(model: torch.nn.Module) -> torch.nn.Module:
    return model.model.visual


def vision_weights_hash(model: torch.nn.Module) -> str:
    """sha256 over the vision tower's parameters and buffers (names, dtypes, shapes, bytes)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(vision_tower(model).state_dict().items()):
        data = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}|{data.dtype}|{tuple(data.shape)}|".encode())
        digest.update(data.view(torch.uint8).numpy().tobytes() if data.numel() else b"")
    return digest.hexdigest()[:16]


class EmbeddingCache:
    """Video embeddings on disk, one file per (namespace, video key), written atomically.

    An entry holds the embeddings with the video's `video_grid_thw` and `second_per_grid_ts`, so a
    hit needs no frame. It is read back only when its token count matches its grid; a half-written
    file cannot exist (write to a temporary name, then rename), and an unreadable one counts as a
    miss and is rewritten.
    """

    def __init__(self, root: str | os.PathLike, model: torch.nn.Module, preprocess: VideoPreprocessConfig):
        dtype = str(next(vision_tower(model).parameters()).dtype)
        namespace = {"version": CACHE_VERSION, "vision": vision_weights_hash(model), "preprocess": asdict(preprocess), "dtype": dtype}
        key = hashlib.sha256(json.dumps(namespace, sort_keys=True).encode()).hexdigest()[:16]
        self.folder = Path(root) / key
        self.merge_size = preprocess.merge_size
        self.folder.mkdir(parents=True, exist_ok=True)
        info = self.folder / "namespace.json"
        if not info.exists():  # for a person browsing the cache: what the entries were made with
            tmp = info.with_name(f".{info.name}.{uuid.uuid4().hex[:8]}")
            tmp.write_text(json.dumps(namespace, indent=1, sort_keys=True) + "\n")
            os.replace(tmp, info)

    def path(self, video_key: str) -> Path:
        return self.folder / f"{hashlib.sha256(video_key.encode()).hexdigest()[:32]}.safetensors"

    def get(self, video_key: str, device: torch.device | str) -> EncodedVideo | None:
        from safetensors.torch import load_file

        path = self.path(video_key)
        if not path.is_file():
            return None
        try:
            entry = load_file(str(path))
            video = EncodedVideo(entry["embeds"].to(device), entry["video_grid_thw"], entry["second_per_grid_ts"])
        except Exception:  # a corrupt entry is a miss; put() replaces it
            return None
        if video.grid_thw.shape != (3,) or video.tokens != int(video.grid_thw.prod()) // self.merge_size**2:
            return None
        return video

    def put(self, video_key: str, video: EncodedVideo) -> None:
        from safetensors.torch import save_file

        path = self.path(video_key)
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}")
        tensors = {"embeds": video.embeds, "video_grid_thw": video.grid_thw, "second_per_grid_ts": video.second_per_grid_ts}
        save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, str(tmp), metadata={"video_key": video_key})
        os.replace(tmp, path)


def _agree(flags: list[bool], sp: SPGroup, device: torch.device) -> list[bool]:
    """A flag holds for the SP group only if it holds on every rank (ranks must encode the same videos)."""
    if sp.size == 1 or not flags:
        return flags
    counts = count_sum(torch.tensor([float(f) for f in flags], device=device), group=sp.group)
    return [int(c) == sp.size for c in counts.tolist()]


def _preprocess(request: VideoRequest, preprocess: VideoPreprocessConfig, budget: VideoTokenBudget | None) -> dict[str, torch.Tensor]:
    """One video's frames (read now if the request holds a reader) as `build_video_inputs` preprocesses them."""
    frames = request.sampled_frames()
    if not frames.sampled_fps:
        raise ValueError(f"video {request.video_key}: its frames have no sampled_fps")
    out = preprocess_video(frames, preprocess, budget)
    out["second_per_grid_ts"] = torch.tensor(preprocess.temporal_patch_size / float(frames.sampled_fps), dtype=torch.float32)
    return out


def encode_requests(
    model: torch.nn.Module,
    tokenizer: Any,
    preprocess: VideoPreprocessConfig,
    requests: Sequence[VideoRequest],
    sp: SPGroup,
    cache: EmbeddingCache | None = None,
    *,
    budget: VideoTokenBudget | None = None,
) -> tuple[EncodedVideoBatch, EncodeStats]:
    """The step's prompts, tokenized (left-padded, for generation) and with their videos encoded
    once each: from the cache, else in one vision-tower call (split over the SP group). The cache is
    looked up first; only the misses' frames are read and preprocessed. `budget`: the video token
    budget each video is preprocessed under (the video keys must tell budgets apart)."""
    device = next(model.parameters()).device
    first: dict[str, int] = {}  # video key -> the first prompt about it
    for i, request in enumerate(requests):
        first.setdefault(request.video_key, i)

    videos: dict[str, EncodedVideo] = {}
    if cache is not None:
        for key in first:
            hit = cache.get(key, device)
            if hit is not None:
                videos[key] = hit
    hits = _agree([key in videos for key in first], sp, device)  # every rank of the group, hit or miss alike
    missing = [key for key, hit in zip(first, hits) if not hit]
    for key in missing:
        videos.pop(key, None)

    stats = EncodeStats(videos=len(first), encoded=len(missing), cache_hits=len(first) - len(missing))
    if missing:
        processed = [_preprocess(requests[first[key]], preprocess, budget) for key in missing]
        pixels = torch.cat([pv["pixel_values_videos"] for pv in processed])
        grid = torch.cat([pv["video_grid_thw"] for pv in processed])
        with torch.no_grad():
            encoded = sp_video_embeddings(vision_tower(model), pixels.to(device), grid.to(device), sp)
        stats.patch_rows = int(pixels.shape[0])
        tokens = [int(g.prod()) // preprocess.merge_size**2 for g in grid]
        for key, part, pv in zip(missing, encoded.split(tokens), processed):
            videos[key] = EncodedVideo(part, pv["video_grid_thw"][0], pv["second_per_grid_ts"])
            if cache is not None and sp.rank == 0:
                cache.put(key, videos[key])
    ordered = [videos[r.video_key] for r in requests]
    text = video_text_inputs(tokenizer, [r.messages for r in requests], [v.tokens for v in ordered])
    text["video_grid_thw"] = torch.stack([v.grid_thw for v in ordered])
    text["second_per_grid_ts"] = torch.stack([v.second_per_grid_ts for v in ordered])
    batch = EncodedVideoBatch(
        **{k: v.to(device) for k, v in text.items()}, video_embeds=tuple(v.embeds for v in ordered), patch_rows=stats.patch_rows
    )
    return batch, stats
