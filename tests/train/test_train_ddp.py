"""Two-process DDP on CPU (gloo, loopback) through train.py, checked against one process with the same world batch."""

from __future__ import annotations

import csv
import subprocess
from pathlib import Path

import pytest
import torch

from vlp.train.run import train

STEPS = 3
RUN = [
    "trainer.max_steps=3",
    "trainer.log_every_n_steps=1",
    "data.crop_scale=[1.0,1.0]",  # identical pixels in both runs
    "callbacks.checkpoint.every_n_train_steps=3",
    "seed=11",
]


def first_row(metrics_csv: Path, key: str) -> float:
    with open(metrics_csv, newline="") as f:
        return next(float(row[key]) for row in csv.DictReader(f) if row.get(key))


@pytest.mark.slow
def test_two_process_ddp_end_to_end_matches_one_process(compose, tiny, tmp_path, subprocess_env, train_cmd):
    # Two ranks of 4 samples each, launched by Lightning from train.py as a user would.
    ddp_dir = tmp_path / "ddp"
    overrides = [o for o in tiny(*RUN, "data.batch_size=4") if not o.startswith("paths.output_dir")]
    done = subprocess.run(
        train_cmd(*overrides, "trainer=ddp_cpu", f"hydra.run.dir={ddp_dir}"),
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-4000:]

    # One process with the same world batch of 8 (the sharded sampler deals the same 8 samples to the 2 ranks).
    single_dir = tmp_path / "single"
    train(compose(tiny(*RUN, "data.batch_size=8", output_dir=single_dir)))

    # Before any update the world-averaged ITC loss is the one-process loss (queue empty, alpha ramped to 0).
    ddp_csv, single_csv = ddp_dir / "csv" / "metrics.csv", single_dir / "csv" / "metrics.csv"
    assert first_row(ddp_csv, "train/itc_loss") == pytest.approx(first_row(single_csv, "train/itc_loss"), abs=1e-5)
    assert first_row(ddp_csv, "train/temperature") == pytest.approx(0.07)

    # The run finished: checkpoint with the world batch enqueued at every step, validation on both ranks.
    state = torch.load(ddp_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert state["global_step"] == STEPS
    assert int(state["state_dict"]["model.queue.count"]) == STEPS * 8
    assert state["hyper_parameters"]["cfg"]["trainer"]["strategy"] == "ddp"
    assert 0.0 <= first_row(ddp_csv, "val/r_mean") <= 100.0
    assert (ddp_dir / "config.yaml").exists() and (ddp_dir / "git_commit.txt").exists()
    assert (ddp_dir / "curves.png").stat().st_size > 0
