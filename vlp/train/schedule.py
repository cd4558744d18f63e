"""Learning-rate schedule: linear warmup then cosine decay, as a multiplier of every group's own lr."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch.optim.lr_scheduler import LambdaLR


@dataclass
class WarmupCosine:
    """lr multiplier at optimizer step ``step`` (0-based); a plain object so LambdaLR saves its state."""

    warmup_steps: int
    total_steps: int
    min_ratio: float

    def __call__(self, step: int) -> float:
        # Warmup reaches the full lr on its last step, so no step is spent at lr 0.
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        decay_steps = max(1, self.total_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / decay_steps)
        return self.min_ratio + (1.0 - self.min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def warmup_cosine(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int, min_ratio: float) -> LambdaLR:
    """A LambdaLR to be stepped once per optimizer step (Lightning ``interval: step``)."""
    warmup_steps = min(warmup_steps, max(0, total_steps - 1))
    return LambdaLR(optimizer, WarmupCosine(warmup_steps, total_steps, min_ratio))
