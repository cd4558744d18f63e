"""Collators: shapes and dtypes, truncation, skipped and padding items, text batches."""

from __future__ import annotations

import pytest
import torch

from vlp.data.collate import EvalImageCollator, ImageTextCollator, tokenize_texts


def _item(index: int, caption: str = "a red circle", image_id: int = 0) -> dict:
    return {"image": torch.full((3, 8, 8), float(index)), "caption": caption, "image_id": image_id, "index": index}


def test_training_batch_shapes_and_values(tokenizer):
    items = [_item(0, "a red circle", 5), {"pad": True, "index": 3}, _item(1, "two blue squares left of a dog", 6)]
    items.append({"skipped": True, "index": 9, "path": "x.jpg", "reason": "missing file: x.jpg"})
    batch = ImageTextCollator(tokenizer, max_length=16, image_size=8)(items)

    assert batch["image"].shape == (2, 3, 8, 8) and batch["image"][1].mean() == 1.0
    assert batch["input_ids"].dtype == torch.long and batch["attention_mask"].dtype == torch.long
    # Padded to the longest caption: [CLS] + 7 words + [SEP] = 9 tokens; the short one has 5 real tokens.
    assert batch["input_ids"].shape == (2, 9)
    assert batch["attention_mask"].sum(dim=1).tolist() == [5, 9]
    assert batch["input_ids"][0, :5].tolist() == tokenizer("a red circle")["input_ids"]
    assert batch["image_id"].tolist() == [5, 6] and batch["index"].tolist() == [0, 1]
    assert batch["skipped"] == [{"index": 9, "path": "x.jpg", "reason": "missing file: x.jpg"}]
    assert batch["raw_size"] == 4


def test_long_captions_are_cut_at_max_length(tokenizer):
    batch = ImageTextCollator(tokenizer, max_length=6, image_size=8)([_item(0, "red " * 40)])
    assert batch["input_ids"].shape == (1, 6)
    assert batch["input_ids"][0, -1].item() == tokenizer.sep_token_id


def test_tokenizer_without_pad_token_is_rejected(tokenizer):
    class NoPad:
        pad_token_id = None

    with pytest.raises(ValueError, match="pad token"):
        ImageTextCollator(NoPad(), 16)


def test_eval_collator_keeps_failed_slots_blank():
    items = [
        {"image": torch.ones(3, 4, 4), "index": 0, "image_id": 10},
        {"skipped": True, "index": 1, "image_id": 11, "path": "b.jpg", "reason": "truncated image: x"},
        {"pad": True, "index": 0},
    ]
    batch = EvalImageCollator(image_size=4)(items)
    assert batch["index"].tolist() == [0, 1] and batch["image_id"].tolist() == [10, 11]
    assert batch["image"][0].sum() == 48 and batch["image"][1].abs().sum() == 0
    assert [s["index"] for s in batch["skipped"]] == [1]
    assert EvalImageCollator(4)([{"pad": True, "index": 0}])["image"].shape == (0, 3, 4, 4)


def test_tokenize_texts_covers_every_text_in_order(tokenizer):
    texts = [f"{'red ' * (i % 4)}circle" for i in range(7)]
    batches = list(tokenize_texts(tokenizer, texts, max_length=8, batch_size=3))
    assert [b["index"].tolist() for b in batches] == [[0, 1, 2], [3, 4, 5], [6]]
    assert batches[0]["attention_mask"].sum(dim=1).tolist() == [3, 4, 5]
