"""LightningModule around VLPModel: optimizer and schedule, safe steps, momentum/queue updates, metrics.

What Lightning does not know about the model is handled here:

* ``after_optimizer_step()`` (EMA of the momentum copies, enqueue of their features) runs once per optimizer
  step, inside :meth:`optimizer_step`, which Lightning calls only on accumulation boundaries.
* A non-finite loss on any rank skips the step on every rank (an all-reduced flag, then ``None`` from
  ``training_step``): no backward, no weight update, and the momentum features of that micro-batch are dropped
  before they reach the queue. Skips are counted in ``train/nonfinite_steps``.
* The distillation weight ramps linearly from 0 to ``model.alpha`` over the first epoch (ALBEF).
"""

from __future__ import annotations

import logging
from typing import Any

import lightning as L
import torch
from transformers import PreTrainedTokenizerBase

from vlp.dist import all_reduce_sum, get_world_size
from vlp.model import VLPModel
from vlp.train.config import TrainConfig, load_config, to_plain_dict
from vlp.train.optim import build_optimizer, describe_groups, group_specs
from vlp.train.schedule import warmup_cosine

log = logging.getLogger(__name__)

MEAN_OUTPUTS = ("loss", "itc_loss", "itm_loss", "itm_acc", "mlm_loss", "mlm_acc", "temperature")
SUMMED_OUTPUTS = MEAN_OUTPUTS + ("itm_invalid_rows",)


def world_sum_of_outputs(out: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Sums over ranks of the model's scalar outputs and of a non-finite-loss flag, in one all-reduce."""
    keys = [key for key in SUMMED_OUTPUTS if key in out]
    local = [out[key].detach().float().reshape(()) for key in keys]
    local.append((~torch.isfinite(out["loss"].detach())).float().reshape(()))
    sums = all_reduce_sum(torch.stack(local))  # (len(keys) + 1,)
    return dict(zip(keys + ["nonfinite"], sums.unbind()))


class VLPLightningModule(L.LightningModule):
    """Trains a :class:`VLPModel` from a validated :class:`TrainConfig`.

    ``hyper_parameters['cfg']`` of every checkpoint is the resolved config as plain containers, so the model
    can be rebuilt from ``cfg['model']`` without this package's classes.
    """

    def __init__(
        self,
        cfg: TrainConfig | dict[str, Any],
        tokenizer: PreTrainedTokenizerBase | None = None,
        load_weights: bool = True,
    ):
        super().__init__()
        if not isinstance(cfg, TrainConfig):  # rebuilt from a checkpoint's hyper_parameters
            cfg = load_config(cfg)
        self.cfg = cfg
        self.save_hyperparameters({"cfg": to_plain_dict(cfg)})
        self.model = VLPModel(cfg.model, tokenizer=tokenizer, load_weights=load_weights)

        # Counters that are part of the training state (saved in and restored from checkpoints).
        self.nonfinite_steps = 0
        self.steps_per_epoch: int | None = None
        self._stepped_in_window = False

    # ----- optimizer ---------------------------------------------------------------------------------------------

    def configure_optimizers(self) -> dict[str, Any]:
        optim_cfg = self.cfg.optim
        optimizer = build_optimizer(self.model, optim_cfg)
        total_steps = optim_cfg.total_steps or self._estimated_total_steps()
        if optim_cfg.warmup_steps >= total_steps:
            log.warning(
                "optim.warmup_steps=%d >= %d total steps: warmup is cut short", optim_cfg.warmup_steps, total_steps
            )
        scheduler = warmup_cosine(optimizer, optim_cfg.warmup_steps, total_steps, optim_cfg.min_lr_ratio)
        log.info(
            "optimizer: AdamW, %d steps (%d warmup), parameter groups:\n%s",
            total_steps,
            min(optim_cfg.warmup_steps, total_steps),
            describe_groups(group_specs(self.model, optim_cfg), optim_cfg.lr),
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step", "frequency": 1}}

    def _estimated_total_steps(self) -> int:
        # Lightning's estimate accounts for max_steps, max_epochs, limits, accumulation and world size.
        estimate = self.trainer.estimated_stepping_batches
        if estimate == float("inf"):
            raise ValueError("the run length is unknown (streaming data): set trainer.max_steps or optim.total_steps")
        return max(1, int(estimate))

    def optimizer_step(self, epoch: int, batch_idx: int, optimizer, optimizer_closure=None) -> None:
        """The optimizer step, then the momentum update; Lightning calls this on accumulation boundaries only."""
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        # A window in which every micro-batch was skipped changed no weight: leave the EMA and queue as they are.
        if self._stepped_in_window:
            self.model.after_optimizer_step()
        self._stepped_in_window = False

    def on_before_optimizer_step(self, optimizer) -> None:
        """A finite loss can still give non-finite gradients (an overflow in backward): drop them, do not step."""
        if self.trainer.precision == "16-mixed":
            return  # the gradient scaler skips such steps itself (and they are routine while it calibrates)
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        local_bad = torch.stack([~torch.isfinite(g).all() for g in grads]).any() if grads else torch.tensor(False)
        # Sharded strategies hold different gradient shards per rank: decide together.
        if all_reduce_sum(local_bad.float().to(self.device)).item() == 0:
            return
        optimizer.zero_grad(set_to_none=True)  # AdamW leaves parameters without a gradient untouched
        self.model.drop_pending()
        self._stepped_in_window = False
        self.nonfinite_steps += 1
        log.warning("non-finite gradients at step %d: step skipped (%d so far)", self.global_step, self.nonfinite_steps)

    # ----- training ----------------------------------------------------------------------------------------------

    def on_train_start(self) -> None:
        # Optimizer steps per epoch, fixed at the first start and then kept in the checkpoint: a resumed
        # run must ramp alpha exactly as the uninterrupted one did.
        if self.steps_per_epoch is None:
            batches = self.trainer.num_training_batches
            per_epoch = batches // self.trainer.accumulate_grad_batches if batches != float("inf") else 0
            self.steps_per_epoch = max(1, per_epoch)

    def alpha(self) -> float:
        """Distillation weight: model.alpha * min(1, step / ramp), the ramp being one epoch by default."""
        ramp = self.cfg.optim.alpha_ramp_steps
        ramp = (self.steps_per_epoch or 1) if ramp is None else ramp
        if ramp == 0:
            return self.cfg.model.alpha
        return self.cfg.model.alpha * min(1.0, self.global_step / ramp)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor | None:
        # Every rank must take the same branch: a skip on one rank and a backward on another would hang DDP.
        # A batch whose samples were all skipped by the data layer (B = 0) skips the step everywhere.
        empty = all_reduce_sum(torch.tensor(float(batch["image"].shape[0] == 0), device=self.device))
        if empty.item() > 0:
            log.warning(
                "an empty batch (all its samples skipped by the data layer) at step %d: step skipped", self.global_step
            )
            return None

        pending = self.model.num_pending
        out = self.model(batch, alpha=self.alpha())

        # One all-reduce gives both the skip decision and the world means of the logged terms.
        world_sums = world_sum_of_outputs(out)
        if world_sums["nonfinite"].item() > 0:
            return self._skip_step(out, pending)
        self._stepped_in_window = True
        self._log_step(world_sums, batch)
        return out["loss"]

    def _skip_step(self, out: dict[str, torch.Tensor], pending: int) -> None:
        # The momentum features of this micro-batch may be non-finite too; they must never enter the queue.
        self.model.drop_pending(keep=pending)
        self.nonfinite_steps += 1
        log.warning(
            "non-finite loss at step %d (local itc_loss=%s, itm_loss=%s): step skipped on every rank (%d so far)",
            self.global_step,
            float(out["itc_loss"].detach()),
            float(out.get("itm_loss", torch.tensor(0.0)).detach()),
            self.nonfinite_steps,
        )
        self.log("train/nonfinite_steps", float(self.nonfinite_steps), on_step=True, on_epoch=False, batch_size=1)
        return None

    def _log_step(self, world_sums: dict[str, torch.Tensor], batch: dict[str, Any]) -> None:
        # Losses and accuracy are world means (what the optimizer sees); invalid ITM rows a world count.
        world = get_world_size()
        metrics = {f"train/{key}": value / world for key, value in world_sums.items() if key in MEAN_OUTPUTS}
        if "itm_invalid_rows" in world_sums:
            metrics["train/itm_invalid_rows"] = world_sums["itm_invalid_rows"]
        metrics["train/alpha"] = self.alpha()
        metrics["train/lr"] = self._base_lr()
        metrics["train/nonfinite_steps"] = float(self.nonfinite_steps)
        batch_size = int(batch["image"].shape[0])
        self.log_dict(metrics, on_step=True, on_epoch=False, batch_size=batch_size)
        self.log("train/loss_epoch", metrics["train/loss"], on_step=False, on_epoch=True, batch_size=batch_size)

        # Samples the data layer skipped in this rank's batch (the epoch summary comes from the data module).
        self.log(
            "train/skipped_samples", float(len(batch.get("skipped", []))), on_step=True, on_epoch=False, batch_size=1
        )

    def _base_lr(self) -> float:
        """The lr of a group with scale 1 (the configured lr after warmup/cosine), whatever the group layout."""
        group = self.trainer.optimizers[0].param_groups[0]
        return group["lr"] / group.get("lr_scale", 1.0)

    # ----- checkpoint state --------------------------------------------------------------------------------------

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["vlp_train_state"] = {
            "nonfinite_steps": self.nonfinite_steps,
            "steps_per_epoch": self.steps_per_epoch,
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("vlp_train_state", {})
        self.nonfinite_steps = int(state.get("nonfinite_steps", 0))
        self.steps_per_epoch = state.get("steps_per_epoch")
