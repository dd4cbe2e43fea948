"""The 3-D mRoPE positions of Qwen2-VL and Qwen2.5-VL, computed as the checkpoint was trained with them.

A vision block's tokens get (temporal, height, width) positions from its grid, offset by where the
block starts. Where the text after the block continues is the difference that matters:

- `last_position` (Qwen's own code, and vLLM): at the block's largest position + 1, on all three axes.
  Qwen2-VL and Qwen2.5-VL checkpoints were trained so.
- `widest_side` (transformers 5.3 and later, 5.25 at least): at the block's start + max(h, w) / merge.
  Right for an image, and for Qwen3-VL, whose blocks are one temporal patch each; for a Qwen2/2.5-VL
  video it puts the question among the video's temporal positions (5 minutes at 1 fps, 448 x 448, on
  Qwen2.5-VL: 150 temporal patches 4 apart on a 32 x 32 grid, the question at start + 16 instead of
  start + 597).

`use_trained_positions` makes a loaded model compute its positions here, whatever transformers does:
the layout its config names in `lvr_mrope_text_after_vision`, else `last_position`. lvr's tiny models
were built and pretrained under transformers' layout and declare `widest_side`; a real checkpoint, and
everything SFT and GRPO train from it, gets Qwen's, as vLLM's rollouts do. Every place lvr loads or
builds a model calls it (`HFVideoLM`, the SFT trainer, the tiny-model builder).
"""

from __future__ import annotations

import itertools
from types import MethodType
from typing import TYPE_CHECKING, Any

from models.video import (
    IMAGE_TOKEN_TYPE,
    TEXT_TOKEN_TYPE,
    VIDEO_TOKEN_TYPE,
    token_types,
)

if TYPE_CHECKING:
    import torch

LAST_POSITION, WIDEST_SIDE = "last_position", "widest_side"
TEXT_AFTER_VISION_KEY = "lvr_mrope_text_after_vision"  # in a model's config: the layout it was trained with
# Models whose videos are one block of all their temporal patches (Qwen3-VL puts a time stamp and a
# block per patch, where transformers' own positions are Qwen's).
POSITIONED_MODELS = ("qwen2_vl", "qwen2_5_vl")


def vision_positions(start: int, grid_thw: tuple[int, int, int], spatial_merge_size: int, time_interval: float | torch.Tensor) -> torch.Tensor:
    """(3, t * h * w / merge**2) positions of one vision block starting at `start`: temporal patch k
    at `start + int(k * time_interval)` (in float32 and quantised after the product, as Qwen2.5-VL
    does), rows and columns of merged patches at `start + i`; tokens in the block's order (time, row,
    column)."""
    import torch

    t, h, w = (int(v) for v in grid_thw)
    h, w = h // spatial_merge_size, w // spatial_merge_size
    temporal = (torch.arange(t) * torch.as_tensor(time_interval, dtype=torch.float32)).long()
    grid = torch.meshgrid(temporal, torch.arange(h), torch.arange(w), indexing="ij")
    return torch.stack([axis.reshape(-1) for axis in grid]) + start


def mrope_positions(
    mm_token_type_ids: torch.Tensor,
    *,
    spatial_merge_size: int,
    tokens_per_second: float | None,
    video_grid_thw: torch.Tensor | None = None,
    second_per_grid_ts: torch.Tensor | None = None,
    image_grid_thw: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    text_after_vision: str = LAST_POSITION,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions (3, B, L) and rope deltas (B, 1) of a batch, from its token types (B, L: 0 text,
    1 image, 2 video; each run of vision tokens is one block, consuming the next grid row of its kind).
    `text_after_vision`: where the text after a block continues (`last_position` or `widest_side`, above).

    Video patches are `tokens_per_second * second_per_grid_ts[v]` apart in time (Qwen2.5-VL), or 1
    apart when `tokens_per_second` is None (Qwen2-VL); an image's one patch needs no spacing. Padding
    (`attention_mask` 0) gets position 0 and takes no part. The delta is what generation adds to a new
    token's index to get its position: the sequence's largest position + 1 - its length.
    """
    import torch

    if text_after_vision not in (LAST_POSITION, WIDEST_SIDE):
        raise ValueError(f"text_after_vision must be {LAST_POSITION!r} or {WIDEST_SIDE!r}, got {text_after_vision!r}")
    batch, length = mm_token_type_ids.shape
    positions = torch.zeros(3, batch, length, dtype=torch.long)
    grids = {IMAGE_TOKEN_TYPE: iter(image_grid_thw.tolist() if image_grid_thw is not None else []),
             VIDEO_TOKEN_TYPE: iter(video_grid_thw.tolist() if video_grid_thw is not None else [])}
    seconds = iter(second_per_grid_ts.tolist() if second_per_grid_ts is not None else [])
    deltas = []
    for b in range(batch):
        kept = attention_mask[b].bool().cpu() if attention_mask is not None else torch.ones(length, dtype=torch.bool)
        types = mm_token_type_ids[b].cpu()[kept].tolist()
        parts, next_position = [], 0
        for kind, run in itertools.groupby(types):
            n = len(list(run))
            if kind == TEXT_TOKEN_TYPE:
                parts.append(torch.arange(next_position, next_position + n).expand(3, -1))
                next_position += n
            else:
                grid = next(grids[kind], None)
                if grid is None:
                    raise ValueError(f"more {'video' if kind == VIDEO_TOKEN_TYPE else 'image'} blocks in the text than grid rows")
                interval = torch.tensor(1.0)
                if kind == VIDEO_TOKEN_TYPE and tokens_per_second is not None:  # float32 products, as the models compute them
                    interval = torch.tensor(float(tokens_per_second)) * torch.tensor(float(next(seconds, 1.0)))
                block = vision_positions(next_position, grid, spatial_merge_size, interval)
                if block.shape[1] != n:
                    raise ValueError(f"a block of {n} vision tokens for a grid of {block.shape[1]} (grid_thw {grid})")
                parts.append(block)
                if text_after_vision == LAST_POSITION:
                    next_position = int(block.max()) + 1
                else:
                    next_position += max(grid[1], grid[2]) // spatial_merge_size
        last = max((int(part.max()) for part in parts), default=-1)
        sample = torch.cat(parts, dim=1) if parts else torch.zeros(3, 0, dtype=torch.long)
        positions[:, b, kept] = sample
        deltas.append(last + 1 - len(types))
    return positions, torch.tensor(deltas, dtype=torch.long).unsqueeze(1)


def _get_rope_index(self, input_ids: torch.Tensor, mm_token_type_ids: torch.Tensor | None = None,
                    image_grid_thw: torch.Tensor | None = None, video_grid_thw: torch.Tensor | None = None,
                    second_per_grid_ts: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                    **_: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """`get_rope_index` of a Qwen2/2.5-VL model (its signature in transformers 5), by `mrope_positions`
    with the layout the model's config names."""
    config = self.config
    if mm_token_type_ids is None:
        mm_token_type_ids = token_types(input_ids, config.video_token_id, config.image_token_id)
    vision = config.vision_config
    positions, deltas = mrope_positions(
        mm_token_type_ids, spatial_merge_size=vision.spatial_merge_size,
        tokens_per_second=getattr(vision, "tokens_per_second", None) if config.model_type == "qwen2_5_vl" else None,
        video_grid_thw=video_grid_thw, second_per_grid_ts=second_per_grid_ts, image_grid_thw=image_grid_thw,
        attention_mask=attention_mask, text_after_vision=getattr(config, TEXT_AFTER_VISION_KEY, LAST_POSITION),
    )
    return positions.to(input_ids.device), deltas.to(input_ids.device)


def use_trained_positions(model: Any) -> Any:
    """Make a loaded Qwen2/2.5-VL model (the `...ForConditionalGeneration` or its inner model) compute
    the positions it was trained with, in its forward and in generation; other models are left alone.
    Returns it."""
    inner = getattr(model, "model", model)
    if getattr(getattr(inner, "config", None), "model_type", None) in POSITIONED_MODELS and hasattr(inner, "get_rope_index"):
        inner.get_rope_index = MethodType(_get_rope_index, inner)
    return model
