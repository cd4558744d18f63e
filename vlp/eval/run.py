"""``python eval.py ckpt=PATH``: retrieval evaluation of a checkpoint or export, writing metrics.json and report.html."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf

from vlp.dist import get_rank, get_world_size
from vlp.eval.config import RetrievalConfig
from vlp.eval.loading import load_model_for_eval
from vlp.eval.report import write_metrics, write_report
from vlp.eval.retrieval import run_retrieval

log = logging.getLogger(__name__)

SPLITS = ("val", "test")


def _init_distributed() -> None:
    # Only under a launcher (torchrun sets WORLD_SIZE, RANK and the rendezvous address); never a default address.
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")


def _device(name: str | None) -> torch.device:
    if name:
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def _output_dir(cfg: DictConfig) -> Path:
    # output_dir= wins; then paths.output_dir (the Hydra run dir); outside Hydra, the working directory.
    if cfg.get("output_dir"):
        return Path(cfg.output_dir)
    try:
        return Path(cfg.paths.output_dir)
    except Exception:  # no paths group, or ${hydra:...} resolved outside a Hydra app
        return Path.cwd()


def build_eval_data(cfg: DictConfig, model) -> tuple[Any, Any]:
    """The ``split`` RetrievalDataset and this process's image loader, preprocessed for ``model``."""
    from vlp.data.config import DataConfig
    from vlp.data.datamodule import VLPDataModule

    data_cfg = DataConfig.from_mapping(cfg.data)
    image_size = model.cfg.image_encoder.image_size
    if data_cfg.image_size != image_size:
        log.info("data.image_size=%d -> %d, the checkpoint's image size", data_cfg.image_size, image_size)
        data_cfg.image_size = image_size
    stats = model.visual_encoder.pretrained_cfg
    datamodule = VLPDataModule(data_cfg, model.tokenizer, stats["mean"], stats["std"], get_rank(), get_world_size())
    if cfg.split == "val":
        datamodule.setup("validate")
        dataset, loader = datamodule.val_dataset, datamodule.val_dataloader()
    else:
        datamodule.setup("test")
        dataset, loader = datamodule.test_dataset, datamodule.test_dataloader()
    if dataset is None:
        raise ValueError(f"no {cfg.split} data: set data.{cfg.split}_file (or split=val/test)")
    return dataset, loader


def run_eval(cfg: DictConfig | Mapping[str, Any], dataset=None, loader=None) -> dict[str, float]:
    """Evaluate ``cfg.ckpt`` on ``cfg.data`` (or on ``dataset``/``loader`` when given); returns the metrics.

    Writes ``metrics.json`` and ``report.html`` into ``output_dir`` (default: the Hydra run directory) on the
    first process. Under torchrun every process evaluates its shard of the images.
    """
    cfg = cfg if isinstance(cfg, DictConfig) else OmegaConf.create(dict(cfg))
    if cfg.get("ckpt") in (None, "???"):
        raise ValueError("ckpt must name a checkpoint file or an exported model directory: python eval.py ckpt=PATH")
    split = cfg.get("split", "test")
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}; got {split!r}")
    eval_cfg = RetrievalConfig.from_dict(OmegaConf.to_container(cfg.get("eval") or {}, resolve=True))
    _init_distributed()

    # Model, data, then the collective evaluation.
    device = _device(cfg.get("device"))
    model = load_model_for_eval(cfg.ckpt, device)
    if cfg.get("export") and get_rank() == 0:
        # A self-contained directory (safetensors, config, tokenizer) for VLPModel.from_pretrained.
        model.save_pretrained(cfg.export)
        log.info("exported the model to %s", cfg.export)
    if dataset is None:
        dataset, loader = build_eval_data(cfg, model)
    rerank = bool(cfg.get("rerank", True))
    result = run_retrieval(model, loader, dataset.texts, dataset.txt2img, dataset.img2txt, eval_cfg, rerank=rerank)

    # Files and log lines from the first process only (every process holds the same result).
    if get_rank() == 0:
        out = _output_dir(cfg)
        out.mkdir(parents=True, exist_ok=True)
        write_metrics(out / "metrics.json", result.metrics)
        info = {
            "checkpoint": cfg.ckpt,
            "split": split,
            "images": len(dataset.img2txt),
            "captions": len(dataset.texts),
            "k": eval_cfg.k,
            "score": eval_cfg.score,
            "processes": get_world_size(),
        }
        load_image = getattr(dataset, "load_image_pil", None)
        write_report(
            out / "report.html", result, dataset.texts, dataset.txt2img, dataset.img2txt, load_image,
            eval_cfg.report_samples, info=info,
        )  # fmt: skip
        for key, value in result.metrics.items():
            log.info("%s: %.3f", key, value)
        log.info("wrote %s and %s", out / "metrics.json", out / "report.html")
    return result.metrics
