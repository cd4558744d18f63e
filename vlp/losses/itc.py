"""Image-text contrastive loss (ITC): symmetric InfoNCE with image-id positives.

Rows are this rank's queries, columns the keys of the whole world batch (and, with a queue, the queued
momentum keys). Every rank's loss is a sum over its own rows divided by the world-average row count, so
that DDP's gradient averaging reproduces exactly the loss of one process holding the global batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from vlp.dist import all_gather_nograd, all_gather_with_grad, all_reduce_sum, get_world_size, rank_offset


def positive_targets(query_ids: torch.Tensor, key_ids: torch.Tensor) -> torch.Tensor:
    """Soft targets: every key sharing the query's image id is a positive; each row sums to one."""
    positives = (query_ids[:, None] == key_ids[None, :]).float()  # (Q, K)
    return positives / positives.sum(dim=1, keepdim=True).clamp_min(1.0)


def world_row_mean(per_row: torch.Tensor) -> torch.Tensor:
    """Sum of this rank's rows over the average rows per rank: DDP's mean over ranks is then the global mean."""
    total_rows = all_reduce_sum(torch.tensor(float(per_row.shape[0]), device=per_row.device))
    return per_row.sum() / (total_rows / get_world_size()).clamp_min(1.0)


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy against soft targets, per row, in fp32 whatever the autocast dtype."""
    log_probs = F.log_softmax(logits.float(), dim=1)
    # Masked keys carry -inf logits and zero targets; 0 * -inf must not become NaN.
    return -(log_probs.masked_fill(targets == 0, 0.0) * targets).sum(dim=1)


def contrastive_loss(
    query_feat: torch.Tensor, key_feat: torch.Tensor, temperature: torch.Tensor, targets: torch.Tensor
) -> torch.Tensor:
    """One direction of InfoNCE; the temperature divides the cosine similarities exactly once."""
    sim = query_feat.float() @ key_feat.float().t() / temperature.float()  # (Q, K)
    return world_row_mean(soft_cross_entropy(sim, targets))


def global_image_ids(image_ids: torch.Tensor | None, batch_size: int, device: torch.device) -> torch.Tensor:
    """This rank's ids; without ids every pair is its own image, numbered by its global batch position."""
    if image_ids is not None:
        return image_ids.to(device)
    return torch.arange(batch_size, device=device) + rank_offset(batch_size, device)


def itc_loss(
    image_feat: torch.Tensor,
    text_feat: torch.Tensor,
    temperature: torch.Tensor | float,
    image_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """In-batch symmetric InfoNCE over the globally gathered batch: the mean of image-to-text and text-to-image.

    Args:
        image_feat: (B, E) L2-normalised image features of this rank.
        text_feat: (B, E) L2-normalised text features of this rank, pair-aligned with ``image_feat``.
        temperature: scalar; similarities are divided by it once.
        image_ids: (B,) ids; pairs sharing an id are all positives (never negatives). None: the diagonal.
    """
    temperature = torch.as_tensor(temperature, device=image_feat.device)
    ids = global_image_ids(image_ids, image_feat.shape[0], image_feat.device)

    # Keys are the world batch; gradients flow back to the rank that produced them.
    all_image_feat = all_gather_with_grad(image_feat)  # (N*B, E)
    all_text_feat = all_gather_with_grad(text_feat)  # (N*B, E)
    targets = positive_targets(ids, all_gather_nograd(ids))  # (B, N*B)

    loss_i2t = contrastive_loss(image_feat, all_text_feat, temperature, targets)
    loss_t2i = contrastive_loss(text_feat, all_image_feat, temperature, targets)
    return (loss_i2t + loss_t2i) / 2
