"""Run artifacts: atomic checkpoint writes, resume lookup, git commit, wandb mode, training-curve plots."""

from __future__ import annotations

import importlib.util
import os
import re
import time
from pathlib import Path

import pytest
import torch

from vlp.train import checkpoint as ckpt_module
from vlp.train.builders import wandb_mode
from vlp.train.checkpoint import AtomicCheckpointIO, git_commit, load_checkpoint, resume_path
from vlp.train.config import WandbConfig
from vlp.train.plots import plot_curves, read_metrics

REPO_ROOT = Path(__file__).resolve().parents[2]


def test_atomic_save_replaces_the_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "ckpt" / "last.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint({"step": torch.tensor(1)}, path)
    io.save_checkpoint({"step": torch.tensor(2)}, path)
    assert int(io.load_checkpoint(path)["step"]) == 2
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.ckpt"]


def test_a_write_that_dies_midway_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "last.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint({"step": torch.tensor(1)}, path)

    def dying_save(obj, f):
        f.write(b"PK\x03\x04 half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(ckpt_module.torch, "save", dying_save)
    with pytest.raises(OSError, match="disk full"):
        io.save_checkpoint({"step": torch.tensor(2)}, path)
    monkeypatch.undo()
    assert int(load_checkpoint(path)["step"]) == 1


def test_checkpoints_are_loaded_with_weights_only(tmp_path):
    path = tmp_path / "evil.ckpt"
    torch.save({"payload": Path("not/a/tensor")}, path)  # a pickled class instance, not plain data
    with pytest.raises(Exception, match="[Ww]eights only"):
        load_checkpoint(path)
    with pytest.raises(Exception, match="[Ww]eights only"):
        AtomicCheckpointIO().load_checkpoint(path)


def test_resume_path(tmp_path):
    assert resume_path(None, False, tmp_path) is None
    assert resume_path(None, True, tmp_path) is None  # nothing to resume yet: a fresh start
    (tmp_path / "last.ckpt").write_bytes(b"")
    assert resume_path(None, True, tmp_path) == str(tmp_path / "last.ckpt")
    # A SLURM pre-emption checkpoint written after last.ckpt is newer: it wins.
    hpc = tmp_path / "hpc_ckpt_1.ckpt"
    hpc.write_bytes(b"")
    os.utime(hpc, ns=(time.time_ns() + 10**9, time.time_ns() + 10**9))
    assert resume_path(None, True, tmp_path, output_dir=tmp_path) == str(hpc)
    with pytest.raises(FileNotFoundError, match="ckpt=.*missing.ckpt"):
        resume_path(str(tmp_path / "missing.ckpt"), False, tmp_path)


def test_git_commit(tmp_path):
    assert re.fullmatch(r"[0-9a-f]{40}(-dirty)?", git_commit(REPO_ROOT))
    assert git_commit(tmp_path) == "unknown"


def test_wandb_is_offline_without_an_api_key_and_online_with_one(tmp_path):
    auto = WandbConfig(mode="auto")
    no_netrc = tmp_path / "none"
    assert wandb_mode(auto, env={}, netrc_path=no_netrc) == "offline"
    assert wandb_mode(auto, env={"WANDB_API_KEY": "x" * 40}, netrc_path=no_netrc) == "online"

    netrc = tmp_path / "netrc"
    netrc.write_text("machine api.wandb.ai\n  login user\n  password " + "y" * 40 + "\n")
    assert wandb_mode(auto, env={}, netrc_path=netrc) == "online"
    netrc.write_text("machine example.org\n  login user\n  password z\n")
    assert wandb_mode(auto, env={}, netrc_path=netrc) == "offline"

    # WANDB_MODE wins; an explicit mode is kept.
    assert wandb_mode(auto, env={"WANDB_MODE": "disabled", "WANDB_API_KEY": "k"}, netrc_path=no_netrc) == "disabled"
    assert wandb_mode(WandbConfig(mode="offline"), env={"WANDB_API_KEY": "k"}, netrc_path=no_netrc) == "offline"


@pytest.mark.skipif(importlib.util.find_spec("tensorboard") is not None, reason="TensorBoard is installed")
def test_tensorboard_without_the_package_names_the_key(compose, tmp_path):
    from vlp.train.builders import build_loggers
    from vlp.train.config import load_config

    cfg = load_config(compose(["logger=tensorboard", f"paths.output_dir={tmp_path}"]))
    with pytest.raises(ValueError, match="logger.tensorboard"):
        build_loggers(cfg, tmp_path)


def _write_lightning_csv(path: Path) -> None:
    # Lightning's CSV layout: one sparse row per logging call, every key a column.
    path.write_text(
        "epoch,step,train/loss,train/itc_loss,train/temperature,val/r_mean,val/itc_r_mean\n"
        "0,0,5.0,4.0,0.07,,\n"
        "0,1,4.5,3.6,0.068,,\n"
        "0,1,,,,12.5,11.0\n"
        "0,2,4.0,3.1,0.066,,\n"
        "0,3,3.0,2.4,0.064,,\n"
        "0,3,,,,20.0,17.5\n"
    )


def test_read_metrics_collects_sparse_rows(tmp_path):
    csv_path = tmp_path / "metrics.csv"
    _write_lightning_csv(csv_path)
    series = read_metrics(csv_path)
    assert series["train/loss"] == [(0, 5.0), (1, 4.5), (2, 4.0), (3, 3.0)]
    assert series["val/r_mean"] == [(1, 12.5), (3, 20.0)]
    assert "epoch" not in series


def test_plot_curves_writes_a_png(tmp_path):
    csv_path = tmp_path / "metrics.csv"
    _write_lightning_csv(csv_path)
    out = plot_curves(csv_path, tmp_path / "plots" / "curves.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert out.stat().st_size > 10_000  # three drawn panels, not an empty canvas


def test_rerank_curve_keeps_only_reranked_validations():
    from vlp.train.plots import _only_reranked

    series = {
        "val/r_mean": [(1, 12.5), (3, 21.0)],
        "val/itc_r_mean": [(1, 12.5), (3, 20.0)],
        "val/reranked": [(1, 0.0), (3, 1.0)],
    }
    kept = _only_reranked(series)
    assert kept["val/r_mean"] == [(3, 21.0)] and kept["val/itc_r_mean"] == series["val/itc_r_mean"]
