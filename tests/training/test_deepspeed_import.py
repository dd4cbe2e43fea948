"""`tasks.training.loop.import_deepspeed`: DeepSpeed for the trainers without the torch.compile that its Muon
module runs on import (1.9 s of every rank's start-up on CPU, for an optimizer lvr never builds)."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.support.paths import REPO

PROBE = """
import json, torch
compile_ = torch.compile
from tasks.training.loop import import_deepspeed
import_deepspeed()
from deepspeed.runtime.zero.muon import original_muon
from deepspeed.runtime.zero.muon.muon_optimizer import MuonWithAuxAdam
print(json.dumps({
    "compiled": hasattr(original_muon.zeropower_via_newtonschulz5, "_torchdynamo_orig_callable"),
    "torch_compile_restored": torch.compile is compile_,
    # What ZeRO's engines ask of the module at initialize.
    "adamw_is_muon": isinstance(torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))]), MuonWithAuxAdam),
}))
"""


def probe() -> dict:
    # A fresh interpreter: this one may have imported DeepSpeed's Muon module already.
    out = subprocess.run([sys.executable, "-c", PROBE], cwd=REPO, capture_output=True, text=True, timeout=120,
                         env={"DS_ACCELERATOR": "cpu", "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_muon_is_loaded_uncompiled_and_torch_compile_is_left_as_it_was():
    # Plain `import deepspeed` and a ZeRO initialize leave "compiled" True.
    assert probe() == {"compiled": False, "torch_compile_restored": True, "adamw_is_muon": False}
