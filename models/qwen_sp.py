"""Multi-modal sequence parallelism (MM-SP, as in LongVILA) for Qwen2.5-VL.

One training sample of hundreds of frames is shared by the ranks of an SP group:

1. vision: each rank encodes a contiguous run of the batch's temporal patches (about 1/SP of the
   frames, balanced by patch count); the embeddings are all-gathered in order;
2. merge: each rank embeds only its slice of the token sequence and writes into it the video
   embeddings that fall there (the sequence is padded at the end to a multiple of SP and cut in
   equal slices);
3. positions: Qwen's 3-D mRoPE positions are computed on the full sequence (`get_rope_index`),
   then sliced, so rotary embeddings on a slice are those of the unsplit sequence;
4. text model: runs on the slice, its attention swapped for Ulysses (`parallel.ulysses`);
5. output: this rank's logits at the positions it scores, with their next-token targets.

With an SP group of one rank the same code is plain single-process training (Ulysses reduces to
causal SDPA), which is what the SP=1 vs SP=2 equality tests compare against.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from models.video import VIDEO_TOKEN_TYPE, token_types
from parallel.sequence import (
    IGNORE_INDEX,
    gather,
    pad_to_multiple,
    plan_vision_shards,
    shard,
    shift_labels,
)
from parallel.topology import SPGroup
from parallel.ulysses import ULYSSES_ATTENTION, register_ulysses_attention


@dataclass
class SPShard:
    """One rank's slice of a forward pass, at the positions that are scored.

    `scored` (B, L/SP) bool: positions of this rank's slice whose next token is a target (labels
    other than `IGNORE_INDEX`); `logits` (N, V) and `targets` (N,) at those N positions, in
    row-major order. Projecting only these onto the vocabulary, rather than every position of a
    sequence that is mostly video, keeps the largest tensor of the pass small.
    """

    logits: torch.Tensor
    targets: torch.Tensor
    scored: torch.Tensor


GENERATION_ATTENTION = "sdpa"  # what a checkpoint loads with; Ulysses attention has no KV cache


def enable_ulysses(model: nn.Module) -> None:
    """Swap the text model's attention for Ulysses attention (the vision tower keeps its own), for
    good: a forward pass's attention must still be Ulysses when its backward runs, since gradient
    checkpointing recomputes each layer then and looks its attention up again. Generation switches
    back for its duration (`generation_attention`).

    The choice lives in the in-memory config only: `save_pretrained` does not write it, so saved
    checkpoints load with the default attention everywhere.
    """
    register_ulysses_attention()
    model.set_attn_implementation({"text_config": ULYSSES_ATTENTION})


@contextmanager
def generation_attention(model: nn.Module) -> Iterator[None]:
    """The checkpoint's attention (with its KV cache) while the model generates, Ulysses again after."""
    if model.config.text_config._attn_implementation != ULYSSES_ATTENTION:
        yield
        return
    model.set_attn_implementation({"text_config": GENERATION_ATTENTION})
    try:
        yield
    finally:
        model.set_attn_implementation({"text_config": ULYSSES_ATTENTION})


def sp_video_embeddings(visual: nn.Module, pixel_values_videos: torch.Tensor, video_grid_thw: torch.Tensor, sp: SPGroup) -> torch.Tensor:
    """Every video token's embedding, in sequence order, each rank encoding ~1/SP of the frames."""
    shards = plan_vision_shards(video_grid_thw, visual.spatial_merge_size, sp.size)
    local = shards[sp.rank]
    pixels = pixel_values_videos[local.patches].to(visual.dtype)
    embeds = visual(pixels, grid_thw=local.grid_thw.to(pixel_values_videos.device)).pooler_output
    return gather(embeds, sp, sizes=[s.n_tokens for s in shards])


def _right_padded(attention_mask: torch.Tensor) -> bool:
    """True when every row is real tokens followed only by padding."""
    return bool((attention_mask[:, 1:] <= attention_mask[:, :-1]).all())


def sp_forward(
    model: nn.Module,
    sp: SPGroup,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    *,
    labels: torch.Tensor | None = None,
    mm_token_type_ids: torch.Tensor | None = None,
    video_grid_thw: torch.Tensor | None = None,
    second_per_grid_ts: torch.Tensor | None = None,
    video_embeds: torch.Tensor | None = None,
) -> SPShard:
    """This rank's slice of an MM-SP pass of a Qwen2.5-VL model (`Qwen2_5_VLForConditionalGeneration`)
    whose text attention is Ulysses (`enable_ulysses`).

    Every rank of the SP group passes the same full batch: text tensors as
    `models.video.build_video_inputs` gives them (left or right padding), `labels` (-100 where not
    scored; None scores nothing), and `video_embeds`, every video token's embedding in sequence
    order, from `sp_video_embeddings` or from a cache (GRPO encodes a video once for all its
    rollouts).
    """
    if model.config.text_config._attn_implementation != ULYSSES_ATTENTION:
        raise ValueError(f"the model's text attention is {model.config.text_config._attn_implementation!r}: call enable_ulysses(model) first")
    core = model.model  # Qwen2_5_VLModel: .language_model, get_rope_index
    text = core.language_model
    if mm_token_type_ids is None:
        mm_token_type_ids = token_types(input_ids, model.config.video_token_id)
    # The video positions by token type, as get_rope_index reads them: a sampled response may
    # contain the `<|video_pad|>` token itself, which is text there (as it was when sampled).
    video_mask = mm_token_type_ids == VIDEO_TOKEN_TYPE
    # 3-D positions from the full (unpadded) sequence, then sliced like the tokens.
    positions, _ = core.get_rope_index(
        input_ids, mm_token_type_ids, video_grid_thw=video_grid_thw, second_per_grid_ts=second_per_grid_ts,
        attention_mask=attention_mask,
    )
    embeds = text.embed_tokens(shard(input_ids, sp, dim=1))

    n_video = int(video_mask.sum())
    if n_video != (0 if video_embeds is None else video_embeds.shape[0]):
        raise ValueError(f"{n_video} video tokens in the text but {0 if video_embeds is None else video_embeds.shape[0]} video embeddings")
    if video_embeds is not None:
        # Video tokens are numbered in row-major order over the batch, as the model's own
        # masked_scatter merges them; each rank picks the embeddings of its slice.
        order = (video_mask.flatten().cumsum(0) - 1).view_as(video_mask)
        local_mask = shard(video_mask, sp, dim=1, pad_value=False)
        local_order = shard(order, sp, dim=1)[local_mask]
        embeds = embeds.masked_scatter(local_mask.unsqueeze(-1), video_embeds[local_order].to(embeds.dtype))

    padding_mask = None
    if not _right_padded(attention_mask):
        padding_mask = pad_to_multiple(attention_mask.bool(), sp.size, dim=1, value=False)
    hidden = text(
        inputs_embeds=embeds, position_ids=shard(positions, sp, dim=2), attention_mask=None, use_cache=False,
        sp_group=sp, sp_key_padding_mask=padding_mask,
    ).last_hidden_state
    if labels is None:
        labels = torch.full_like(input_ids, IGNORE_INDEX)
    targets = shard(shift_labels(labels.masked_fill(attention_mask == 0, IGNORE_INDEX)), sp, dim=1, pad_value=IGNORE_INDEX)
    scored = targets != IGNORE_INDEX
    return SPShard(logits=model.lm_head(hidden[scored]), targets=targets[scored], scored=scored)


class SPQwen2_5_VL(nn.Module):
    """A Qwen2.5-VL model whose forward is this rank's slice of an MM-SP pass from pixels: the
    frames are encoded by `sp_video_embeddings`, then `sp_forward`.

    Wrapping the whole model in one module keeps the pass a single `forward` call, which ZeRO-3's
    parameter fetching relies on. Construction switches the model's text attention to Ulysses.
    """

    def __init__(self, model: nn.Module, sp: SPGroup):
        super().__init__()
        self.model = model
        self.sp = sp
        enable_ulysses(model)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        labels: torch.Tensor | None = None,
        mm_token_type_ids: torch.Tensor | None = None,
        pixel_values_videos: torch.Tensor | None = None,
        video_grid_thw: torch.Tensor | None = None,
        second_per_grid_ts: torch.Tensor | None = None,
    ) -> SPShard:
        video_embeds = None
        if pixel_values_videos is not None:
            video_embeds = sp_video_embeddings(self.model.model.visual, pixel_values_videos, video_grid_thw, self.sp)
        return sp_forward(
            self.model, self.sp, input_ids, attention_mask, labels=labels, mm_token_type_ids=mm_token_type_ids,
            video_grid_thw=video_grid_thw, second_per_grid_ts=second_per_grid_ts, video_embeds=video_embeds,
        )
