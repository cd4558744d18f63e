"""A dataset salted with every bad case goes through a real DataLoader epoch without stopping."""

from __future__ import annotations

import io
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from vlp.data.skips import SkipCounter

GOOD_MODES = {  # repaired by conversion, so these samples are valid
    "rgb.png": lambda: Image.new("RGB", (40, 32), (200, 20, 20)),
    "grey.png": lambda: Image.new("L", (40, 32), 100),
    "palette.png": lambda: Image.new("RGB", (40, 32), (20, 200, 20)).convert("P"),
    "rgba.png": lambda: Image.new("RGBA", (40, 32), (20, 20, 200, 128)),
    "cmyk.jpg": lambda: Image.new("CMYK", (40, 32), (0, 255, 0, 0)),
    "int16.png": lambda: Image.fromarray(np.full((32, 40), 40000, dtype=np.uint16)),
    "oversized.png": lambda: Image.new("RGB", (600, 400), (90, 90, 20)),  # shrunk to max_image_side
}


def _write_bad_image(path, kind: str) -> None:
    if kind == "empty file":
        path.write_bytes(b"")
    elif kind == "truncated image":
        buf = io.BytesIO()
        Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buf, "JPEG")
        path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    elif kind == "unreadable image":
        path.write_bytes(b"<html>404 not found</html>")
    elif kind == "image too small":
        Image.new("RGB", (1, 1), (255, 0, 0)).save(path, "PNG")
    elif kind == "extreme aspect ratio":
        Image.new("RGB", (20000, 40), (0, 0, 0)).save(path, "PNG")


BAD_IMAGES = [
    "missing file",
    "empty file",
    "truncated image",
    "unreadable image",
    "image too small",
    "extreme aspect ratio",
]
BAD_CAPTIONS = {  # caption field -> expected skip kind
    "empty": ("", "empty caption"),
    "whitespace": ("   \t", "empty caption"),
    "punctuation only": (" ... ", "empty caption"),  # nothing left after cleaning
    "empty list": ([], "empty caption list"),
    "list of non-strings": ([1, None], "empty caption list"),
    "number": (42, "caption not a string"),
    "null": (None, "caption not a string"),
}


@pytest.fixture
def salted(tmp_path, write_json):
    """ALBEF train JSON mixing valid (incl. repairable) and bad entries; returns (root, valid indices, bad kinds)."""
    images = tmp_path / "images"
    images.mkdir()
    entries, valid, bad = [], [], {}

    # Valid entries, including every repairable mode, several captions each.
    for name, make in GOOD_MODES.items():
        make().save(images / name)
        for k in range(2):
            valid.append(len(entries))
            entries.append({"image": f"images/{name}", "caption": f"good {name} {k}"})

    # Broken images with good captions.
    for kind in BAD_IMAGES:
        path = images / f"{kind.replace(' ', '_')}.jpg"
        _write_bad_image(path, kind)
        bad[len(entries)] = kind
        entries.append({"image": f"images/{path.name}", "caption": "a fine caption"})

    # Good images with broken captions.
    for field, kind in BAD_CAPTIONS.values():
        bad[len(entries)] = kind
        entries.append({"image": "images/rgb.png", "caption": field})

    write_json(tmp_path / "train.json", entries)
    return tmp_path, valid, bad


def _epoch(dm):
    """One epoch through the real DataLoader, bookkeeping as the training loop does."""
    seen = []
    for batch in dm.train_dataloader():
        assert batch["image"].shape[1:] == (3, 32, 32)
        assert batch["input_ids"].shape[0] == batch["image"].shape[0] == len(batch["index"])
        seen += batch["index"].tolist()
        dm.train_batch_done(batch)
    return seen


def test_salted_epoch_skips_exactly_the_bad_samples(salted, build_dm):
    root, valid, bad = salted
    dm = build_dm(name="json", root=str(root), train_file="train.json", num_workers=2, max_image_side=256)
    dm.setup("fit")
    seen = _epoch(dm)

    # Every valid sample exactly once; no bad one.
    assert sorted(seen) == valid
    summary = dm.train_epoch_done("salted epoch")
    assert summary["skipped"] == len(bad) == 13
    assert summary["by_reason"] == dict(Counter(bad.values()))
    assert dm.skip_counter.total == 0  # reset for the next epoch


def test_skipped_items_carry_path_and_reason(salted, build_dm):
    root, _, bad = salted
    dm = build_dm(name="json", root=str(root), train_file="train.json")
    dm.setup("fit")
    for index, kind in bad.items():
        item = dm.train_dataset[index]
        assert item["skipped"] is True and item["index"] == index
        assert item["reason"].split(":")[0] == kind
        assert item["path"].startswith(str(root / "images"))


def test_skip_counter_summary_and_state():
    counter = SkipCounter(log_first=1)
    counter.update([{"index": 1, "path": "a.jpg", "reason": "missing file: a.jpg"}])
    counter.update([{"index": 2, "path": "b.jpg", "reason": "empty caption"}] * 2)
    assert counter.summary()["by_reason"] == {"missing file": 1, "empty caption": 2}
    restored = SkipCounter()
    restored.load_state_dict(counter.state_dict())
    assert restored.summary() == counter.summary()
    counter.reset()
    assert counter.summary() == {"skipped": 0, "by_reason": {}, "examples": []}


def test_salted_dataset_across_three_ranks(salted, build_dm):
    root, valid, bad = salted
    per_rank = []
    for rank in range(3):
        dm = build_dm(name="json", root=str(root), train_file="train.json", max_image_side=256)
        dm._rank, dm._world = rank, 3
        dm.setup("fit")
        per_rank.append(_epoch(dm))

    # Each valid sample exactly once over all ranks, and every rank ran the same number of batches.
    assert sorted(i for seen in per_rank for i in seen) == valid
    n = len(valid) + len(bad)
    assert {len(dm.train_sampler)} == {-(-n // 3)}


def test_all_skipped_batch_has_empty_tensors(salted, build_dm, tokenizer):
    from vlp.data.collate import ImageTextCollator

    root, _, bad = salted
    dm = build_dm(name="json", root=str(root), train_file="train.json")
    dm.setup("fit")
    batch = ImageTextCollator(tokenizer, max_length=12, image_size=32)([dm.train_dataset[i] for i in list(bad)[:4]])
    assert batch["image"].shape == (0, 3, 32, 32)
    assert batch["input_ids"].shape == (0, 12) and batch["attention_mask"].shape == (0, 12)
    assert batch["image_id"].shape == (0,) and batch["index"].shape == (0,)
    assert len(batch["skipped"]) == 4 and batch["raw_size"] == 4
