"""Tiny models and retrieval sets for the evaluation tests (CPU, seconds)."""

from __future__ import annotations

import numpy as np
import torch
from helpers import tiny_model_config

from vlp.model import ModelConfig, VLPModel

WORDS = "a the red green blue small big circle square star dog cat man woman ball grass water left right".split()


def tiny_config() -> ModelConfig:
    """The shared tiny model (tests/helpers.py) with 2 text layers and 2 BERT layers that initialise the fusion."""
    cfg = tiny_model_config(queue_size=32)
    cfg.text_encoder.config["num_hidden_layers"] = 4
    return cfg


def tiny_model(seed: int = 0) -> VLPModel:
    torch.manual_seed(seed)
    return VLPModel(tiny_config()).eval()


class TinyRetrievalSet(torch.utils.data.Dataset):
    """Random images with ``captions_per_image`` random captions each, in the RetrievalDataset layout."""

    def __init__(self, n_images: int, captions_per_image: int = 5, seed: int = 0, image_size: int = 32):
        gen = torch.Generator().manual_seed(seed)
        rng = np.random.default_rng(seed)
        self.images = torch.randn(n_images, 3, image_size, image_size, generator=gen)
        self.texts = [
            " ".join(rng.choice(WORDS, size=rng.integers(3, 9))) for _ in range(n_images * captions_per_image)
        ]
        self.txt2img = np.repeat(np.arange(n_images), captions_per_image)
        self.img2txt = [np.arange(i * captions_per_image, (i + 1) * captions_per_image) for i in range(n_images)]
        self.image_paths = None

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, i: int) -> dict:
        return {"image": self.images[i], "index": i, "image_id": i}

    def load_image_pil(self, i: int):
        from PIL import Image

        pixels = self.images[i].permute(1, 2, 0)  # (3, H, W) -> (H, W, 3)
        pixels = (pixels - pixels.min()) / (pixels.max() - pixels.min()) * 255
        return Image.fromarray(pixels.to(torch.uint8).numpy())
