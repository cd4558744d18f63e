"""Build the Lightning Trainer of a run from the typed config: strategy, loggers, callbacks, checkpoint IO."""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
import netrc
import os
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback, ModelCheckpoint, RichProgressBar, TQDMProgressBar
from lightning.pytorch.loggers import CSVLogger, Logger
from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy, Strategy

from vlp.data.datamodule import DataProgressCallback
from vlp.train.callbacks import FinalCheckpoint, PlotCurves, RetrievalValidation, RngStreams, Throughput
from vlp.train.checkpoint import AtomicCheckpointIO
from vlp.train.config import DEEPSPEED_STRATEGIES, CheckpointConfig, TrainConfig, WandbConfig

log = logging.getLogger(__name__)

WANDB_HOST = "api.wandb.ai"


# ----- strategy -------------------------------------------------------------------------------------------------


def fsdp_wrap_modules() -> set[type]:
    """Transformer blocks that FSDP shards as units: timm ViT blocks, BERT layers, fusion blocks."""
    from timm.models.vision_transformer import Block
    from transformers.models.bert.modeling_bert import BertLayer

    from vlp.model.fusion import FusionBlock

    return {Block, BertLayer, FusionBlock}


def build_strategy(cfg: TrainConfig) -> Strategy | str:
    """DDP and FSDP as configured objects, DeepSpeed by name when installed, anything else by name."""
    name, kwargs = cfg.trainer.strategy, dict(cfg.trainer.strategy_kwargs)
    if name == "ddp":
        return DDPStrategy(**kwargs)
    if name == "fsdp":
        # Original parameters stay visible (use_orig_params), so the momentum copies' EMA pairs them up
        # shard by shard and frozen parameters may share a unit with trained ones.
        kwargs.setdefault("use_orig_params", True)
        kwargs.setdefault("auto_wrap_policy", fsdp_wrap_modules())
        return FSDPStrategy(**kwargs)
    if name in DEEPSPEED_STRATEGIES and importlib.util.find_spec("deepspeed") is None:
        raise ValueError(f"trainer.strategy={name} needs DeepSpeed: pip install deepspeed (or use ddp / fsdp)")
    if kwargs:
        raise ValueError(f"trainer.strategy_kwargs is only used with trainer.strategy=ddp or fsdp (got {name})")
    return name


# ----- loggers --------------------------------------------------------------------------------------------------


def wandb_api_key_configured(env: dict[str, str] | None = None, netrc_path: str | Path | None = None) -> bool:
    """True when WANDB_API_KEY is set or the netrc file has an entry for the wandb host; never reads the key."""
    env = os.environ if env is None else env
    if env.get("WANDB_API_KEY"):
        return True
    path = Path(netrc_path) if netrc_path is not None else Path(env.get("NETRC", Path.home() / ".netrc"))
    try:
        return path.is_file() and netrc.netrc(str(path)).authenticators(WANDB_HOST) is not None
    except (netrc.NetrcParseError, OSError):
        return False


def wandb_mode(cfg: WandbConfig, env: dict[str, str] | None = None, netrc_path: str | Path | None = None) -> str:
    """The wandb mode to use: WANDB_MODE when set, else the configured one; auto is online only with a key."""
    env = os.environ if env is None else env
    mode = env.get("WANDB_MODE") or cfg.mode
    if mode == "auto":
        mode = "online" if wandb_api_key_configured(env, netrc_path) else "offline"
    return mode


def build_loggers(cfg: TrainConfig, output_dir: Path) -> list[Logger]:
    """CSV always; wandb (offline unless an API key is configured) and TensorBoard when asked for."""
    loggers: list[Logger] = [CSVLogger(save_dir=str(output_dir), name="csv", version="")]
    wandb_cfg = cfg.logger.wandb
    if wandb_cfg is not None and (mode := wandb_mode(wandb_cfg)) != "disabled":
        from lightning.pytorch.loggers import WandbLogger

        log.info("wandb logger in %s mode", mode)
        loggers.append(
            WandbLogger(
                project=wandb_cfg.project,
                entity=wandb_cfg.entity,
                name=wandb_cfg.name or cfg.task_name,
                group=wandb_cfg.group,
                tags=list(cfg.tags),
                save_dir=str(output_dir),
                offline=mode == "offline",
                log_model=wandb_cfg.log_model,
            )
        )
    if cfg.logger.tensorboard:
        if importlib.util.find_spec("tensorboard") is None and importlib.util.find_spec("tensorboardX") is None:
            raise ValueError("logger.tensorboard=true needs TensorBoard: pip install tensorboard")
        from lightning.pytorch.loggers import TensorBoardLogger

        loggers.append(TensorBoardLogger(save_dir=str(output_dir), name="tensorboard", version=""))
    return loggers


# ----- callbacks ------------------------------------------------------------------------------------------------


def checkpoint_dir(cfg: TrainConfig) -> Path:
    return Path(cfg.paths.output_dir) / cfg.callbacks.checkpoint.dirpath


def checkpoint_callbacks(cfg: CheckpointConfig, dirpath: Path, val_every_n_steps: int) -> list[ModelCheckpoint]:
    """The newest ``keep_last`` checkpoints (plus last.ckpt) and, separately, the best one by ``monitor``."""
    steps = cfg.every_n_train_steps or None
    periodic = ModelCheckpoint(
        dirpath=dirpath,
        filename="step{step:08d}",
        auto_insert_metric_name=False,
        monitor="step",  # "keep the last N" is "the top N by step"
        mode="max",
        save_top_k=cfg.keep_last,
        every_n_train_steps=steps,
        every_n_epochs=None if steps else 1,
        save_last=cfg.save_last,
        save_on_train_epoch_end=True,
        enable_version_counter=False,  # last.ckpt is overwritten (also by FinalCheckpoint), never last-v1.ckpt
    )
    callbacks = [periodic]
    if cfg.save_best:
        # Checked at the validation cadence, right after the validation callback has published its metrics.
        val_steps = val_every_n_steps or None
        callbacks.append(
            ModelCheckpoint(
                dirpath=dirpath,
                filename="best",
                auto_insert_metric_name=False,
                monitor=cfg.monitor,
                mode=cfg.mode,
                save_top_k=1,
                every_n_train_steps=val_steps,
                every_n_epochs=None if val_steps else 1,
                save_on_train_epoch_end=True,
                enable_version_counter=False,
            )
        )
    return callbacks


def build_callbacks(cfg: TrainConfig, output_dir: Path) -> list[Callback]:
    cb = cfg.callbacks
    # Data progress first: the sampler position must count a batch before any checkpoint is written.
    callbacks: list[Callback] = [DataProgressCallback(), RngStreams()]
    if cb.throughput:
        callbacks.append(Throughput(peak_flops=cfg.trainer.peak_flops))
    if cb.val.enabled:
        callbacks.append(RetrievalValidation(cb.val, cfg.eval, output_dir))
    if cb.progress_bar == "tqdm":
        callbacks.append(TQDMProgressBar(refresh_rate=1))
    elif cb.progress_bar == "rich":
        callbacks.append(RichProgressBar())
    if cb.plots:
        callbacks.append(PlotCurves(output_dir))
    if cb.checkpoint.save_last and cb.checkpoint.every_n_train_steps:
        callbacks.append(FinalCheckpoint(checkpoint_dir(cfg) / "last.ckpt"))
    # Without validation there is no metric to keep a best checkpoint by.
    ckpt_cfg = dataclasses.replace(cb.checkpoint, save_best=cb.checkpoint.save_best and cb.val.enabled)
    callbacks += checkpoint_callbacks(ckpt_cfg, checkpoint_dir(cfg), cb.val.every_n_steps)
    return callbacks


# ----- trainer --------------------------------------------------------------------------------------------------


def build_trainer(cfg: TrainConfig) -> L.Trainer:
    """A Trainer for the config; the run directory is ``paths.output_dir``."""
    output_dir = Path(cfg.paths.output_dir)
    t = cfg.trainer
    strategy = build_strategy(cfg)
    plugins: list[Any] = [] if t.strategy in DEEPSPEED_STRATEGIES else [AtomicCheckpointIO()]
    kwargs: dict[str, Any] = {}
    if t.limit_train_batches is not None:
        kwargs["limit_train_batches"] = (
            int(t.limit_train_batches) if t.limit_train_batches > 1 else t.limit_train_batches
        )
    return L.Trainer(
        accelerator=t.accelerator,
        devices=t.devices,
        num_nodes=t.num_nodes,
        strategy=strategy,
        precision=t.precision,
        max_epochs=t.max_epochs,
        max_steps=t.max_steps,
        accumulate_grad_batches=t.accumulate_grad_batches,
        gradient_clip_val=t.gradient_clip_val,
        deterministic=t.deterministic,
        benchmark=t.benchmark,
        log_every_n_steps=t.log_every_n_steps,
        fast_dev_run=t.fast_dev_run,
        overfit_batches=t.overfit_batches,
        sync_batchnorm=t.sync_batchnorm,
        default_root_dir=str(output_dir),
        logger=build_loggers(cfg, output_dir),
        callbacks=build_callbacks(cfg, output_dir),
        plugins=plugins,
        enable_progress_bar=cfg.callbacks.progress_bar != "none",
        num_sanity_val_steps=0,
        use_distributed_sampler=False,  # the data module shards with its own resumable sampler
        **kwargs,
    )
