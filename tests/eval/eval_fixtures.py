"""Tiny models and retrieval sets for the evaluation tests (CPU, seconds)."""

from __future__ import annotations

import numpy as np
import torch

from vlp.model import FusionConfig, ImageEncoderConfig, ModelConfig, TextEncoderConfig, VLPModel

WORDS = "a the red green blue small big circle square star dog cat man woman ball grass water left right".split()


def tiny_config() -> ModelConfig:
    """ViT (patch 8 on 32 px: 17 tokens, width 32) and a 2-layer BERT of width 32, no dropout."""
    return ModelConfig(
        image_encoder=ImageEncoderConfig(
            name="vit_tiny_patch16_224",
            image_size=32,
            timm_kwargs=dict(patch_size=8, embed_dim=32, depth=2, num_heads=2),
        ),
        text_encoder=TextEncoderConfig(
            config=dict(
                hidden_size=32,
                num_hidden_layers=4,
                num_attention_heads=2,
                intermediate_size=64,
                max_position_embeddings=64,
                hidden_dropout_prob=0.0,
                attention_probs_dropout_prob=0.0,
            ),
            num_layers=2,
            max_length=16,
        ),
        fusion=FusionConfig(num_layers=2),
        embed_dim=16,
        queue_size=32,
    )


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
