"""MR-SP stage 1: every video of a step through the vision tower once, and an on-disk cache.

`encode_requests` turns a step's prompts into an `models.vlm.EncodedVideoBatch`: the text inputs
of `build_video_inputs` and one embedding tensor per prompt, so the G rollouts, the old-policy
and reference log-probs and the update all reuse it and none of them calls the tower again.

- Videos are identified by `VideoRequest.video_key` (source video, frame sampling, token budget): prompts
  about the same video share one encoding, whatever their frames objects.
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
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from models.qwen_sp import sp_video_embeddings
from models.video import (
    SampledFrames,
    VideoPreprocessConfig,
    VideoTokenBudget,
    build_video_inputs,
)
from models.vlm import EncodedVideoBatch
from parallel.loss import count_sum
from parallel.topology import SPGroup

CACHE_VERSION = 1


@dataclass(frozen=True)
class VideoRequest:
    """One prompt: its chat (one video part), its frames, and the identity of that video sample."""

    messages: list[dict[str, Any]]
    frames: SampledFrames
    video_key: str  # equal keys promise equal inputs (same video, same frame sampling, same token budget)


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

    Entries are read back only when their token count is the one the current prompt needs; a
    half-written file cannot exist (write to a temporary name, then rename), and an unreadable
    one counts as a miss and is rewritten.
    """

    def __init__(self, root: str | os.PathLike, model: torch.nn.Module, preprocess: VideoPreprocessConfig):
        dtype = str(next(vision_tower(model).parameters()).dtype)
        namespace = {"version": CACHE_VERSION, "vision": vision_weights_hash(model), "preprocess": asdict(preprocess), "dtype": dtype}
        key = hashlib.sha256(json.dumps(namespace, sort_keys=True).encode()).hexdigest()[:16]
        self.folder = Path(root) / key
        self.folder.mkdir(parents=True, exist_ok=True)
        info = self.folder / "namespace.json"
        if not info.exists():  # for a person browsing the cache: what the entries were made with
            tmp = info.with_name(f".{info.name}.{uuid.uuid4().hex[:8]}")
            tmp.write_text(json.dumps(namespace, indent=1, sort_keys=True) + "\n")
            os.replace(tmp, info)

    def path(self, video_key: str) -> Path:
        return self.folder / f"{hashlib.sha256(video_key.encode()).hexdigest()[:32]}.safetensors"

    def get(self, video_key: str, n_tokens: int, device: torch.device | str) -> torch.Tensor | None:
        from safetensors.torch import load_file

        path = self.path(video_key)
        if not path.is_file():
            return None
        try:
            embeds = load_file(str(path), device=str(device))["embeds"]
        except Exception:  # a corrupt entry is a miss; put() replaces it
            return None
        return embeds if embeds.shape[0] == n_tokens else None

    def put(self, video_key: str, embeds: torch.Tensor) -> None:
        from safetensors.torch import save_file

        path = self.path(video_key)
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}")
        save_file({"embeds": embeds.detach().to("cpu").contiguous()}, str(tmp), metadata={"video_key": video_key})
        os.replace(tmp, path)


def _agree(flags: list[bool], sp: SPGroup, device: torch.device) -> list[bool]:
    """A flag holds for the SP group only if it holds on every rank (ranks must encode the same videos)."""
    if sp.size == 1 or not flags:
        return flags
    counts = count_sum(torch.tensor([float(f) for f in flags], device=device), group=sp.group)
    return [int(c) == sp.size for c in counts.tolist()]


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
    once each: from the cache, else in one vision-tower call (split over the SP group). `budget`:
    the video token budget each video is preprocessed under (the video keys must tell budgets apart)."""
    device = next(model.parameters()).device
    inputs = build_video_inputs(tokenizer, [r.messages for r in requests], [r.frames for r in requests], preprocess, budget=budget)
    rows = inputs["video_grid_thw"].prod(-1).tolist()
    offsets = [sum(rows[:i]) for i in range(len(rows))]
    tokens = [r // preprocess.merge_size**2 for r in rows]
    first: dict[str, int] = {}  # video key -> the first prompt about it
    for i, request in enumerate(requests):
        first.setdefault(request.video_key, i)

    embeds: dict[str, torch.Tensor] = {}
    if cache is not None:
        for key, i in first.items():
            hit = cache.get(key, tokens[i], device)
            if hit is not None:
                embeds[key] = hit
    hits = _agree([key in embeds for key in first], sp, device)
    missing = [key for key, hit in zip(first, hits) if not hit]
    for key in missing:
        embeds.pop(key, None)

    stats = EncodeStats(videos=len(first), encoded=len(missing), cache_hits=len(first) - len(missing))
    if missing:
        index = [first[key] for key in missing]
        pixels = torch.cat([inputs["pixel_values_videos"][offsets[i] : offsets[i] + rows[i]] for i in index])
        grid = inputs["video_grid_thw"][index]
        with torch.no_grad():
            encoded = sp_video_embeddings(vision_tower(model), pixels.to(device), grid.to(device), sp)
        stats.patch_rows = int(pixels.shape[0])
        for key, part in zip(missing, encoded.split([tokens[i] for i in index])):
            embeds[key] = part
            if cache is not None and sp.rank == 0:
                cache.put(key, part)
    text = {k: inputs[k].to(device) for k in ("input_ids", "attention_mask", "mm_token_type_ids", "video_grid_thw", "second_per_grid_ts")}
    batch = EncodedVideoBatch(**text, video_embeds=tuple(embeds[r.video_key] for r in requests), patch_rows=stats.patch_rows)
    return batch, stats
