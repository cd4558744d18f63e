"""Shared test helpers: a tiny model configuration and a launcher for multi-process gloo runs on loopback."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from vlp.model import FusionConfig, ImageEncoderConfig, ModelConfig, TextEncoderConfig


def tiny_model_config(**overrides) -> ModelConfig:
    """A ViT and a BERT of a few thousand parameters, no dropout, for CPU tests in seconds."""
    cfg = ModelConfig(
        image_encoder=ImageEncoderConfig(
            name="vit_tiny_patch16_224",
            image_size=32,
            timm_kwargs=dict(patch_size=8, embed_dim=32, depth=2, num_heads=2),
        ),
        text_encoder=TextEncoderConfig(
            config=dict(
                hidden_size=32,
                num_hidden_layers=3,
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
        queue_size=64,
    )
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return cfg


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _worker(rank: int, world: int, port: int, fn, out_dir: str, args) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.save(fn(rank, world, *args), Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def run_distributed(fn, world: int, out_dir: Path, *args) -> list:
    """Run ``fn(rank, world, *args)`` on ``world`` gloo processes; return each rank's return value."""
    mp.spawn(_worker, args=(world, free_port(), fn, str(out_dir), args), nprocs=world, join=True)
    return [torch.load(Path(out_dir) / f"rank{rank}.pt", weights_only=False) for rank in range(world)]
