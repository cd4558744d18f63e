"""Shared fixtures: the real Hydra configs composed and shrunk to a few-second CPU run.

Tests compose ``configs/train.yaml`` exactly as ``train.py`` does, then override it down to a model of a few
hundred thousand parameters, a few dozen synthetic samples and CSV logging into the test's temporary
directory. Nothing touches the network: the tiny towers are random and use the built-in tokenizer.
"""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

import pytest

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


@pytest.fixture
def compose():
    return compose_train


@pytest.fixture
def tiny(tmp_path):
    """``tiny(*extra)``: overrides for a tiny CPU run writing into this test's temporary directory."""

    def make(*extra: str, output_dir: Path | None = None) -> list[str]:
        return tiny_overrides(output_dir or tmp_path / "run", *extra)

    return make


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def train_subprocess_env(**extra: str) -> dict[str, str]:
    """Environment for ``train.py`` in a subprocess: loopback rendezvous, no wandb network, one thread each."""
    env = dict(os.environ)
    env.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(free_port()),
        WANDB_MODE="offline",
        OMP_NUM_THREADS="1",
        VLP_ROOT_DIR=str(REPO_ROOT),
        PYTHONUNBUFFERED="1",
    )
    env.update(extra)
    return env


def train_command(*overrides: str) -> list[str]:
    return [sys.executable, str(REPO_ROOT / "train.py"), *overrides]


@pytest.fixture
def subprocess_env():
    """``subprocess_env(**extra)``: see :func:`train_subprocess_env`."""
    return train_subprocess_env


@pytest.fixture
def train_cmd():
    """``train_cmd(*overrides)``: the command line running ``train.py`` with this interpreter."""
    return train_command
