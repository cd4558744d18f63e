"""The LightningModule's step logic: non-finite skips, accumulation boundaries, alpha ramp, logged lr."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from vlp.train.config import load_config
from vlp.train.module import VLPLightningModule

BATCH = 4


def _module(compose, tiny, *extra: str) -> VLPLightningModule:
    cfg = load_config(compose(tiny("optim.lr=1e-3", "optim.warmup_steps=2", "model.queue_size=64", *extra)))
    torch.manual_seed(0)
    return VLPLightningModule(cfg)


def _batches(module: VLPLightningModule, count: int, nan_at: int | None = None) -> list[dict]:
    captions = ["a small red circle left of a blue square", "two green stars", "a large blue triangle", "one ring"]
    tokens = module.model.tokenizer(captions, padding="max_length", max_length=12, return_tensors="pt")
    generator = torch.Generator().manual_seed(1)
    batches = []
    for i in range(count):
        image = torch.randn(BATCH, 3, 32, 32, generator=generator)
        if i == nan_at:
            image[0] = float("nan")
        ids = torch.arange(BATCH) + BATCH * i
        batches.append(
            dict(image=image, input_ids=tokens.input_ids, attention_mask=tokens.attention_mask, image_id=ids)
        )
    return batches


class Recorder(L.Callback):
    """Copies of the weights, momentum weights, queue and logged metrics after every batch."""

    def __init__(self):
        self.states, self.metrics = [], []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        model = pl_module.model
        self.states.append(
            {
                "online": torch.cat([p.detach().flatten() for p in model.visual_encoder.parameters()]).clone(),
                "momentum": torch.cat([p.detach().flatten() for p in model.visual_encoder_m.parameters()]).clone(),
                "queue_count": int(model.queue.count),
                "queue": model.queue.image_queue.clone(),
            }
        )
        self.metrics.append({k: float(v) for k, v in trainer.callback_metrics.items()})


def _fit(module: VLPLightningModule, batches: list[dict], **trainer_kwargs) -> Recorder:
    recorder = Recorder()
    trainer = L.Trainer(
        accelerator="cpu",
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[recorder],
        **trainer_kwargs,
    )
    trainer.fit(module, train_dataloaders=DataLoader(batches, batch_size=None))
    return recorder


def test_nonfinite_loss_skips_the_step_without_touching_weights_momentum_or_queue(compose, tiny, caplog):
    module = _module(compose, tiny)
    recorder = _fit(module, _batches(module, 3, nan_at=1))
    before, skipped, after = recorder.states

    assert module.nonfinite_steps == 1
    assert torch.equal(skipped["online"], before["online"])
    assert torch.equal(skipped["momentum"], before["momentum"])
    assert skipped["queue_count"] == before["queue_count"] == BATCH
    # Training goes on after the bad batch, and nothing non-finite ever reached the weights or the queue.
    assert not torch.equal(after["online"], skipped["online"]) and after["queue_count"] == 2 * BATCH
    assert torch.isfinite(after["online"]).all() and torch.isfinite(after["queue"]).all()
    assert recorder.metrics[1]["train/nonfinite_steps"] == 1.0
    assert any("non-finite loss" in r.getMessage() for r in caplog.records)


def test_nonfinite_gradients_with_a_finite_loss_skip_the_step(compose, tiny):
    module = _module(compose, tiny)
    poison = {"on": False}
    module.model.itm_head.weight.register_hook(lambda grad: grad * float("inf") if poison["on"] else grad)

    class PoisonSecondBatch(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            poison["on"] = batch_idx == 1

    recorder = Recorder()
    trainer = L.Trainer(
        accelerator="cpu",
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        gradient_clip_val=1.0,
        callbacks=[PoisonSecondBatch(), recorder],
    )
    trainer.fit(module, train_dataloaders=DataLoader(_batches(module, 3), batch_size=None))
    before, skipped, after = recorder.states
    assert module.nonfinite_steps == 1
    assert torch.equal(skipped["online"], before["online"]) and torch.equal(skipped["momentum"], before["momentum"])
    assert skipped["queue_count"] == before["queue_count"]
    assert torch.isfinite(module.model.itm_head.weight).all() and not torch.equal(after["online"], skipped["online"])


def test_momentum_update_and_enqueue_only_on_accumulation_boundaries(compose, tiny, monkeypatch):
    module = _module(compose, tiny)
    initial = torch.cat([p.detach().flatten() for p in module.model.visual_encoder_m.parameters()]).clone()
    calls = []
    original = module.model.after_optimizer_step
    monkeypatch.setattr(module.model, "after_optimizer_step", lambda: (calls.append(1), original())[1])

    recorder = _fit(module, _batches(module, 4), accumulate_grad_batches=2)
    assert len(calls) == 2
    # Both micro-batches of a window are enqueued together, at the boundary.
    assert [s["queue_count"] for s in recorder.states] == [0, 2 * BATCH, 2 * BATCH, 4 * BATCH]
    # The momentum copy moves only at the boundaries (after batches 1 and 3).
    momentum = [s["momentum"] for s in recorder.states]
    assert torch.equal(momentum[0], initial) and not torch.equal(momentum[1], momentum[0])
    assert torch.equal(momentum[2], momentum[1]) and not torch.equal(momentum[3], momentum[2])


def test_alpha_ramps_over_the_first_epoch_and_lr_follows_the_warmup(compose, tiny):
    module = _module(compose, tiny, "model.alpha=0.4")
    recorder = _fit(module, _batches(module, 4))
    alphas = [m["train/alpha"] for m in recorder.metrics]
    assert alphas == pytest.approx([0.0, 0.1, 0.2, 0.3])  # 0.4 * step / 4 steps per epoch
    lrs = [m["train/lr"] for m in recorder.metrics]
    assert lrs[:2] == pytest.approx([0.5e-3, 1e-3])  # warmup of 2 steps reaches the configured lr


def test_alpha_ramp_steps_overrides_the_epoch(compose, tiny):
    module = _module(compose, tiny, "model.alpha=0.4", "optim.alpha_ramp_steps=0")
    recorder = _fit(module, _batches(module, 2))
    assert [m["train/alpha"] for m in recorder.metrics] == pytest.approx([0.4, 0.4])


def test_logged_losses_are_the_model_outputs(compose, tiny):
    # ITC does not depend on the random hard negatives, so the logged value must equal a direct forward.
    module = _module(compose, tiny)
    batch = _batches(module, 1)[0]
    module.model.train()
    expected = module.model(batch, alpha=0.0)
    module.model.drop_pending()

    recorder = _fit(module, [batch])
    logged = recorder.metrics[0]
    assert logged["train/itc_loss"] == pytest.approx(float(expected["itc_loss"]), rel=1e-5)
    assert logged["train/loss"] == pytest.approx(logged["train/itc_loss"] + logged["train/itm_loss"], rel=1e-5)
    assert logged["train/temperature"] == pytest.approx(0.07, rel=1e-6)
