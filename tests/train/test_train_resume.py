"""A run killed mid-epoch and resumed continues exactly as the uninterrupted run (losses, queue, momentum)."""

from __future__ import annotations

import csv
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from vlp.train.run import train

STEPS = 12  # 64 samples / batch 8 = 8 steps per epoch: the run crosses an epoch boundary
RUN = [
    "trainer.deterministic=true",
    "trainer.max_epochs=10",
    "trainer.log_every_n_steps=1",
    f"optim.total_steps={STEPS}",  # the schedule must not depend on when a run is told to stop
    "optim.warmup_steps=2",
    "callbacks.checkpoint.every_n_train_steps=3",
    "callbacks.checkpoint.keep_last=10",
    "callbacks.val.enabled=false",
    "callbacks.plots=false",
    "callbacks.throughput=false",
    "seed=7",
    # Full-image crops: the data layer draws crops from the process-global generator, so a resumed epoch
    # reproduces its sample order but not its random crops.
    "data.crop_scale=[1.0,1.0]",
]


def per_step(metrics_csv: Path, key: str) -> dict[int, float]:
    """The last value logged for each step (a resumed run appends to the killed run's file)."""
    values = {}
    with open(metrics_csv, newline="") as f:
        for row in csv.DictReader(f):
            if row.get(key):
                values[int(row["step"])] = float(row[key])
    return values


def _state(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.mark.slow
def test_killed_mid_epoch_then_resumed_matches_the_uninterrupted_run(
    compose, tiny, tmp_path, subprocess_env, train_cmd
):
    # Reference: the uninterrupted run.
    ref_dir = tmp_path / "reference"
    train(compose(tiny(*RUN, f"trainer.max_steps={STEPS}", output_dir=ref_dir)))

    # The same run in its own process, killed (SIGKILL) once its mid-epoch checkpoint at step 6 exists.
    run_dir = tmp_path / "killed"
    overrides = [o for o in tiny(*RUN, output_dir=run_dir) if not o.startswith("paths.output_dir")]
    overrides.append(f"hydra.run.dir={run_dir}")
    # Same thread count as this process: float sums in another order could flip a hard-negative draw.
    env = subprocess_env(OMP_NUM_THREADS=str(torch.get_num_threads()))
    log = open(tmp_path / "killed.log", "w")
    proc = subprocess.Popen(train_cmd(*overrides, "trainer.max_steps=1000"), env=env, stdout=log, stderr=log)
    target, last = run_dir / "checkpoints" / "step00000006.ckpt", run_dir / "checkpoints" / "last.ckpt"
    while proc.poll() is None and not (target.exists() and last.stat().st_mtime_ns >= target.stat().st_mtime_ns):
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert target.exists(), (tmp_path / "killed.log").read_text()[-3000:]
    resumed_from = _state(last)["global_step"]
    assert 6 <= resumed_from < STEPS

    # Resume in a new process: resume=true picks up last.ckpt of the same run directory.
    done = subprocess.run(
        train_cmd(*overrides, f"trainer.max_steps={STEPS}", "resume=true"),
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"continuing from {run_dir / 'checkpoints' / 'last.ckpt'}" in done.stdout + done.stderr

    # Every step after the checkpoint has the loss of the uninterrupted run.
    ref_loss = per_step(ref_dir / "csv" / "metrics.csv", "train/loss")
    new_loss = per_step(run_dir / "csv" / "metrics.csv", "train/loss")
    steps = range(resumed_from, STEPS)
    assert set(steps) <= set(new_loss)
    for step in steps:
        assert new_loss[step] == pytest.approx(ref_loss[step], abs=1e-4), step

    # And the final states agree: weights, momentum copies, queue with its pointer, optimizer, data position.
    ref, new = _state(ref_dir / "checkpoints" / "last.ckpt"), _state(run_dir / "checkpoints" / "last.ckpt")
    assert ref["global_step"] == new["global_step"] == STEPS
    for name, tensor in ref["state_dict"].items():
        torch.testing.assert_close(new["state_dict"][name], tensor, atol=1e-5, rtol=1e-5, msg=name)
    assert any(name.endswith("queue.ptr") for name in ref["state_dict"])
    assert any("_m." in name for name in ref["state_dict"])
    ref_opt, new_opt = ref["optimizer_states"][0]["state"], new["optimizer_states"][0]["state"]
    for index, slots in ref_opt.items():
        torch.testing.assert_close(new_opt[index]["exp_avg"], slots["exp_avg"], atol=1e-6, rtol=1e-4)
    assert ref["VLPDataModule"]["sampler"] == new["VLPDataModule"]["sampler"]
