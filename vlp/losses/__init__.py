"""Losses: ITC (symmetric InfoNCE with image-id positives) and ITM (hard negatives mined from ITC)."""

from vlp.losses.itc import contrastive_loss, itc_loss, positive_targets, soft_cross_entropy
from vlp.losses.itm import itm_loss, sample_hard_negatives

__all__ = [
    "contrastive_loss",
    "itc_loss",
    "itm_loss",
    "positive_targets",
    "sample_hard_negatives",
    "soft_cross_entropy",
]
