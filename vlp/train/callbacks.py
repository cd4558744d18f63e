"""Callbacks of a training run: RNG state, throughput/MFU, retrieval validation, training curves.

Each is one concern Lightning does not cover for this model. The data position (sampler state and skipped
samples) is kept by ``vlp.data.DataProgressCallback``; with it, the RNG state and the LightningModule's own
checkpoint state, a mid-epoch resume continues exactly where the run stopped.
"""

from __future__ import annotations

import json
import logging
import random
import time
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.fabric.utilities.throughput import get_available_flops
from torch.utils.flop_counter import FlopCounterMode

from vlp.dist import get_world_size
from vlp.eval import evaluate_retrieval
from vlp.eval.config import RetrievalConfig
from vlp.train.config import ValConfig

log = logging.getLogger(__name__)


# ----- random state --------------------------------------------------------------------------------------------


class RngStreams(L.Callback):
    """Keeps the random draws of training steps apart from those of data loading, and checkpoints them.

    Two streams of the torch, CUDA, numpy and Python generators are swapped at batch boundaries: the training
    stream is active from ``on_train_batch_start`` to ``on_train_batch_end`` (dropout, hard-negative sampling),
    the data stream in between (iterator creation, prefetching, main-process transforms). Loaders fetch ahead
    of training, and a resumed run fetches a different number of batches before its first step than the
    uninterrupted run did; only the training stream is saved, so the steps after a resume draw exactly what
    they would have drawn. Data randomness itself must come from the data layer's own seeding (with random
    augmentations a resumed epoch reproduces the order of samples, not their crops). Only rank zero's stream
    is saved; ranks seeded alike draw alike, so their streams agree.
    """

    def __init__(self) -> None:
        self._train: dict[str, Any] | None = None
        self._data: dict[str, Any] | None = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._train is None:  # a fresh run; a resumed one got its stream from the checkpoint
            self._train = capture_rng()

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx) -> None:
        self._data = capture_rng()
        restore_rng(self._train)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        self._train = capture_rng()
        restore_rng(self._data)

    def state_dict(self) -> dict[str, Any]:
        return {"train": self._train if self._train is not None else capture_rng()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._train = state_dict["train"]


def capture_rng() -> dict[str, Any]:
    """The global generators' states; numpy's key array as a tensor so checkpoints load with weights_only."""
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "python": random.getstate(),
    }


def restore_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    # Checkpoints may turn the nested tuples of random.getstate() into lists.
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


# ----- throughput -----------------------------------------------------------------------------------------------


class Throughput(L.Callback):
    """``train/step_time`` (s per batch, data loading included), ``train/samples_per_sec`` (world) and ``train/mfu``.

    Model FLOPs per sample are counted once, on the first batch, by running the forward under
    ``FlopCounterMode`` in eval mode (nothing is enqueued) with the random state forked (the training draws are
    untouched). Training costs about three forwards (forward plus a backward twice as expensive); the momentum
    encoders have no backward, so MFU is slightly overestimated.
    """

    def __init__(self, peak_flops: float | None = None):
        self.peak_flops = peak_flops
        self.flops_per_sample: float | None = None
        self._last: float | None = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.peak_flops is None and trainer.strategy.root_device.type == "cuda":
            self.peak_flops = get_available_flops(trainer.strategy.root_device, _flops_dtype(trainer.precision))
        self._last = None

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx) -> None:
        if self.flops_per_sample is None:
            self.flops_per_sample = count_flops_per_sample(pl_module.model, batch)
            log.info(
                "model FLOPs per sample (forward): %.3g; peak FLOP/s per device: %s",
                self.flops_per_sample,
                self.peak_flops,
            )
        if self._last is None:
            self._last = time.perf_counter()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        now = time.perf_counter()
        step_time, self._last = now - self._last, now
        samples_per_sec = batch["image"].shape[0] * get_world_size() / max(step_time, 1e-9)
        metrics = {"train/step_time": step_time, "train/samples_per_sec": samples_per_sec}
        if self.peak_flops and self.flops_per_sample:
            achieved = 3 * self.flops_per_sample * samples_per_sec
            metrics["train/mfu"] = achieved / (self.peak_flops * get_world_size())
        pl_module.log_dict(metrics, on_step=True, on_epoch=False, batch_size=1)


def _flops_dtype(precision: str) -> torch.dtype:
    if precision.startswith("bf16"):
        return torch.bfloat16
    return torch.float16 if precision.startswith("16") else torch.float32


def count_flops_per_sample(model: torch.nn.Module, batch: dict[str, Any]) -> float:
    """Forward FLOPs of one training forward divided by the batch size (eval mode, RNG forked, no grad)."""
    was_training = model.training
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    try:
        model.eval()
        with torch.random.fork_rng(devices=devices), torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(batch)
    finally:
        model.train(was_training)
    return counter.get_total_flops() / max(1, batch["image"].shape[0])


# ----- validation -----------------------------------------------------------------------------------------------


class RetrievalValidation(L.Callback):
    """Image-text retrieval on the validation split with :func:`vlp.eval.evaluate_retrieval`.

    ITC-only ranking at every validation; the ITM re-rank every ``rerank_every``-th validation and at the
    end of fit. Every rank takes part (the evaluation is collective). Metrics are logged as ``val/<key>`` at the
    current step straight to the loggers (a validation between logging intervals must not be dropped) and put
    into ``callback_metrics`` for the best-checkpoint callback, which runs after this one. The last metrics are
    written to ``val_metrics.json`` in the run directory.
    """

    def __init__(self, cfg: ValConfig, eval_cfg: RetrievalConfig, output_dir: str | Path):
        self.cfg, self.eval_cfg, self.output_dir = cfg, eval_cfg, Path(output_dir)
        self.count = 0
        self.last: dict[str, float] = {}
        self._last_step: tuple[int, bool] | None = None
        self._loader = None

    def state_dict(self) -> dict[str, Any]:
        return {"count": self.count}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.count = int(state_dict.get("count", 0))

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        # With accumulation several micro-batches end at the same global step: validate once per step.
        # The final step is validated (with the re-rank) at the end of the epoch instead.
        every, step = self.cfg.every_n_steps, trainer.global_step
        final = self.cfg.rerank_at_end and 0 < trainer.max_steps <= step
        if every and step > 0 and step % every == 0 and not final and not self._validated_at(step):
            self.validate(trainer, pl_module, rerank=self._rerank_now())

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        last = is_last_epoch(trainer)
        periodic = not self.cfg.every_n_steps and (trainer.current_epoch + 1) % self.cfg.every_n_epochs == 0
        if last and self.cfg.rerank_at_end:
            if self._last_step != (trainer.global_step, True):
                self.validate(trainer, pl_module, rerank=True)
        elif (periodic or last) and not self._validated_at(trainer.global_step):
            self.validate(trainer, pl_module, rerank=self._rerank_now())
        if last and self.last and trainer.is_global_zero:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            (self.output_dir / "val_metrics.json").write_text(json.dumps(self.last, indent=2))

    def _validated_at(self, step: int) -> bool:
        return self._last_step is not None and self._last_step[0] == step

    def _rerank_now(self) -> bool:
        every = self.cfg.rerank_every
        return bool(every) and (self.count + 1) % every == 0

    def validate(self, trainer: L.Trainer, pl_module: L.LightningModule, rerank: bool) -> dict[str, float]:
        """Run one validation on every rank; log and return ``val/*`` metrics."""
        loader = self._val_loader(trainer)
        if loader is None or not self.cfg.enabled:
            return {}
        dataset = loader.dataset
        model = pl_module.model
        was_training = model.training
        try:
            model.eval()
            metrics = evaluate_retrieval(
                model, loader, dataset.texts, dataset.txt2img, dataset.img2txt, self.eval_cfg, rerank=rerank
            )
        finally:
            model.train(was_training)
        self.count += 1
        self._last_step = (trainer.global_step, rerank)
        self.last = {f"val/{key}": float(value) for key, value in metrics.items()}
        self.last["val/reranked"] = float(rerank)
        self._publish(trainer, self.last)
        log.info(
            "validation %d at step %d (%s): r_mean %.2f, itc_r_mean %.2f",
            self.count,
            trainer.global_step,
            "ITC + ITM re-rank" if rerank else "ITC only",
            self.last["val/r_mean"],
            self.last["val/itc_r_mean"],
        )
        return self.last

    def _val_loader(self, trainer: L.Trainer):
        # Built once: the evaluation set does not change during fit.
        if self._loader is None and trainer.datamodule is not None and hasattr(trainer.datamodule, "val_dataloader"):
            self._loader = trainer.datamodule.val_dataloader()
        return self._loader

    @staticmethod
    def _publish(trainer: L.Trainer, metrics: dict[str, float]) -> None:
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
        trainer.callback_metrics.update({key: torch.tensor(value) for key, value in metrics.items()})


def is_last_epoch(trainer: L.Trainer) -> bool:
    """True at the end of the epoch after which fit stops (max_steps, max_epochs, fast_dev_run or a stop)."""
    steps_done = trainer.max_steps > 0 and trainer.global_step >= trainer.max_steps
    epochs_done = (
        trainer.max_epochs is not None and trainer.max_epochs > 0 and trainer.current_epoch + 1 >= trainer.max_epochs
    )
    return bool(steps_done or epochs_done or trainer.should_stop or trainer.fast_dev_run)


# ----- final checkpoint -----------------------------------------------------------------------------------------


class FinalCheckpoint(L.Callback):
    """Writes ``last.ckpt`` at the end of the final epoch: step-based checkpoints may miss the last steps."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if is_last_epoch(trainer) and not trainer.fast_dev_run:
            trainer.save_checkpoint(self.path, weights_only=False)  # the full training state


# ----- plots ----------------------------------------------------------------------------------------------------


class PlotCurves(L.Callback):
    """Draws the training curves (loss, temperature, validation recall) to ``<output_dir>/curves.png`` at the end."""

    def __init__(self, output_dir: str | Path):
        self.output_dir = Path(output_dir)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero or trainer.fast_dev_run:  # fast_dev_run disables the loggers
            return
        from vlp.train.plots import plot_curves

        for logger in trainer.loggers:
            logger.save()
        csv_path = next((Path(lg.experiment.metrics_file_path) for lg in trainer.loggers if _is_csv(lg)), None)
        if csv_path is None or not csv_path.exists():
            log.warning("no metrics.csv found: training curves not drawn")
            return
        out = plot_curves(csv_path, self.output_dir / "curves.png")
        log.info("training curves: %s", out)


def _is_csv(logger: Any) -> bool:
    from lightning.pytorch.loggers import CSVLogger

    return isinstance(logger, CSVLogger)
