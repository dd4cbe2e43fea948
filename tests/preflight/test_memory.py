"""The per-GPU memory estimate against what our training step really allocates.

On CPU, one real training step of our SFT path (`models.qwen_sp.SPQwen2_5_VL` at SP 1, the summed
cross-entropy of `parallel.loss`, torch's AdamW as DeepSpeed ZeRO-0 runs it) is measured on the tiny model
and on the rehearsal profile's `tiny-7b-layout` (Qwen2.5-VL-7B's head layout at tiny width), at SP 1 and
(bf16, two gloo ranks) SP 2: parameter, gradient and
optimizer-state bytes from the tensors themselves, the bytes autograd saves for backward through
`saved_tensors_hooks` (unique storages, parameters excluded), and the peak of live tensor storage over the
step, tracked op by op with a dispatch mode (every storage an op creates, until it is freed).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, replace

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from models.architecture import load_architecture
from tasks.preflight.memory import (
    GIB,
    MemoryEstimate,
    TrainingShape,
    activation_estimate,
    estimate_training_memory,
)

TOLERANCE = 0.25
FRAMES = 64  # 224 x 224 frames: 64 video tokens per temporal patch of the tiny preprocessing
TARGET = "<think>" + "the person opens the door and looks at the frames in order " * 20 + "</think><answer>B</answer>"


# ------------------------------------------------------------------------------------------------
# Measuring a real step
# ------------------------------------------------------------------------------------------------
class LiveStorage(TorchDispatchMode):
    """Bytes of the tensor storage that ops allocate while the mode is on and that is still alive; `peak`: the
    most at any time."""

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, int] = {}
        self.current = 0
        self.peak = 0

    def _freed(self, key: int) -> None:
        self.current -= self.live.pop(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        # An output sharing an input's storage (a view, an in-place op) allocated nothing.
        inputs = {t.untyped_storage()._cdata for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                key = storage._cdata
                if key not in self.live and key not in inputs and storage.nbytes():
                    self.live[key] = storage.nbytes()
                    self.current += storage.nbytes()
                    self.peak = max(self.peak, self.current)
                    weakref.finalize(storage, self._freed, key)
        return out


class SavedStorage:
    """Activation bytes: the batch's tensors and every storage autograd saves for backward while `hooks()`
    is on (unique storages, the module's parameters excluded)."""

    def __init__(self, module: torch.nn.Module, batch: dict[str, torch.Tensor]) -> None:
        self.parameters = {p.untyped_storage()._cdata for p in module.parameters()}
        self.storages = {t.untyped_storage()._cdata: t.untyped_storage().nbytes() for t in batch.values()}

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage._cdata not in self.parameters:
            self.storages[storage._cdata] = storage.nbytes()
        return t

    def hooks(self) -> torch.autograd.graph.saved_tensors_hooks:
        return torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    @property
    def bytes(self) -> int:
        return sum(self.storages.values())


@dataclass(frozen=True)
class Measured:
    parameters: int
    gradients: int
    optimizer_states: int
    activations: int  # the batch and what autograd saved for backward
    peak: int  # most live bytes during forward, backward and the optimizer step


def _storage_bytes(tensors) -> int:
    return sum({t.untyped_storage()._cdata: t.untyped_storage().nbytes() for t in tensors}.values())


def measure_step(model: torch.nn.Module, batch: dict[str, torch.Tensor], gradient_checkpointing: bool) -> Measured:
    """One training step of our SFT path at SP 1: forward, the summed cross-entropy, backward, AdamW."""
    from models.qwen_sp import SPQwen2_5_VL
    from parallel.loss import cross_entropy_sum
    from parallel.topology import SPGroup

    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    module = SPQwen2_5_VL(model, SPGroup.single())
    module.train()
    params = [p for p in module.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    # AdamW's state exists from the first step on; create it with a zero step so the measured step is a
    # steady-state one (zero gradients and no weight decay leave the weights as they are).
    for p in params:
        p.grad = torch.zeros_like(p)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    states = [s[k] for s in optimizer.state.values() for k in ("exp_avg", "exp_avg_sq")]  # not the scalar step counts

    saved = SavedStorage(module, batch)
    before = _storage_bytes([*module.parameters(), *module.buffers(), *states, *batch.values()])
    with LiveStorage() as live:
        with saved.hooks():
            shard = module(**batch)  # held through backward, as the SFT trainer's forward_backward does
            loss, _ = cross_entropy_sum(shard.logits, shard.targets)
        loss.backward()
        gradients = _storage_bytes([p.grad for p in params if p.grad is not None])
        del shard, loss
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return Measured(
        parameters=_storage_bytes(module.parameters()), gradients=gradients, optimizer_states=_storage_bytes(states),
        activations=saved.bytes, peak=before + live.peak,
    )


def _sp_activations(path: str, batch: dict[str, torch.Tensor], sp_degree: int) -> int:
    """One rank's activation bytes of a bf16 forward and backward at SP `sp_degree`
    (a worker of `parallel.local.run_local`)."""
    from models.qwen_sp import SPQwen2_5_VL
    from parallel.loss import cross_entropy_sum
    from parallel.topology import init_topology

    topo = init_topology(sp_degree)
    module = SPQwen2_5_VL(load_model(path, torch.bfloat16), topo.sp).train()
    saved = SavedStorage(module, batch)
    with saved.hooks():
        shard = module(**batch)
        loss, _ = cross_entropy_sum(shard.logits, shard.targets)
    loss.backward()
    return saved.bytes


# ------------------------------------------------------------------------------------------------
# Models and inputs
# ------------------------------------------------------------------------------------------------
REHEARSAL = "tiny-7b-layout"


@pytest.fixture(scope="module")
def tiny_path() -> str:
    from models.tiny import ensure_tiny_model

    return str(ensure_tiny_model())


@pytest.fixture(scope="module")
def rehearsal_path() -> str:
    """The rehearsal profile's model: Qwen2.5-VL-7B's attention layout (28 query heads, 4 KV heads, mRoPE
    16:24:24 scaled to head_dim 16, hidden 448) at tiny width, with the tiny tokenizer and vision tower."""
    from models.tiny import ensure_tiny_model

    return str(ensure_tiny_model(name=REHEARSAL))


@pytest.fixture(scope="module")
def batch(tiny_path: str) -> dict[str, torch.Tensor]:
    """One SFT example through the real encoding: a FRAMES-frame video, a question, a reasoning target."""
    from transformers import AutoTokenizer

    from models.video import SampledFrames
    from models.vlm import load_preprocess_config
    from tasks.sft.data import SFTExample, collate, encode_example

    tokenizer = AutoTokenizer.from_pretrained(tiny_path)
    pixels = np.random.default_rng(0).integers(0, 256, (FRAMES, 224, 224, 3), dtype=np.uint8)
    video = SampledFrames(pixels, [i / 2 for i in range(FRAMES)], list(range(FRAMES)), 2.0, "synthetic", 2.0, (0.0, FRAMES / 2), FRAMES)
    example = SFTExample("memory", "synthetic", "What does the person do first?", TARGET)
    return collate([encode_example(tokenizer, load_preprocess_config(tiny_path), example, video)], tokenizer.pad_token_id)


def load_model(path: str, dtype: torch.dtype):
    from transformers import AutoModelForImageTextToText

    return AutoModelForImageTextToText.from_pretrained(path, dtype=dtype)


def shape_of(batch: dict[str, torch.Tensor], precision: str, gradient_checkpointing: bool) -> TrainingShape:
    """What `lvr check` would know about this step: one sequence, its response, its video's patches."""
    return TrainingShape(
        precision=precision, gradient_checkpointing=gradient_checkpointing, micro_batch_size=1,
        seq_len=int(batch["input_ids"].shape[1]), scored_tokens=int((batch["labels"] != -100).sum()),
        video_patches=int(batch["video_grid_thw"].prod(-1).sum()), train_vision=True,
    )


def close(estimate: int, measured: int) -> bool:
    return abs(estimate - measured) <= TOLERANCE * measured


CASES = [
    pytest.param("tiny_path", False, id="tiny"),
    pytest.param("tiny_path", True, id="tiny-gc"),
    pytest.param("rehearsal_path", False, id="rehearsal"),
    pytest.param("rehearsal_path", True, id="rehearsal-gc"),
]


@pytest.mark.parametrize(("model", "checkpointing"), CASES)
def test_estimate_is_within_a_quarter_of_a_measured_fp32_training_step(
    model: str, checkpointing: bool, request: pytest.FixtureRequest, batch: dict[str, torch.Tensor]
) -> None:
    """fp32 at ZeRO-0 is exactly what DeepSpeed runs for one process: torch's AdamW on the weights."""
    path = request.getfixturevalue(model)
    measured = measure_step(load_model(path, torch.float32), batch, checkpointing)
    arch = load_architecture(path)  # what `lvr check` reads: the checkpoint's config.json
    shape = shape_of(batch, "fp32", checkpointing)
    estimate = estimate_training_memory(arch, shape)
    activations = activation_estimate(arch, shape)
    report = f"{measured}\n{estimate.table()}\nestimated activations {activations}"

    # Exact where it is cheap: the architecture's parameter count, fp32 gradients, AdamW's two moments.
    assert estimate.bytes_of("parameters") == measured.parameters, report
    assert estimate.bytes_of("gradients") == measured.gradients, report
    assert estimate.bytes_of("optimizer states (AdamW moments, fp32 master)") == measured.optimizer_states, report
    assert close(activations.saved, measured.activations), report
    assert close(estimate.total_bytes, measured.peak), report


@pytest.mark.parametrize("checkpointing", [False, True], ids=["bf16", "bf16-gc"])
def test_bf16_activations_of_the_rehearsal_model(checkpointing: bool, rehearsal_path: str, batch: dict[str, torch.Tensor]) -> None:
    """Under bf16 the saved tensors change (fp32 copies in RMSNorm, bf16 logits held beside the fp32 ones).
    The fp32 master and moments are DeepSpeed's (plain AdamW keeps bf16 ones), so this compares the
    gradients and the forward/backward."""
    measured = measure_step(load_model(rehearsal_path, torch.bfloat16), batch, checkpointing)
    arch = load_architecture(rehearsal_path)
    shape = shape_of(batch, "bf16", checkpointing)
    activations = activation_estimate(arch, shape)
    assert close(activations.saved, measured.activations), (measured, activations)
    # The peak beside weights and AdamW's state (bf16 here: plain AdamW, no DeepSpeed master): gradients and
    # the forward/backward activations.
    forward_backward = measured.peak - measured.parameters - measured.optimizer_states
    assert close(estimate_training_memory(arch, shape).bytes_of("gradients") + activations.peak, forward_backward), (measured, activations)


def test_ulysses_activations_per_rank_at_sp_2(rehearsal_path: str, batch: dict[str, torch.Tensor]) -> None:
    """Two gloo ranks share the sequence: each saves its slice's layers (Ulysses' q|k|v buffer, repeated KV,
    the output and its copy for o_proj) and its share of the vision tower, beside the whole batch."""
    from parallel.local import run_local

    ranks = run_local(_sp_activations, 2, rehearsal_path, batch, 2)
    shape = replace(shape_of(batch, "bf16", False), world_size=2, sp_degree=2)
    estimate = activation_estimate(load_architecture(rehearsal_path), shape)
    assert all(close(estimate.saved, measured) for measured in ranks), (estimate, ranks)


# ------------------------------------------------------------------------------------------------
# The arithmetic
# ------------------------------------------------------------------------------------------------
SEVEN_B = "Qwen/Qwen2.5-VL-7B-Instruct"
PRODUCTION_FRAMES = 512
TOKENS_PER_FRAME = 150


def production_shape(**changes) -> TrainingShape:
    video = PRODUCTION_FRAMES * TOKENS_PER_FRAME
    shape = TrainingShape(
        world_size=8, sp_degree=4, zero_stage=3, precision="bf16", gradient_checkpointing=True, micro_batch_size=1,
        seq_len=video + 2048, scored_tokens=1024, video_patches=4 * video, train_vision=True, reference_model=True,
        gpu_memory_gb=80,
    )
    return replace(shape, **changes)


def test_zero_stages_partition_over_the_whole_world() -> None:
    arch = load_architecture(SEVEN_B)
    alone = estimate_training_memory(arch, TrainingShape(world_size=8, zero_stage=0, seq_len=1024))
    names = ("parameters", "gradients", "optimizer states (AdamW moments, fp32 master)")
    full = [alone.bytes_of(n) for n in names]
    for stage, divided in ((1, (False, False, True)), (2, (False, True, True)), (3, (True, True, True))):
        e = estimate_training_memory(arch, TrainingShape(world_size=8, zero_stage=stage, seq_len=1024))
        assert [e.bytes_of(n) for n in names] == [-(-f // 8) if d else f for f, d in zip(full, divided)], stage
        assert e.bytes_of("ZeRO buffers") > 0
    # SP ranks are ZeRO ranks too: DeepSpeed gets no mpu, so its data-parallel group is the whole world.
    sp = estimate_training_memory(arch, TrainingShape(world_size=8, sp_degree=4, zero_stage=3, seq_len=1024))
    assert sp.bytes_of("parameters") == -(-arch.num_parameters * 2 // 8)


def test_bf16_keeps_an_fp32_master_and_fp32_moments() -> None:
    arch = load_architecture(SEVEN_B)
    n = arch.num_parameters
    bf16 = estimate_training_memory(arch, TrainingShape(zero_stage=0, precision="bf16", seq_len=1024))
    assert bf16.bytes_of("parameters") == 2 * n and bf16.bytes_of("gradients") == 2 * n
    assert bf16.bytes_of("optimizer states (AdamW moments, fp32 master)") == 12 * n
    assert bf16.bytes_of("fp32 gradients at the step") == 4 * n
    fp32 = estimate_training_memory(arch, TrainingShape(zero_stage=0, precision="fp32", seq_len=1024))
    assert fp32.bytes_of("optimizer states (AdamW moments, fp32 master)") == 8 * n
    zero2 = estimate_training_memory(arch, TrainingShape(zero_stage=2, precision="fp32", seq_len=1024))
    assert zero2.bytes_of("optimizer states (AdamW moments, fp32 master)") == 12 * n  # the partition's clone


def test_grpo_freezes_the_vision_tower_and_keeps_a_whole_reference() -> None:
    arch = load_architecture(SEVEN_B)
    shape = TrainingShape(world_size=8, sp_degree=4, zero_stage=2, seq_len=4096, train_vision=False, reference_model=True)
    e = estimate_training_memory(arch, shape)
    assert e.bytes_of("gradients") == -(-arch.text_parameters * 2 // 8)
    assert e.bytes_of("reference model") == 2 * arch.num_parameters


def test_sequence_parallelism_divides_the_activations_but_not_the_response_logits() -> None:
    arch = load_architecture(SEVEN_B)
    one = activation_estimate(arch, production_shape(world_size=1, sp_degree=1, gradient_checkpointing=False))
    four = activation_estimate(arch, production_shape(world_size=4, sp_degree=4, gradient_checkpointing=False))
    assert 0.2 < (four.saved - four.logits_saved) / (one.saved - one.logits_saved) < 0.35  # Ulysses keeps a little more per token
    assert four.logits_saved == one.logits_saved  # the response lives on the last rank


def test_gradient_checkpointing_keeps_one_input_per_layer() -> None:
    arch = load_architecture(SEVEN_B)
    text = {"video_patches": 0, "train_vision": False}
    off = activation_estimate(arch, production_shape(gradient_checkpointing=False, **text))
    on = activation_estimate(arch, production_shape(gradient_checkpointing=True, **text))
    assert on.saved < off.saved / 10
    assert on.backward > 0


def test_production_shape_fits_80gb_and_the_naive_one_does_not() -> None:
    arch = load_architecture(SEVEN_B)
    production = estimate_training_memory(arch, production_shape())
    assert production.fits(), production.table()
    naive = estimate_training_memory(arch, production_shape(precision="fp32", gradient_checkpointing=False, zero_stage=0))
    assert not naive.fits()
    assert naive.total_bytes > 4 * production.total_bytes


def test_a_colocated_vllm_needs_its_share_beside_the_persistent_state() -> None:
    arch = load_architecture(SEVEN_B)
    shape = production_shape(rollout_share=0.9)
    e = estimate_training_memory(arch, shape)
    assert e.peak_phase == "rollout"
    held = e.total_bytes - int(0.9 * 80 * GIB)
    assert held == sum(e.bytes_of(n) for n in ("parameters", "optimizer states (AdamW moments, fp32 master)", "reference model"))
    assert not e.fits()


def test_table_lists_every_row_in_gib_and_the_verdict() -> None:
    e: MemoryEstimate = estimate_training_memory(load_architecture(SEVEN_B), production_shape())
    table = e.table()
    assert all(name in table for name, _ in e.rows)
    assert table.splitlines()[-1].endswith("fits") and f"{e.total_bytes / GIB:.2f}  peak" in table
