"""Feature queue of momentum features with their image ids (ALBEF/BLIP), for any world and batch size."""

from __future__ import annotations

import torch
import torch.nn as nn


class FeatureQueue(nn.Module):
    """A ring buffer of (image_feat_m, text_feat_m, image_id) rows.

    Writes wrap around, so the batch size never has to divide the queue size and a short last batch is
    fine. Slots that were never written are not returned: there are no random placeholder negatives.
    The state is a set of buffers, so it is saved in checkpoints and identical on every rank (each rank
    enqueues the same gathered rows); a checkpoint can therefore be resumed under another world size.
    """

    def __init__(self, size: int, dim: int):
        super().__init__()
        self.size = size
        self.register_buffer("image_queue", torch.zeros(size, dim))
        self.register_buffer("text_queue", torch.zeros(size, dim))
        self.register_buffer("id_queue", torch.full((size,), -1, dtype=torch.long))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))
        self.register_buffer("count", torch.zeros((), dtype=torch.long))

    def keys(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The filled rows; before the first wrap-around they are exactly the first ``count`` slots."""
        filled = int(self.count)
        return self.image_queue[:filled], self.text_queue[:filled], self.id_queue[:filled]

    @torch.no_grad()
    def enqueue(self, image_feat: torch.Tensor, text_feat: torch.Tensor, image_ids: torch.Tensor) -> None:
        """Write world-gathered rows at the pointer, wrapping around; only the newest ``size`` rows survive."""
        image_feat, text_feat, image_ids = image_feat[-self.size :], text_feat[-self.size :], image_ids[-self.size :]
        num = image_feat.shape[0]
        slots = (self.ptr + torch.arange(num, device=self.ptr.device)) % self.size  # (num,)
        self.image_queue[slots] = image_feat.to(self.image_queue.dtype)
        self.text_queue[slots] = text_feat.to(self.text_queue.dtype)
        self.id_queue[slots] = image_ids.to(self.id_queue.device)
        self.ptr.copy_((self.ptr + num) % self.size)
        self.count.copy_(torch.clamp(self.count + num, max=self.size))
