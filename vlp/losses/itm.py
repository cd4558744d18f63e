"""Image-text matching (ITM): hard negatives mined from ITC similarities, and the 2-way matching loss."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _gumbel_topk(logits: torch.Tensor, k: int, generator: torch.Generator | None) -> torch.Tensor:
    """``k`` draws per row from softmax(logits) without replacement (Gumbel top-k), in one vectorised call.

    Returns (rows, k) column indices; a draw that could only land on a -inf entry is -1.
    """
    uniform = torch.rand(logits.shape, generator=generator, device=logits.device, dtype=torch.float32)
    tiny = torch.finfo(torch.float32).tiny
    gumbel = -torch.log(-torch.log(uniform.clamp(tiny, 1.0 - 1e-7)))
    values, indices = (logits + gumbel).topk(k, dim=1)  # (rows, k)
    return torch.where(torch.isfinite(values), indices, torch.full_like(indices, -1))


@torch.no_grad()
def sample_hard_negatives(
    sim_i2t: torch.Tensor,
    image_ids: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    num_negatives: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw ``num_negatives`` hard negative texts per image and as many hard negative images per text.

    Negatives are drawn without replacement with probability softmax(sim) restricted to the candidates whose
    image id differs (another caption of the same image is never a negative). Slots without a valid candidate
    left get -1.

    Args:
        sim_i2t: (B, B) image-to-text similarities (already divided by the temperature), rows and columns
            in the same batch order.
        image_ids: (B,) image id of each pair; None means every pair is a different image.
        generator: optional generator on ``sim_i2t``'s device, for reproducible draws.
        num_negatives: draws per row (ALBEF: 1).

    Returns:
        ``(neg_text_for_image, neg_image_for_text)``, long tensors of shape (B, num_negatives); -1 where no
        negative exists.
    """
    if sim_i2t.dim() != 2 or sim_i2t.shape[0] != sim_i2t.shape[1]:
        raise ValueError(f"sim_i2t must be a square (B, B) matrix, got shape {tuple(sim_i2t.shape)}")
    if num_negatives < 1:
        raise ValueError(f"num_negatives must be >= 1 (got {num_negatives})")
    batch_size = sim_i2t.shape[0]
    ids = torch.arange(batch_size, device=sim_i2t.device) if image_ids is None else image_ids.to(sim_i2t.device)

    # Positives (same image id) are excluded by a -inf logit; sampling is in fp32 whatever autocast says.
    same_image = ids[:, None] == ids[None, :]  # (B, B)
    logits = torch.nan_to_num(sim_i2t.float(), nan=0.0).masked_fill(same_image, float("-inf"))

    # More draws than columns: the extra slots have no candidate.
    k = min(num_negatives, batch_size)
    neg_text_for_image = _gumbel_topk(logits, k, generator)  # (B, k)
    neg_image_for_text = _gumbel_topk(logits.t(), k, generator)  # (B, k)
    if k < num_negatives:
        missing = torch.full((batch_size, num_negatives - k), -1, dtype=torch.long, device=sim_i2t.device)
        neg_text_for_image = torch.cat([neg_text_for_image, missing], dim=1)  # (B, num_negatives)
        neg_image_for_text = torch.cat([neg_image_for_text, missing], dim=1)  # (B, num_negatives)
    return neg_text_for_image, neg_image_for_text


def itm_loss(itm_logits: torch.Tensor, itm_labels: torch.Tensor) -> torch.Tensor:
    """2-class cross-entropy over the positive and negative pairs, computed in fp32."""
    return F.cross_entropy(itm_logits.float(), itm_labels)
