"""Collators: drop padding, report skipped samples, stack images, tokenize captions.

Training batch (:class:`ImageTextCollator`)::

    image (B, 3, H, W) float, input_ids (B, L) long, attention_mask (B, L) long, image_id (B,) long,
    index (B,) long, skipped list[dict(index, path, reason)], raw_size int

``raw_size`` is the number of dataset indices that went into the batch (kept + skipped + padding): the amount to
pass to ``ShardedSampler.advance``. A batch where every item was skipped has B = 0 with the same trailing shapes
(L = max_length).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch


def _split(items: Sequence[dict[str, Any]]) -> tuple[list[dict], list[dict]]:
    """Separate usable items from skipped ones; padding items vanish without a trace."""
    kept = [it for it in items if not it.get("skipped") and not it.get("pad")]
    skipped = [{"index": it["index"], "path": it["path"], "reason": it["reason"]} for it in items if it.get("skipped")]
    return kept, skipped


class ImageTextCollator:
    """Training collator. ``tokenizer`` is any Hugging Face tokenizer with a pad token."""

    def __init__(self, tokenizer: Any, max_length: int, image_size: int = 224) -> None:
        if getattr(tokenizer, "pad_token_id", None) is None:
            raise ValueError("the tokenizer has no pad token; set tokenizer.pad_token before building the collator")
        if max_length < 2:
            raise ValueError(f"max_length must be >= 2 to hold the special tokens (got {max_length})")
        self.tokenizer, self.max_length, self.image_size = tokenizer, max_length, image_size

    def __call__(self, items: Sequence[dict[str, Any]]) -> dict[str, Any]:
        kept, skipped = _split(items)
        batch: dict[str, Any] = {"skipped": skipped, "raw_size": len(items)}

        # Nothing usable: empty tensors with the usual trailing shapes, so downstream code can test B == 0.
        if not kept:
            size = self.image_size
            batch.update(
                image=torch.zeros(0, 3, size, size),
                input_ids=torch.zeros(0, self.max_length, dtype=torch.long),
                attention_mask=torch.zeros(0, self.max_length, dtype=torch.long),
                image_id=torch.zeros(0, dtype=torch.long),
                index=torch.zeros(0, dtype=torch.long),
            )
            return batch

        # Text: pad to the longest caption of the batch, cut at the text tower's limit.
        tokens = self.tokenizer(
            [it["caption"] for it in kept],
            padding="longest",
            truncation=True,
            max_length=self.max_length,
            return_tensors="pt",
        )
        batch.update(
            image=torch.stack([it["image"] for it in kept]),  # (B, 3, H, W)
            input_ids=tokens["input_ids"].long(),
            attention_mask=tokens["attention_mask"].long(),
            image_id=torch.tensor([it["image_id"] for it in kept], dtype=torch.long),
            index=torch.tensor([it["index"] for it in kept], dtype=torch.long),
        )
        return batch


class EvalImageCollator:
    """Retrieval image collator.

    Padding items are dropped. A skipped image keeps its slot with an all-zero tensor (the mean colour after
    normalisation) and is listed in ``skipped``: the scorer still sees every gallery image, so a failure lowers
    recall visibly instead of shrinking the gallery. Returns image (B, 3, H, W), index (B,), image_id (B,),
    skipped list.
    """

    def __init__(self, image_size: int = 224) -> None:
        self.image_size = image_size

    def __call__(self, items: Sequence[dict[str, Any]]) -> dict[str, Any]:
        items = [it for it in items if not it.get("pad")]
        _, skipped = _split(items)
        blank = torch.zeros(3, self.image_size, self.image_size)
        images = [it.get("image", blank) for it in items]
        return {
            "image": torch.stack(images) if images else blank.new_zeros(0, *blank.shape),  # (B, 3, H, W)
            "index": torch.tensor([it["index"] for it in items], dtype=torch.long),
            "image_id": torch.tensor([it.get("image_id", -1) for it in items], dtype=torch.long),
            "skipped": skipped,
        }


def tokenize_texts(
    tokenizer: Any, texts: Sequence[str], max_length: int, batch_size: int = 256
) -> Iterator[dict[str, torch.Tensor]]:
    """Yield ``dict(input_ids, attention_mask, index)`` batches over a retrieval set's ``texts``."""
    for start in range(0, len(texts), batch_size):
        chunk = list(texts[start : start + batch_size])
        tokens = tokenizer(chunk, padding="longest", truncation=True, max_length=max_length, return_tensors="pt")
        yield {
            "input_ids": tokens["input_ids"].long(),
            "attention_mask": tokens["attention_mask"].long(),
            "index": torch.arange(start, start + len(chunk)),
        }
