"""Shared test helpers: a tiny model configuration and a launcher for multi-process gloo runs on loopback."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from vlp.model import FusionConfig, ImageEncoderConfig, ModelConfig, TextEncoderConfig

REPO_ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = REPO_ROOT / "configs"

# A 2-block ViT and a 2+2-layer BERT, 32 px images, no dropout: a training step takes tens of milliseconds.
TINY_MODEL = [
    "model.image_encoder.image_size=32",
    "model.image_encoder.timm_kwargs={patch_size: 8, embed_dim: 32, depth: 2, num_heads: 2}",
    "model.text_encoder.config.hidden_size=32",
    "model.text_encoder.config.num_attention_heads=2",
    "model.text_encoder.config.intermediate_size=64",
    "model.text_encoder.max_length=24",
    "model.embed_dim=16",
    "model.queue_size=64",
]
# Synthetic scenes read in the main process, one CSV logger, no progress bar, few retrieval candidates.
SMALL_RUN = [
    "data.image_size=32",
    "data.synthetic_image_size=32",
    "data.max_length=24",
    "data.batch_size=8",
    "data.eval_batch_size=16",
    "data.num_workers=0",
    "data.synthetic_train_size=64",
    "data.synthetic_eval_size=12",
    "logger=csv",
    "callbacks.progress_bar=none",
    "eval.k=4",
]


def compose_train(overrides: list[str]):
    """``configs/train.yaml`` composed with ``overrides`` through Hydra's compose API (no run directory)."""
    from hydra import compose, initialize_config_dir

    os.environ.setdefault("VLP_ROOT_DIR", str(REPO_ROOT))
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose(config_name="train", overrides=overrides)


def tiny_overrides(output_dir: Path, *extra: str) -> list[str]:
    """The overrides that shrink any experiment to the tiny model, small synthetic data and ``output_dir``."""
    return [*TINY_MODEL, *SMALL_RUN, f"paths.output_dir={output_dir}", *extra]


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
