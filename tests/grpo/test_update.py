"""One GRPO step on a toy case: rollouts graded by the real rewards, group advantages, the
clipped KL-penalised update through the cached-embedding prefill; the rewarded answer becomes more
likely than it was and than the others."""

from __future__ import annotations

import pytest
import torch

from models.video import FrameSampling, read_frames
from models.vlm import HFVideoLM
from parallel.embedding_cache import VideoRequest, encode_requests
from parallel.topology import SPGroup, Topology
from tasks.config import GRPOConfig
from tasks.grading.prompts import user_prompt
from tasks.grpo import core_algos
from tasks.grpo.data import RLExample
from tasks.grpo.prefill import (
    PolicyBatch,
    PolicyModule,
    pack_sequences,
    response_logprobs,
)
from tasks.grpo.rollout import make_rollout, stop_token_ids
from tasks.grpo.trainer import plan_update, policy_update, score_rollouts
from tasks.samples.synth import PALETTE, SynthSpec, write_video

SINGLE = SPGroup.single()
TOPOLOGY = Topology(0, 1, SINGLE, 0, 1)


class PlainUpdater:
    """The DeepSpeed engine's three calls over a plain torch optimizer (one process)."""

    def __init__(self, model: torch.nn.Module, lr: float):
        self.module = PolicyModule(model, SINGLE)
        self.optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)

    def __call__(self, seqs: PolicyBatch):
        return self.module(seqs)

    def backward(self, loss: torch.Tensor, scale_wrt_gas: bool = False) -> None:
        loss.backward()

    def step(self) -> None:
        self.optimizer.step()
        self.optimizer.zero_grad()


def sequence_logprobs(model: torch.nn.Module, seqs: PolicyBatch) -> torch.Tensor:
    with torch.no_grad():
        logp, scored = response_logprobs(model, seqs, SINGLE)
    grid = torch.zeros(scored.shape)
    grid[scored] = logp
    return grid.sum(dim=1)


@pytest.mark.parametrize("loss_agg", ["token_mean", "seq_mean"])
def test_one_step_raises_the_rewarded_answer(tmp_path, loss_agg):
    write_video(tmp_path / "v.mp4", [("red", 5), ("blue", 3)], SynthSpec(videos=1))
    options = [name for name, _ in PALETTE]
    question = "Which colour is shown first in the video?"
    example = RLExample("q", "v", str(tmp_path / "v.mp4"), "multiple_choice", question, tuple(options), "A",
                        user_prompt(question, "multiple_choice", options))
    policy = HFVideoLM("tiny", device="cpu")
    reference = HFVideoLM("tiny", device="cpu").model.requires_grad_(False)
    frames = read_frames(example.video_uri, FrameSampling(num_frames=8))
    batch, _ = encode_requests(policy.model, policy.tokenizer, policy.preprocess, [VideoRequest(example.messages(), frames, "v")], SINGLE)

    tok = policy.tokenizer
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    texts = ["<think>The first colour is red.</think><answer>A</answer>", "<think>The first colour is blue.</think><answer>C</answer>",
             "<think>The first colour is red.</think><answer>A</answer>", "<think>It is green.</think><answer>B</answer>"]
    group = [make_rollout(tok(t, add_special_tokens=False)["input_ids"] + [eos], stop_token_ids(policy.model, tok), tok) for t in texts]
    assert [r.text for r in group] == texts and all(r.finished for r in group)

    cfg = GRPOConfig(group_size=4, micro_batch_size=3, beta=0.04, loss_agg=loss_agg)
    scores = score_rollouts([example.answer_key()], [group], cfg, judge=None)
    assert scores.reward[0].tolist() == pytest.approx([1.0, 0.1, 1.0, 0.1])
    advantages = core_algos.group_advantages(scores.reward, cfg.adv_eps)[0]
    seqs = pack_sequences(batch, [0] * 4, [r.token_ids for r in group], tok.pad_token_id)
    plan = plan_update(seqs, advantages, 1.0, cfg, TOPOLOGY)
    assert plan.micro == ((0, 1, 2), (3,)) and plan.n_sequences == 4

    before = sequence_logprobs(policy.model, seqs)
    calls = policy.encoder_calls
    stats = policy_update(PlainUpdater(policy.model, lr=0.05), reference, plan, cfg, TOPOLOGY)
    after = sequence_logprobs(policy.model, seqs)
    assert policy.encoder_calls == calls  # policy and reference prefills reuse the embeddings
    assert (after[[0, 2]] > before[[0, 2]]).all(), (before, after)
    # Relative to each unrewarded answer (response 1 shares the rewarded reasoning's wording, so
    # its own probability may rise with it; only the margin is promised).
    assert (after[0] - after[[1, 3]] > before[0] - before[[1, 3]]).all(), (before, after)
    assert after[3] < before[3]  # the answer sharing nothing but the tags loses probability
    assert stats["kl"] == 0.0 and stats["clip_fraction"] == 0.0  # on-policy, reference = policy before the step
    # The vision tower is untouched by the update (frozen in GRPO, and its embeddings carry no gradient).
    assert all(p.grad is None for p in policy.model.model.visual.parameters())


def test_zero_variance_groups_are_dropped_and_an_empty_step_skips_the_update(tmp_path):
    rewards = torch.tensor([[1.0, 1.0, 1.0, 1.0], [0.0, 1.0, 0.0, 0.0]])
    keep = ~core_algos.zero_variance(rewards)
    assert keep.tolist() == [False, True]
    cfg = GRPOConfig(group_size=4)
    seqs = PolicyBatch(*(torch.ones(1, 3, dtype=torch.long) for _ in range(3)), labels=torch.tensor([[-100, 5, 6]]),
                       video_grid_thw=torch.ones(1, 3, dtype=torch.long), second_per_grid_ts=torch.ones(1), video_embeds=(torch.zeros(0, 1),))
    empty = plan_update(seqs, torch.zeros(1), 0.0, cfg, TOPOLOGY)  # every group dropped: zero weight, no totals
    assert empty.n_sequences == 0 and empty.scale == (0.0,)
