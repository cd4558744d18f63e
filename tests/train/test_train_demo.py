"""The demo experiment learns: its loss falls over a short run; its checkpoint rebuilds the model on its own."""

from __future__ import annotations

import csv
import statistics

import pytest
import torch
import yaml

from vlp.model import VLPModel
from vlp.train.config import model_config_from_dict
from vlp.train.run import train

STEPS = 80


@pytest.mark.slow
def test_demo_loss_falls_and_the_checkpoint_rebuilds_the_model(compose, tiny, tmp_path):
    out = tmp_path / "demo"
    overrides = [
        "experiment=demo",
        *tiny(output_dir=out),
        # From random weights a lagging momentum encoder only delays learning: plain in-batch ITC + ITM here.
        "model.queue_size=0",
        "model.momentum=false",
        "model.distill=false",
        "data.batch_size=32",
        "data.synthetic_train_size=4096",
        f"trainer.max_steps={STEPS}",
        "trainer.log_every_n_steps=1",
        "optim.lr=2e-3",
        "optim.warmup_steps=5",
        "optim.alpha_ramp_steps=0",  # a constant distillation weight keeps the loss comparable along the run
        f"callbacks.checkpoint.every_n_train_steps={STEPS}",
        "callbacks.val.enabled=false",
    ]
    train(compose(overrides))

    # Mean loss of the last steps against the first ones.
    with open(out / "csv" / "metrics.csv", newline="") as f:
        losses = [float(row["train/loss"]) for row in csv.DictReader(f) if row.get("train/loss")]
    assert len(losses) == STEPS
    first, last = statistics.mean(losses[:5]), statistics.mean(losses[-5:])
    assert last < first - 0.2, (first, last)

    # The checkpoint carries the resolved config as plain data: the model is rebuilt from it alone.
    state = torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    cfg = state["hyper_parameters"]["cfg"]
    assert cfg == yaml.safe_load((out / "config.yaml").read_text())
    model = VLPModel(model_config_from_dict(cfg["model"]), load_weights=False)
    weights = {k.removeprefix("model."): v for k, v in state["state_dict"].items()}
    model.load_state_dict(weights, strict=True)
    model.eval()
    tokens = model.tokenizer(["a small red circle left of a large blue square"], return_tensors="pt")
    score = model.itm_score(torch.zeros(1, 3, 32, 32), tokens.input_ids, tokens.attention_mask)
    assert score.shape == (1,) and 0.0 <= float(score) <= 1.0
    assert (out / "curves.png").stat().st_size > 0
