"""Checkpoint files: atomic writes, finding the checkpoint to resume from, and the run's metadata files."""

from __future__ import annotations

import logging
import os
import subprocess
from pathlib import Path
from typing import Any

import torch
import yaml
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.plugins.io import TorchCheckpointIO

log = logging.getLogger(__name__)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes a local checkpoint to ``<path>.tmp`` then renames it over ``<path>``.

    A run killed mid-write leaves the previous checkpoint intact and at most a stray ``.tmp``; a reader never
    sees a truncated file (``os.replace`` is atomic within a file system). Remote paths (``s3://``...) go
    through Lightning's own writer. Loading uses ``weights_only=True``: a checkpoint holds tensors and plain
    containers only.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any = None) -> None:
        if storage_options is not None:
            raise TypeError("AtomicCheckpointIO takes no storage_options")
        if not _is_local(path):
            super().save_checkpoint(checkpoint, path)
            return
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")

        # fsync before the rename, so that a power loss cannot leave a renamed but empty file.
        with open(tmp, "wb") as f:
            torch.save(checkpoint, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)

    def load_checkpoint(self, path: str | Path, map_location: Any = None, weights_only: bool | None = None) -> dict:
        return super().load_checkpoint(path, map_location=map_location, weights_only=True)


def _is_local(path: str | Path) -> bool:
    return get_filesystem(str(path)).protocol in ("file", ("file", "local"))


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """A checkpoint's contents on CPU, loaded with ``weights_only=True``."""
    return torch.load(path, map_location="cpu", weights_only=True)


def resume_path(ckpt: str | None, resume: bool, checkpoint_dir: Path, output_dir: Path | None = None) -> str | None:
    """``ckpt`` when given; with ``resume=true`` the newest of last.ckpt and Lightning's SLURM requeue checkpoints
    (``<output_dir>/hpc_ckpt_*.ckpt``, written on the pre-emption signal), or None for a fresh start."""
    if ckpt is not None:
        if not _is_local(ckpt) or Path(ckpt).is_file():
            return ckpt
        raise FileNotFoundError(f"ckpt={ckpt} does not exist")
    if not resume:
        return None
    candidates = [checkpoint_dir / "last.ckpt"]
    if output_dir is not None:
        candidates += sorted(output_dir.glob("hpc_ckpt_*.ckpt"))
    existing = [path for path in candidates if path.is_file()]
    if not existing:
        log.info("resume=true but %s does not exist yet: starting from scratch", candidates[0])
        return None
    newest = max(existing, key=lambda path: path.stat().st_mtime_ns)
    log.info("resume=true: continuing from %s", newest)
    return str(newest)


def git_commit(repo_dir: str | Path) -> str:
    """The commit checked out in ``repo_dir`` (with ``-dirty`` for local changes), or "unknown"."""
    try:
        run = dict(cwd=repo_dir, capture_output=True, text=True, timeout=10, check=True)
        commit = subprocess.run(["git", "rev-parse", "HEAD"], **run).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], **run).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return commit + ("-dirty" if dirty else "")


def write_run_metadata(output_dir: Path, cfg: dict[str, Any], repo_dir: str | Path) -> None:
    """``config.yaml`` (the resolved, validated config) and ``git_commit.txt`` in the run directory."""
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    (output_dir / "git_commit.txt").write_text(git_commit(repo_dir) + "\n")
