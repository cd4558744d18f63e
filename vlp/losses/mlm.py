"""Masked language modelling (MLM) conditioned on the image: BERT's token corruption and the masked-token loss.

ALBEF and BLIP train the fusion encoder with it next to ITC and ITM: to fill in a masked word such as a colour or
"left", the fusion has to look at the image, a dense grounding signal that the two-way ITM label does not give.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100  # label of every position that is not predicted (F.cross_entropy's default ignore_index)


@torch.no_grad()
def mask_tokens(
    input_ids: torch.Tensor,
    maskable: torch.Tensor,
    mask_token_id: int,
    vocab_size: int,
    probability: float = 0.15,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT's corruption: each maskable token is chosen with ``probability``; a chosen token becomes ``[MASK]``
    (80%), a random token (10%) or stays (10%).

    Args:
        input_ids: (B, L) token ids.
        maskable: (B, L) bool, true for real word tokens (not padding, [CLS], [SEP] or other special tokens).
        mask_token_id: id of the ``[MASK]`` token.
        vocab_size: random replacements are drawn from ``[0, vocab_size)``.
        probability: chance that a maskable token is chosen.
        generator: optional generator on ``input_ids``' device, for reproducible draws.

    Returns:
        ``(masked_ids, labels)``, both (B, L): the corrupted ids, and the original id at chosen positions,
        :data:`IGNORE_INDEX` elsewhere.
    """
    if not 0.0 < probability < 1.0:
        raise ValueError(f"the masking probability must lie in (0, 1) (got {probability})")
    draw = lambda: torch.rand(input_ids.shape, generator=generator, device=input_ids.device)  # noqa: E731

    # Which tokens are predicted, then what each of them is shown as.
    chosen = (draw() < probability) & maskable.bool()
    action = draw()
    to_mask = chosen & (action < 0.8)
    to_random = chosen & (action >= 0.8) & (action < 0.9)
    random_ids = torch.randint(vocab_size, input_ids.shape, generator=generator, device=input_ids.device)

    masked_ids = torch.where(to_mask, torch.full_like(input_ids, mask_token_id), input_ids)
    masked_ids = torch.where(to_random, random_ids, masked_ids)
    labels = torch.where(chosen, input_ids, torch.full_like(input_ids, IGNORE_INDEX))
    return masked_ids, labels


def mlm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy (fp32) of (M, V) vocabulary logits against (M,) labels; 0 when nothing is masked.

    Positions labelled :data:`IGNORE_INDEX` do not count. A batch where no token was chosen gives a zero that
    still depends on ``logits`` (so every parameter gets a gradient, as DDP needs), never NaN.
    """
    valid = labels != IGNORE_INDEX
    per_token = F.cross_entropy(logits.float(), labels.masked_fill(~valid, 0), reduction="none")  # (M,)
    return (per_token * valid).sum() / valid.sum().clamp_min(1)
