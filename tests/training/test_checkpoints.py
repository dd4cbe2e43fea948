"""Checkpoint files are read with `weights_only=True`: a crafted file that pickles an object (here one
whose unpickling touches a marker file) is refused before it runs, while real checkpoints (RNG
states, a DeepSpeed ZeRO engine's files) still round-trip exactly.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch

from parallel.local import run_local
from tasks.training import checkpoints as ckpt


class Payload:
    """What an attacker pickles into a checkpoint: unpickling it calls `Path.touch(marker)`."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_rng_state_round_trips_and_a_crafted_rng_file_is_refused(tmp_path):
    path = tmp_path / "rng-rank-00000.pt"
    ckpt.save_rng_state(path)
    expected = torch.rand(5)
    torch.rand(7)  # move on, as training would
    ckpt.load_rng_state(path)
    assert torch.equal(torch.rand(5), expected)

    marker = tmp_path / "pwned"
    torch.save({"cpu": torch.get_rng_state(), "extra": Payload(marker)}, path)
    with pytest.raises(pickle.UnpicklingError):
        ckpt.load_rng_state(path)
    assert not marker.exists()


def _deepspeed_round_trip(root: str, stage: int) -> dict:
    """One gloo rank: train a step, checkpoint, resume it through the weights-only path, then plant
    a crafted object in the checkpoint and resume again, with and without that path."""
    from tasks.training.loop import import_deepspeed

    deepspeed = import_deepspeed()

    def engine():
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2))
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
        config = {"train_micro_batch_size_per_gpu": 1, "gradient_clipping": 1.0, "zero_optimization": {"stage": stage},
                  "zero_allow_untested_optimizer": True, "steps_per_print": 2**31 - 1}
        return deepspeed.initialize(model=model, optimizer=optimizer, config=config)[0]

    trained = engine()
    trained.backward(trained(torch.ones(1, 4)).sum())
    trained.step()
    trained.save_checkpoint(root, tag="state", save_latest=False)
    weights = {k: v.clone() for k, v in trained.module.state_dict().items()}

    resumed = engine()
    ckpt.use_weights_only_loads(resumed)
    resumed.load_checkpoint(root, tag="state")
    restored = all(torch.equal(v, weights[k]) for k, v in resumed.module.state_dict().items())

    states = min((Path(root) / "state").glob("*model_states.pt"))
    crafted = torch.load(states, weights_only=False)  # our own file, written just above
    marker = Path(root) / "pwned"
    crafted["payload"] = Payload(marker)
    torch.save(crafted, states)
    refused = ""
    guarded = engine()
    ckpt.use_weights_only_loads(guarded)
    try:
        guarded.load_checkpoint(root, tag="state")
    except pickle.UnpicklingError as exc:
        refused = str(exc)
    ran_guarded = marker.exists()
    engine().load_checkpoint(root, tag="state")  # DeepSpeed's own loader unpickles it: the threat is real
    return {"restored": restored, "refused": refused, "ran_guarded": ran_guarded, "ran_unguarded": marker.exists()}


@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_checkpoints_resume_weights_only_and_refuse_crafted_files(tmp_path, stage):
    (result,) = run_local(_deepspeed_round_trip, 1, str(tmp_path / "ckpt"), stage)
    assert result["restored"] and "Unsupported global" in result["refused"]
    assert not result["ran_guarded"] and result["ran_unguarded"]
