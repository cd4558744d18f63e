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
from helpers import REPO_ROOT, compose_train, tiny_overrides  # noqa: F401  (shared with test modules)


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
