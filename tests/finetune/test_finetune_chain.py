"""Pretrain, evaluate zero-shot, fine-tune from the checkpoint's weights, evaluate again: the whole user chain."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from conftest import compose_train, tiny_overrides
from omegaconf import OmegaConf

from vlp.eval.run import run_eval
from vlp.train.run import train

REPO_ROOT = Path(__file__).resolve().parents[2]
DATA_ROOT = Path(os.environ.get("VLP_DATA_ROOT", REPO_ROOT.parent / "shared" / "data"))


def _eval(ckpt: Path, out: Path, data_overrides: dict) -> dict:
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(REPO_ROOT / "configs"), version_base="1.3"):
        cfg = compose(config_name="eval", overrides=[f"ckpt={ckpt}", f"output_dir={out}", *data_overrides])
    return run_eval(cfg)


def test_demo_pretrain_then_finetune_beats_zero_shot(tmp_path):
    # Pretrain briefly on one set of scenes, then fine-tune on scenes drawn with another seed, and compare
    # recall on that fine-tuning dataset's test split: zero-shot versus after fine-tuning.
    scenes = ["data.synthetic_train_size=2048", "data.synthetic_eval_size=40", "data.batch_size=32", "eval.k=8"]
    # From scratch, a lagging momentum encoder only slows the first hundred steps: plain in-batch ITC here.
    scenes += ["model.momentum=false", "model.queue_size=0", "model.distill=false"]
    pre_dir, ft_dir = tmp_path / "pre", tmp_path / "ft"
    train(compose_train(tiny_overrides(pre_dir, "experiment=demo", *scenes, "trainer.max_steps=20", "optim.warmup_steps=0")))
    ckpt = pre_dir / "checkpoints" / "last.ckpt"
    target = ["data.seed=7", "data.synthetic_train_size=512", "data.synthetic_eval_size=40", "data.image_size=32"]
    data_cli = [f"{o}" for o in target + ["data.synthetic_image_size=32", "data.max_length=24", "eval.k=8"]]
    zero_shot = _eval(ckpt, tmp_path / "zs", [*data_cli, "split=test"])

    overrides = tiny_overrides(ft_dir, "experiment=finetune_demo", *scenes, *target, f"ckpt={ckpt}")
    overrides += ["trainer.max_steps=150", "trainer.max_epochs=100", "optim.lr=2e-3", "callbacks.val.every_n_steps=150"]
    train(compose_train(overrides))
    tuned = json.loads((ft_dir / "test_metrics.json").read_text())
    assert tuned["test/r_mean"] > zero_shot["r_mean"] + 5.0, (tuned["test/r_mean"], zero_shot["r_mean"])
