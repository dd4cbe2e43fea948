"""MR-SP stage 2: log-probabilities of sampled responses, prefilled from cached video embeddings,
sequence-parallel.

A response is scored by one forward pass over prompt + response (a "prefill"). The policy's pass
(with gradient), the old policy's and the reference's (without) all take the video embeddings of
stage 1 instead of pixels, so none of them runs the vision tower. Sequences are right-padded and
then padded to a multiple of the SP degree and cut into equal contiguous slices (uniform padded
sharding, the paper's Figure 7): each rank embeds its slice, positions come from the whole
sequence (3-D mRoPE), attention is Ulysses (`parallel.ulysses`), and each rank projects onto the
vocabulary only its slice's response positions: the MM-SP pass of `models.qwen_sp.sp_forward`, the
one SFT trains with, fed embeddings. With an SP group of one rank this is the plain single-process
forward pass.

Per-position values that enter the loss (advantages, weights, old and reference log-probs) are
laid out like the log-probs: full (rows, positions) tensors cut with `scored_values`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from models.qwen_sp import enable_ulysses, sp_forward
from parallel.ulysses import ULYSSES_ATTENTION
from models.vlm import EncodedVideoBatch
from parallel.loss import token_logprobs
from parallel.sequence import IGNORE_INDEX, shard, shift_labels
from parallel.topology import SPGroup


@dataclass(frozen=True)
class PolicyBatch:
    """Prompt + response rows, right-padded, with each row's video embeddings.

    `labels` hold the response tokens (the end-of-turn token included when the response ended
    with one) and `IGNORE_INDEX` elsewhere; `video_embeds[r]` is row r's video (rows answering
    the same prompt share one tensor).
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    mm_token_type_ids: torch.Tensor
    labels: torch.Tensor
    video_grid_thw: torch.Tensor
    second_per_grid_ts: torch.Tensor
    video_embeds: tuple[torch.Tensor, ...]

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    def select(self, rows: Sequence[int]) -> PolicyBatch:
        """These rows (a micro-batch), trimmed to the longest of them."""
        index = torch.tensor(list(rows), dtype=torch.long, device=self.input_ids.device)
        length = int(self.attention_mask[index].sum(dim=1).max())
        return PolicyBatch(
            *(t[index, :length] for t in (self.input_ids, self.attention_mask, self.mm_token_type_ids, self.labels)),
            video_grid_thw=self.video_grid_thw[index], second_per_grid_ts=self.second_per_grid_ts[index],
            video_embeds=tuple(self.video_embeds[r] for r in rows),
        )

    def targets(self) -> torch.Tensor:
        """(rows, positions): the response token each position predicts, else IGNORE_INDEX."""
        return shift_labels(self.labels)


def pack_sequences(batch: EncodedVideoBatch, prompt_of: Sequence[int], responses: Sequence[Sequence[int]], pad_id: int) -> PolicyBatch:
    """Row r = prompt `prompt_of[r]` of the (left-padded) encoded batch + `responses[r]`."""
    if len(prompt_of) != len(responses) or not responses:
        raise ValueError(f"need one prompt index per response, got {len(prompt_of)} for {len(responses)}")
    rows, types, labels = [], [], []
    for p, response in zip(prompt_of, responses):
        real = batch.attention_mask[p].bool()
        prompt = batch.input_ids[p][real].tolist()
        rows.append(prompt + list(response))
        types.append(batch.mm_token_type_ids[p][real].tolist() + [0] * len(response))
        labels.append([IGNORE_INDEX] * len(prompt) + list(response))
    length = max(len(r) for r in rows)

    def padded(values: list[list[int]], fill: int) -> torch.Tensor:
        return torch.tensor([v + [fill] * (length - len(v)) for v in values], dtype=torch.long, device=batch.input_ids.device)

    index = torch.tensor(list(prompt_of), dtype=torch.long, device=batch.input_ids.device)
    return PolicyBatch(
        input_ids=padded(rows, pad_id),
        attention_mask=padded([[1] * len(r) for r in rows], 0),
        mm_token_type_ids=padded(types, 0),
        labels=padded(labels, IGNORE_INDEX),
        video_grid_thw=batch.video_grid_thw[index],
        second_per_grid_ts=batch.second_per_grid_ts[index],
        video_embeds=tuple(batch.video_embeds[p] for p in prompt_of),
    )


def response_logprobs(model: nn.Module, seqs: PolicyBatch, sp: SPGroup) -> tuple[torch.Tensor, torch.Tensor]:
    """log pi(response token) at this rank's scored positions, in row-major order (fp32), and the
    (rows, padded length / SP) mask of those positions.

    Every rank of the SP group passes the same `seqs`; the vision tower is never called: the MM-SP
    pass (`models.qwen_sp.sp_forward`) takes the rows' cached video embeddings.
    """
    if model.config.text_config._attn_implementation != ULYSSES_ATTENTION:
        enable_ulysses(model)  # the rollout engine generates inside `generation_attention`
    out = sp_forward(
        model, sp, seqs.input_ids, seqs.attention_mask, labels=seqs.labels, mm_token_type_ids=seqs.mm_token_type_ids,
        video_grid_thw=seqs.video_grid_thw, second_per_grid_ts=seqs.second_per_grid_ts, video_embeds=torch.cat(seqs.video_embeds),
    )
    return token_logprobs(out.logits, out.targets), out.scored


def scored_values(values: torch.Tensor, sp: SPGroup, scored: torch.Tensor) -> torch.Tensor:
    """A full (rows, positions) per-position tensor cut like `response_logprobs`' output."""
    return shard(values, sp, dim=1)[scored]


class PolicyModule(nn.Module):
    """The policy as the module DeepSpeed wraps: `forward(seqs)` is `response_logprobs` on this
    rank's slice. `model` is the transformers model (what is saved)."""

    def __init__(self, model: nn.Module, sp: SPGroup):
        super().__init__()
        self.model = model
        self.sp = sp

    def forward(self, seqs: PolicyBatch) -> tuple[torch.Tensor, torch.Tensor]:
        return response_logprobs(self.model, seqs, self.sp)
