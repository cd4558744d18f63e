"""The benchmark's GPU path on CPU: the DDP strategy on one device trains exactly like the plain module."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# One training step of a benchmark system, plain and through DistributedDataParallel (gloo, world size 1, file
# rendezvous), from the same seed; prints the largest parameter difference after the step and the loss.
SCRIPT = """
import json, sys, torch
sys.path.insert(0, "benchmarks")
import bench_train

name = sys.argv[1]
before, after = [], []
for ddp in (False, True):
    torch.manual_seed(0)
    system = bench_train.build_system(name, torch.device("cpu"), ddp)
    before.append([p.detach().clone() for p in system.model.parameters()])
    system.step()
    after.append([p.detach().clone() for p in system.model.parameters()])
wrapped = torch.distributed.is_initialized() and torch.distributed.get_world_size() == 1
diff = max((a - b).abs().max().item() for a, b in zip(*after))
moved = max((a - b).abs().max().item() for a, b in zip(before[0], after[0]))
start_diff = max((a - b).abs().max().item() for a, b in zip(*before))
print(json.dumps({"diff": diff, "wrapped": wrapped, "moved": moved, "start_diff": start_diff}))
"""


@pytest.mark.parametrize("name", ["vlp_b", "blip_reuse"])
def test_ddp_step_on_one_process_matches_the_plain_step(name):
    pytest.importorskip("transformers")
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, name], cwd=ROOT, capture_output=True, text=True, timeout=600, check=False
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["wrapped"]
    assert result["start_diff"] == 0.0  # both builds start from the same weights
    assert result["moved"] > 1e-6  # the step changed them
    assert result["diff"] < 1e-6  # DDP on one process: the same update as the plain module
