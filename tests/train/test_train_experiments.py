"""Every experiment's real composed config runs end to end (fast_dev_run), shrunk to CPU where it must be."""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest

from vlp.train.run import train

REPO_ROOT = Path(__file__).resolve().parents[2]
FLICKR8K = Path(os.environ.get("VLP_DATA_ROOT", REPO_ROOT.parent / "shared" / "data")) / "flickr8k"
WEIGHTS = Path(os.environ.get("VLP_WEIGHTS_DIR", REPO_ROOT / "weights"))
FAST = ["debug=fast_dev_run", "eval.k=4"]


def _check_metrics(metrics: dict[str, float]) -> None:
    assert math.isfinite(metrics["train/loss"]) and metrics["train/loss"] > 0
    # The final validation of fit re-ranks with ITM: both metric families are there, as percentages.
    assert 0.0 <= metrics["val/itc_r_mean"] <= 100.0 and 0.0 <= metrics["val/r_mean"] <= 100.0
    assert metrics["val/reranked"] == 1.0


@pytest.mark.slow
def test_demo_fast_dev_run(compose, tiny):
    metrics = train(compose(["experiment=demo", *FAST, *tiny()]))
    _check_metrics(metrics)
    # Synthetic data: the final model also takes the swap test, both heads, every attribute.
    assert all(0.0 <= metrics[f"swap/{head}_mean"] <= 1.0 for head in ("itc", "itm"))
    assert 0.0 <= metrics["swap/itm_relation"] <= 1.0


@pytest.mark.slow
def test_pretrain_albef_4m_fast_dev_run_with_tiny_towers_and_synthetic_data(compose, tiny):
    # The ALBEF recipe as composed, with its ViT-B/BERT-base towers, GPU trainer and webdataset stream
    # swapped for what a CPU test can run; everything else (optimizer, queue, schedule, callbacks) is the recipe's.
    overrides = [
        "experiment=pretrain_albef_4m",
        *FAST,
        "model=tiny",
        "data=synthetic",
        "data.resampled=false",
        "data.epoch_size=null",
        "trainer=cpu",
        *tiny(),
    ]
    cfg = compose(overrides)
    assert cfg.optim.lr == 1e-4 and cfg.model.queue_size == 64  # the recipe's optimizer, the test's queue
    _check_metrics(train(cfg))


def test_pretrain_flickr8k_composes(compose, tmp_path):
    from vlp.train.config import load_config

    cfg = load_config(compose(["experiment=pretrain_flickr8k", f"paths.output_dir={tmp_path}"]))
    assert cfg.data.train_file.endswith("flickr8k_train.json") and cfg.data.val_file.endswith("flickr8k_val.json")
    assert cfg.model.image_encoder.name == "tf_efficientnet_lite0"


@pytest.mark.slow
@pytest.mark.real_data
def test_pretrain_flickr8k_runs_on_real_data_with_offline_towers(compose, tmp_path):
    missing = [p for p in (FLICKR8K / "ann", WEIGHTS / "tf_efficientnet_lite0.safetensors") if not p.exists()]
    if missing:
        pytest.skip(f"needs Flickr8k and `python -m vlp.weights prepare-offline` output; missing {missing}")
    # The real towers and the real train split, at 96 px; validation on the 100-image mini test set.
    overrides = [
        "experiment=pretrain_flickr8k",
        *FAST,
        "trainer=cpu",
        "logger=csv",
        "data.batch_size=4",
        "model.image_encoder.image_size=96",  # EfficientNet takes any size; 224 px costs minutes on CPU
        "data.num_workers=0",
        "data.val_file=ann/flickr8k_mini_test.json",
        "model.queue_size=64",
        "callbacks.progress_bar=none",
        f"paths.weights_dir={WEIGHTS}",
        f"paths.output_dir={tmp_path}",
    ]
    _check_metrics(train(compose(overrides)))
