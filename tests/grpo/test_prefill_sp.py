"""MR-SP with 2 gloo ranks: each rank encodes about half of the frames (all-gathered embeddings
equal the single-process ones), and the sequence-parallel prefill's log-probs, put back together,
equal the SP=1 log-probs (uniform padded sharding: odd lengths are padded to a multiple of 2), and
the gradients of a GRPO update averaged over the ranks (what DeepSpeed applies) equal SP=1's."""

from __future__ import annotations

import pytest
import torch

from models.video import FrameSampling, read_frames
from models.vlm import video_messages
from tasks.samples.synth import SynthSpec, write_video

SP = 2


class GradientsOnly:
    """An updater that back-propagates and keeps the gradients (no optimizer step)."""

    def __init__(self, module):
        self.module = module

    def __call__(self, seqs):
        return self.module(seqs)

    def backward(self, loss, scale_wrt_gas=False):
        loss.backward()

    def step(self):
        pass


def _prefill(video_paths: list[str], responses: list[list[int]], sp_degree: int, checkpointing: bool = False) -> dict:
    """On one rank (or the only process): stage 1 encoding, the policy prefill, and the gradient
    of one GRPO update (what this rank back-propagates), with gradient checkpointing if asked."""
    from models.vlm import HFVideoLM
    from parallel.embedding_cache import VideoRequest, encode_requests
    from parallel.topology import init_topology
    from tasks.config import GRPOConfig
    from tasks.grpo.prefill import PolicyModule, pack_sequences, response_logprobs
    from tasks.grpo.trainer import plan_update, policy_update

    torch.use_deterministic_algorithms(True)
    topo = init_topology(sp_degree)
    lm = HFVideoLM("tiny", device="cpu")
    requests = [
        VideoRequest(video_messages("Which colour is shown first?"), read_frames(video_paths[0], FrameSampling(num_frames=8)), "a"),
        VideoRequest(video_messages("Which colour is shown last?"), read_frames(video_paths[1], FrameSampling(num_frames=6)), "b"),
    ]
    batch, _ = encode_requests(lm.model, lm.tokenizer, lm.preprocess, requests, topo.sp)
    seqs = pack_sequences(batch, [0, 0, 1], responses, lm.tokenizer.pad_token_id)
    with torch.no_grad():
        logp, scored = response_logprobs(lm.model, seqs, topo.sp)
    cfg = GRPOConfig(group_size=2, micro_batch_size=2, beta=0.04, updates_per_step=2)
    reference = HFVideoLM("tiny", device="cpu").model
    plan = plan_update(seqs, torch.tensor([1.0, -0.5, 0.25]), 1.0, cfg, topo)
    if checkpointing:  # as the trainer does: layers are recomputed in backward
        lm.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        lm.model.train()
    policy_update(GradientsOnly(PolicyModule(lm.model, topo.sp)), reference, plan, cfg, topo)
    grads = {n: p.grad.clone() for n, p in lm.model.named_parameters() if p.grad is not None}
    return {"logp": logp, "scored": scored, "embeds": [e.clone() for e in batch.video_embeds], "patch_rows": lm.encoder_patch_rows,
            "grads": grads, "world_size": topo.world_size}


def full_grid(pieces: list[dict]) -> torch.Tensor:
    """The ranks' slices back on one (rows, padded length) grid, in rank order."""
    grid = torch.cat([torch.zeros(p["scored"].shape) for p in pieces], dim=1)
    width = pieces[0]["scored"].shape[1]
    for rank, p in enumerate(pieces):
        part = torch.zeros(p["scored"].shape)
        part[p["scored"]] = p["logp"]
        grid[:, rank * width : (rank + 1) * width] = part
    return grid


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> list[str]:
    root = tmp_path_factory.mktemp("grpo-sp")
    spec = SynthSpec(videos=1)
    write_video(root / "a.mp4", [("red", 3), ("blue", 5)], spec)
    write_video(root / "b.mp4", [("green", 2), ("yellow", 4), ("red", 2)], spec)
    return [str(root / "a.mp4"), str(root / "b.mp4")]


def test_sp2_prefill_equals_sp1(videos):
    from parallel.local import run_local
    from tasks.grpo.prefill import scored_values

    responses = [[11, 12, 13, 14, 15], [21, 22, 1050], [31, 32, 33, 34, 35, 36, 37]]  # three lengths: odd totals get padded
    single = _prefill(videos, responses, 1)
    ranks = run_local(_prefill, SP, videos, responses, SP)

    for rank in ranks:  # stage 1: the all-gathered embeddings are the single-process ones
        assert len(rank["embeds"]) == len(single["embeds"]) == 2  # one per request: zip cannot skip any
        assert all(torch.allclose(x, y, atol=1e-6) for x, y in zip(rank["embeds"], single["embeds"]))
    assert ranks[0]["patch_rows"] + ranks[1]["patch_rows"] == single["patch_rows"]
    assert 0 < ranks[0]["patch_rows"] < single["patch_rows"]  # the frames were split

    sp_grid, grid = full_grid(ranks), full_grid([single])
    assert sp_grid.shape[1] >= grid.shape[1] and not sp_grid[:, grid.shape[1] :].any()
    assert torch.allclose(sp_grid[:, : grid.shape[1]], grid, atol=1e-5), float((sp_grid[:, : grid.shape[1]] - grid).abs().max())
    assert int(sum(r["scored"].sum() for r in ranks)) == sum(map(len, responses))
    # The update: DeepSpeed applies the mean of the ranks' gradients; it must be the SP=1 gradient.
    assert single["grads"].keys() == ranks[0]["grads"].keys() and not any(".visual." in n for n in single["grads"])
    worst = max(float((sum(r["grads"][n] for r in ranks) / SP - g).abs().max()) for n, g in single["grads"].items())
    assert worst < 1e-5, worst

    # Per-position values (advantages, weights) cut for each rank line up with its log-probs.
    from parallel.topology import SPGroup

    index = torch.arange(grid.numel()).view(grid.shape)
    for rank, piece in enumerate(ranks):
        where = scored_values(index, SPGroup(object(), rank, SP), piece["scored"])
        assert torch.allclose(grid.flatten()[where], piece["logp"], atol=1e-5)


def test_sp2_update_with_gradient_checkpointing_equals_sp1(videos):
    """Checkpointed layers are recomputed in backward with the attention they ran with: Ulysses
    (a forward that switched back to the checkpoint's attention when it returned made the recompute
    attend over one slice with all heads, and backward failed on the saved tensors' shapes)."""
    from parallel.local import run_local

    responses = [[11, 12, 13, 14, 15], [21, 22, 1050], [31, 32, 33, 34, 35, 36, 37]]
    single = _prefill(videos, responses, 1)
    ranks = run_local(_prefill, SP, videos, responses, SP, True)
    assert single["grads"].keys() == ranks[0]["grads"].keys()
    worst = max(float((sum(r["grads"][n] for r in ranks) / SP - g).abs().max()) for n, g in single["grads"].items())
    assert worst < 1e-5, worst

