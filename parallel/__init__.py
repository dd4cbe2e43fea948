"""Sequence parallelism for long multimodal sequences, and the distributed launch helper.

A library shared by SFT (`tasks/sft`) and GRPO's sequence-parallel prefill; nothing here knows
about stages or configs.

- `parallel.topology`: `SPGroup` (this rank's sequence-parallel group) and `init_topology`, which
  cuts the world into data-parallel replicas of `sp_degree` consecutive ranks each.
- `parallel.ulysses`: DeepSpeed-Ulysses attention over `torch.distributed` (all-to-all from
  sequence shards to head shards and back, autograd-correct, GQA-aware), registered in
  transformers' `AttentionInterface` as `"lvr_ulysses"`.
- `parallel.sequence`: padding a sequence to a multiple of the SP degree, slicing shards, shifting
  labels, an autograd-correct gather of unequal pieces, and the split of video frames over ranks.
- `parallel.loss`: per-token log-probabilities and cross-entropy on a slice, summed token counts.
- `parallel.launch`: start `torchrun` from argv, stream its workers' logs, raise the failing
  worker's traceback; the worker-side entry wrapper (traceback file, orphan guard).
- `parallel.local`: run a function on a few local gloo processes (tests, CPU benchmarks).

The Qwen2.5-VL model wrapper that puts these together is `models.qwen_sp.SPQwen2_5_VL`.

Gradient convention (every function here follows it): each collective's backward is its exact
adjoint, and each rank back-propagates only its own share of the objective, so the true gradient
of a parameter is the SUM of its gradients over the SP group (and the mean over data-parallel
replicas). A trainer whose optimizer averages gradients over all ranks (DeepSpeed does) therefore
scales the loss it back-propagates by the number of ranks it averages over and divides by the
token count of everything averaged (`tasks/sft/trainer.forward_backward`).
"""
