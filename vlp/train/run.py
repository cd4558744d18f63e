"""Programmatic entry point: ``train(cfg)`` validates a composed config, builds everything and fits.

``train.py`` (Hydra) calls it with the composed config; tests and notebooks may call it with a DictConfig or
an already validated :class:`TrainConfig`. Nothing is built before the whole config has been validated.
"""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path

import lightning as L
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig

from vlp.data.datamodule import VLPDataModule
from vlp.data.synthetic import SyntheticScenes
from vlp.dist import get_rank
from vlp.eval.swaps import HEADS, format_swap_test, swap_test
from vlp.train.builders import build_trainer, checkpoint_dir
from vlp.train.checkpoint import resume_path, write_run_metadata
from vlp.train.config import TrainConfig, load_config, to_plain_dict
from vlp.train.finetune import init_from_checkpoint, test_best
from vlp.train.module import VLPLightningModule
from vlp.train.rank_logging import install_rank_filter

log = logging.getLogger(__name__)

# Lightning warnings that do not apply here: validation runs in the RetrievalValidation callback (no
# validation_step), and the training sampler restores its position from the data module's state (Lightning
# only recognises loaders that are themselves stateful).
IRRELEVANT_WARNINGS = (
    r".*you passed in a `val_dataloader` but have no `validation_step`.*",
    r".*your dataloader is not resumable.*",
)


def train(cfg: DictConfig | dict | TrainConfig) -> dict[str, float]:
    """Fit the model described by ``cfg``; returns the final ``callback_metrics`` (train/*, val/*) as floats."""
    install_rank_filter()
    for pattern in IRRELEVANT_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)  # matched case-insensitively
    root = cfg if isinstance(cfg, TrainConfig) else load_config(cfg)
    output_dir = Path(root.paths.output_dir)
    _write_metadata(output_dir, root)
    L.seed_everything(root.seed, workers=True)

    # The model first: the data pipeline takes its tokenizer and its image normalisation.
    module = VLPLightningModule(root)
    pretrained_cfg = module.model.visual_encoder.pretrained_cfg
    datamodule = VLPDataModule(root.data, module.model.tokenizer, pretrained_cfg["mean"], pretrained_cfg["std"])

    # Fine-tuning starts from a checkpoint's weights only; resuming restores the whole training state.
    trainer = build_trainer(root)
    if root.ckpt_mode == "init":
        init_from_checkpoint(module.model, root)
    resume_from = root.ckpt if root.ckpt_mode == "resume" else None
    ckpt_path = resume_path(resume_from, root.resume, checkpoint_dir(root), output_dir)
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
    metrics = {key: float(value) for key, value in trainer.callback_metrics.items()}
    if root.test_at_end:
        metrics.update(test_best(trainer, module, datamodule, root, output_dir))
    metrics.update(_synthetic_swap_test(module, datamodule, output_dir))
    _report(metrics, output_dir)
    return metrics


def _synthetic_swap_test(module: VLPLightningModule, datamodule: VLPDataModule, output_dir: Path) -> dict[str, float]:
    """On synthetic data, the final model's swap test on the validation scenes (``swap_test.json``, logged).

    Every rank computes it (a sharded model gathers its weights in forward, with every rank taking part); rank 0
    writes and logs it.
    """
    c = datamodule.cfg
    if c.name != "synthetic" or not module.cfg.model.itm:
        return {}
    scenes = SyntheticScenes(c.seed, "val", c.synthetic_eval_size, c.synthetic_image_size)
    result = swap_test(module.model, scenes, datamodule.eval_transform)
    if get_rank() == 0:
        (output_dir / "swap_test.json").write_text(json.dumps(result, indent=2))
        log.info("swap test on the validation scenes (true caption above its one-attribute swap; chance 0.5):\n%s",
                 format_swap_test(result))  # fmt: skip
    return {f"swap/{head}_{name}": values[head] for name, values in result.items() for head in HEADS}


@rank_zero_only
def _report(metrics: dict[str, float], output_dir: Path) -> None:
    """The final retrieval numbers, ITC ranking next to the ITM re-rank, and where the run's files are."""
    if "val/itc_r_mean" in metrics:
        columns = ("tr@1", "tr@5", "tr@10", "ir@1", "ir@5", "ir@10", "r_mean")
        header = "".join(f"{c:>8}" for c in columns)
        itc = "".join(f"{metrics[f'val/itc_{c}']:8.2f}" for c in columns)
        lines = [f"{'':<16}{header}", f"{'ITC only':<16}{itc}"]
        if metrics.get("val/reranked"):
            lines.append(f"{'ITM re-ranked':<16}" + "".join(f"{metrics[f'val/{c}']:8.2f}" for c in columns))
        log.info("validation retrieval (recall %%):\n%s", "\n".join(lines))
    log.info("run directory: %s", output_dir.resolve())


@rank_zero_only
def _write_metadata(output_dir: Path, root: TrainConfig) -> None:
    write_run_metadata(output_dir, to_plain_dict(root), root.paths.root_dir)
    log.info("resolved config and git commit written to %s", output_dir)
