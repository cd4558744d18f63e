"""Fine-tuning around ``Trainer.fit``: start from a checkpoint's weights, test the best checkpoint at the end."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint

from vlp.checkpoint import load_state_into, model_state_dict, read_checkpoint
from vlp.eval import evaluate_retrieval
from vlp.train.config import TrainConfig

log = logging.getLogger(__name__)


def init_from_checkpoint(model, cfg: TrainConfig) -> None:
    """Load only the weights of ``cfg.ckpt`` (Lightning file, state dict or export directory) into ``model``.

    Position embeddings are resampled to the new resolution in the online and momentum encoders alike; an
    export has no momentum copies, so they start as copies of the loaded online towers.
    """
    # The queue is training state of the old run (its size may differ too): fine-tuning starts with an empty one.
    state = {k: v for k, v in model_state_dict(read_checkpoint(cfg.ckpt)).items() if not k.startswith("queue.")}
    report = load_state_into(model, state, allow_shape_mismatch=cfg.ckpt_allow_shape_mismatch)
    momentum_missing = [key for key in report["missing"] if "_m." in key]
    if momentum_missing:
        for online, momentum in (("visual_encoder", "visual_encoder_m"), ("text_encoder", "text_encoder_m")):
            if hasattr(model, momentum):
                getattr(model, momentum).load_state_dict(getattr(model, online).state_dict())
        for online, momentum in (("vision_proj", "vision_proj_m"), ("text_proj", "text_proj_m")):
            if hasattr(model, momentum):
                getattr(model, momentum).load_state_dict(getattr(model, online).state_dict())
    log.info("fine-tuning from the weights of %s", cfg.ckpt)


def best_checkpoint(trainer: L.Trainer) -> str | None:
    for callback in trainer.checkpoint_callbacks:
        if isinstance(callback, ModelCheckpoint) and callback.monitor and callback.best_model_path:
            return callback.best_model_path
    return None


def test_best(trainer: L.Trainer, module: L.LightningModule, datamodule, cfg: TrainConfig, output_dir: Path) -> dict:
    """Evaluate the best checkpoint (by the monitored metric) on the test split; write test_metrics.json."""
    best = best_checkpoint(trainer)
    if best:
        load_state_into(module.model, model_state_dict(read_checkpoint(best)), strict=True)
    datamodule.setup("test")
    dataset = datamodule.test_dataset
    model = module.model.eval()
    metrics = evaluate_retrieval(
        model, datamodule.test_dataloader(), dataset.texts, dataset.txt2img, dataset.img2txt, cfg.eval, rerank=True
    )
    metrics = {f"test/{key}": float(value) for key, value in metrics.items()}
    if trainer.is_global_zero:
        (output_dir / "test_metrics.json").write_text(json.dumps(metrics, indent=2))
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
    log.info(
        "test (%s): r_mean %.2f, itc_r_mean %.2f",
        best or "last weights",
        metrics["test/r_mean"],
        metrics["test/itc_r_mean"],
    )
    return metrics
