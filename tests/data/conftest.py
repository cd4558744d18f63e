"""Fixtures for the data-layer tests: a tiny offline tokenizer, image/annotation builders, the real-data root."""

from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[2]
MEAN = (0.5, 0.4, 0.3)
STD = (0.25, 0.2, 0.3)

# Enough words for synthetic captions and the hand-written fixtures; everything else maps to [UNK].
VOCAB = """[PAD] [UNK] [CLS] [SEP] [MASK] a an the of to its their it them there is are with image left right above
below small large red green blue yellow purple orange circle circles square squares triangle triangles diamond
diamonds two three dog dogs cat runs on grass snow man woman plays ball""".split()


@pytest.fixture(scope="session")
def tokenizer(tmp_path_factory):
    """A BERT WordPiece tokenizer built from a vocab file (no hub download)."""
    from transformers import BertTokenizerFast

    folder = tmp_path_factory.mktemp("tokenizer")
    (folder / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    tok = BertTokenizerFast.from_pretrained(str(folder))
    assert tok.convert_tokens_to_ids("circle") == VOCAB.index("circle")  # the vocab file was really used
    return tok


@pytest.fixture(scope="session")
def data_root() -> Path:
    """Real data root: $VLP_DATA_ROOT, else ../shared/data next to the repository."""
    return Path(os.environ.get("VLP_DATA_ROOT", REPO.parent / "shared" / "data")).resolve()


@pytest.fixture(scope="session")
def flickr8k(data_root) -> Path:
    root = data_root / "flickr8k"
    if not (root / "ann" / "flickr8k_mini_test.json").is_file() or not (root / "images").is_dir():
        pytest.skip(f"real Flickr8k data not found under {root} (set VLP_DATA_ROOT to the folder holding flickr8k/)")
    return root


def colour_of(i: int) -> tuple[int, int, int]:
    """A distinct, recognisable colour per image index."""
    return (37 * i % 256, 91 * i % 256, 173 * i % 256)


def jpeg_bytes(colour=(200, 30, 30), size=(40, 32), fmt="JPEG", mode="RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, colour).save(buf, fmt)
    return buf.getvalue()


@pytest.fixture
def make_images():
    """Write n small JPEGs img_{i}.jpg (colour_of(i)) under a folder; returns their relative names."""

    def make(folder: Path, n: int, size=(40, 32), prefix: str = "img_") -> list[str]:
        folder.mkdir(parents=True, exist_ok=True)
        names = []
        for i in range(n):
            name = f"{prefix}{i}.jpg"
            Image.new("RGB", size, colour_of(i)).save(folder / name, quality=95)
            names.append(name)
        return names

    return make


@pytest.fixture
def write_json():
    def write(path: Path, obj) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(obj))
        return path

    return write


@pytest.fixture
def make_shards():
    """Write img2dataset-style tar shards: KEY.jpg + KEY.txt + KEY.json per sample."""

    def make(folder: Path, n_shards: int, per_shard: int) -> list[str]:
        folder.mkdir(parents=True, exist_ok=True)
        captions = []
        for s in range(n_shards):
            with tarfile.open(folder / f"{s:05d}.tar", "w") as tar:
                for j in range(per_shard):
                    key = f"{s:05d}{j:04d}"
                    caption = f"a red dog {s} {j}"
                    captions.append(caption)
                    meta = {"key": key, "caption": caption, "status": "success", "width": 40, "height": 32}
                    members = {
                        "jpg": jpeg_bytes(colour_of(s * per_shard + j)),
                        "txt": caption.encode(),
                        "json": json.dumps(meta).encode(),
                    }
                    for ext, data in members.items():
                        info = tarfile.TarInfo(f"{key}.{ext}")
                        info.size = len(data)
                        tar.addfile(info, io.BytesIO(data))
        return captions

    return make


def mean_colour(image_tensor) -> np.ndarray:
    """Undo the test normalisation and return the image's mean RGB in 0-255."""
    arr = image_tensor.numpy().transpose(1, 2, 0) * np.array(STD) + np.array(MEAN)  # (3, H, W) -> (H, W, 3)
    return arr.reshape(-1, 3).mean(axis=0) * 255.0  # (H * W, 3) -> (3,)


@pytest.fixture(scope="session")
def util() -> SimpleNamespace:
    """Plain helper functions (fixtures, so tests need no import path tricks)."""
    return SimpleNamespace(colour_of=colour_of, jpeg_bytes=jpeg_bytes, mean_colour=mean_colour, MEAN=MEAN, STD=STD)


@pytest.fixture
def build_dm(tokenizer):
    """A VLPDataModule with test-friendly defaults (small images, no colour-changing augmentation, no workers)."""
    from vlp.data import DataConfig, VLPDataModule

    def build(**overrides) -> VLPDataModule:
        settings = {"image_size": 32, "num_workers": 0, "randaugment": False, "batch_size": 4, "eval_batch_size": 4}
        settings.update(overrides)
        return VLPDataModule(DataConfig(**settings), tokenizer, MEAN, STD)

    return build


@pytest.fixture(scope="session")
def check_train_item():
    """Assert the shared training-sample schema and return the item."""

    def check(item: dict, image_size: int = 32) -> dict:
        import torch

        assert set(item) == {"image", "caption", "image_id", "index"}, item.keys()
        assert item["image"].dtype == torch.float32 and item["image"].shape == (3, image_size, image_size)
        assert isinstance(item["caption"], str) and item["caption"].strip() == item["caption"] and item["caption"]
        assert isinstance(item["image_id"], int) and item["image_id"] >= 0
        assert isinstance(item["index"], int)
        return item

    return check
