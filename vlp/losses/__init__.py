"""Losses: ITC (symmetric InfoNCE with image-id positives), ITM (hard negatives mined from ITC) and MLM."""

from vlp.losses.itc import contrastive_loss, itc_loss, positive_targets, soft_cross_entropy
from vlp.losses.itm import itm_loss, sample_hard_negatives
from vlp.losses.mlm import IGNORE_INDEX, mask_tokens, mlm_loss

__all__ = [
    "IGNORE_INDEX",
    "contrastive_loss",
    "itc_loss",
    "itm_loss",
    "mask_tokens",
    "mlm_loss",
    "positive_targets",
    "sample_hard_negatives",
    "soft_cross_entropy",
]
