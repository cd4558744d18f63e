"""Image-text matching (ITM): hard negatives mined from ITC similarities, and the 2-way matching loss."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _gumbel_argmax(logits: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One draw per row from softmax(logits) (Gumbel-max), in one vectorised call; -inf entries are never drawn."""
    uniform = torch.rand(logits.shape, generator=generator, device=logits.device, dtype=torch.float32)
    tiny = torch.finfo(torch.float32).tiny
    gumbel = -torch.log(-torch.log(uniform.clamp(tiny, 1.0 - 1e-7)))
    return (logits + gumbel).argmax(dim=1)


@torch.no_grad()
def sample_hard_negatives(
    sim_i2t: torch.Tensor, image_ids: torch.Tensor | None = None, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw one hard negative text per image and one hard negative image per text.

    A negative is drawn with probability softmax(sim) restricted to the candidates whose image id differs
    (another caption of the same image is never a negative). Rows without any valid candidate get -1.

    Args:
        sim_i2t: (B, B) image-to-text similarities (already divided by the temperature), rows and columns
            in the same batch order.
        image_ids: (B,) image id of each pair; None means every pair is a different image.
        generator: optional generator on ``sim_i2t``'s device, for reproducible draws.

    Returns:
        ``(neg_text_for_image, neg_image_for_text)``, long tensors of shape (B,), -1 where no negative exists.
    """
    if sim_i2t.dim() != 2 or sim_i2t.shape[0] != sim_i2t.shape[1]:
        raise ValueError(f"sim_i2t must be a square (B, B) matrix, got shape {tuple(sim_i2t.shape)}")
    batch_size = sim_i2t.shape[0]
    ids = torch.arange(batch_size, device=sim_i2t.device) if image_ids is None else image_ids.to(sim_i2t.device)

    # Positives (same image id) are excluded by a -inf logit; sampling is in fp32 whatever autocast says.
    same_image = ids[:, None] == ids[None, :]  # (B, B)
    logits = torch.nan_to_num(sim_i2t.float(), nan=0.0).masked_fill(same_image, float("-inf"))
    has_negative = ~same_image.all(dim=1)  # symmetric: the same rows for images and for texts

    neg_text_for_image = _gumbel_argmax(logits, generator)
    neg_image_for_text = _gumbel_argmax(logits.t(), generator)
    missing = torch.full_like(neg_text_for_image, -1)
    return torch.where(has_negative, neg_text_for_image, missing), torch.where(
        has_negative, neg_image_for_text, missing
    )


def itm_loss(itm_logits: torch.Tensor, itm_labels: torch.Tensor) -> torch.Tensor:
    """2-class cross-entropy over the positive and negative pairs, computed in fp32."""
    return F.cross_entropy(itm_logits.float(), itm_labels)
