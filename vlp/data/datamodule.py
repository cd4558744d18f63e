"""One Lightning DataModule for every format, configured by :class:`~vlp.data.config.DataConfig`.

Training uses :class:`~vlp.data.sampler.ShardedSampler` (create the Trainer with ``use_distributed_sampler=False``);
validation and test iterate a :class:`~vlp.data.datasets.RetrievalDataset` of images in contiguous per-rank shards,
with the texts available as ``dm.val_dataset.texts`` (see :func:`~vlp.data.collate.tokenize_texts`).

Per-batch protocol (or add :class:`DataProgressCallback` to the Trainer, which does exactly this)::

    on_train_epoch_start:  dm.set_epoch(trainer.current_epoch)      # streams; samplers get it from Lightning
    on_train_batch_end:    dm.train_batch_done(batch)               # counts skips, advances the resume position
    on_train_epoch_end:    dm.train_epoch_done(label)               # logs the skip summary, returns it, resets

``dm.state_dict()`` (saved in Lightning checkpoints automatically) holds the sampler position and skip counts.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from vlp.data.annotations import check_image_root, load_albef_json, load_coco_captions, load_karpathy
from vlp.data.collate import EvalImageCollator, ImageTextCollator
from vlp.data.config import DataConfig
from vlp.data.datasets import (
    CaptionPicker,
    ImageTextDataset,
    RetrievalDataset,
    SyntheticPairs,
    TablePairs,
    retrieval_from_annotations,
    retrieval_from_synthetic,
)
from vlp.data.errors import DataSetupError
from vlp.data.hf import HFPairs, HFStream, group_codes, load_hf, prepare_columns, retrieval_from_hf
from vlp.data.images import ImageLimits
from vlp.data.sampler import IndexSampler, ShardedSampler, eval_shard_indices
from vlp.data.shards import ShardStream, expand_shards
from vlp.data.skips import SkipCounter
from vlp.data.synthetic import SyntheticScenes
from vlp.data.transforms import build_transform

log = logging.getLogger(__name__)


class VLPDataModule(L.LightningDataModule):
    """Builds train/val/test data for ``cfg.name`` and serves DataLoaders in the shared sample schema."""

    def __init__(
        self,
        cfg: DataConfig | Mapping[str, Any],
        tokenizer: Any,
        mean: Sequence[float],
        std: Sequence[float],
        rank: int | None = None,
        world_size: int | None = None,
    ) -> None:
        super().__init__()
        self.cfg = (cfg if isinstance(cfg, DataConfig) else DataConfig.from_mapping(cfg)).validate()
        self.tokenizer, self.mean, self.std = tokenizer, tuple(mean), tuple(std)
        # Explicit rank/world override the trainer / torch.distributed lookup (tests, custom launchers).
        self._rank, self._world = rank, world_size

        # Transforms and limits shared by all splits.
        c = self.cfg
        self.limits = ImageLimits(c.min_image_side, c.max_image_side, c.max_aspect_ratio)
        # augment=false trains on the evaluation transform: deterministic inputs, so frozen towers can be cached.
        self.train_transform = build_transform(
            c.augment, c.image_size, self.mean, self.std, c.crop_scale, c.hflip, c.randaugment, c.randaugment_config,
            c.randaugment_ops,
        )  # fmt: skip
        self.eval_transform = build_transform(False, c.image_size, self.mean, self.std)

        self.train_dataset: Dataset | None = None
        self.val_dataset: RetrievalDataset | None = None
        self.test_dataset: RetrievalDataset | None = None
        self.train_sampler: ShardedSampler | None = None
        self.skip_counter = SkipCounter()
        self._pending_sampler_state: dict[str, int] | None = None
        if c.name == "synthetic" and c.hflip:
            log.warning("data.hflip=true flips 'left of' into a false caption on synthetic data; set data.hflip=false")
        # Fast tokenizers warn (and may deadlock) when used both before and after forking workers.
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    # -----------------------------------------------------------------------------------------------------------
    # Setup

    def setup(self, stage: str | None = None) -> None:
        """Build the datasets the stage needs (idempotent). Structural input errors raise here."""
        if stage in (None, "fit") and self.train_dataset is None:
            self.train_dataset = self._build_train()
        if stage in (None, "fit", "validate") and self.val_dataset is None:
            self.val_dataset = self._build_eval("val")
        if stage in (None, "test") and self.test_dataset is None:
            self.test_dataset = self._build_eval("test")

    def rank_world(self) -> tuple[int, int]:
        """(rank, world size): explicit override, else the attached Trainer, else torch.distributed, else (0, 1)."""
        if self._rank is not None and self._world is not None:
            return self._rank, self._world
        if self.trainer is not None:
            return self.trainer.global_rank, self.trainer.world_size
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return torch.distributed.get_rank(), torch.distributed.get_world_size()
        return 0, 1

    def _build_train(self) -> Dataset:
        c = self.cfg
        picker_args = {"clean": c.clean, "max_words": c.max_words, "seed": c.seed}

        # Synthetic scenes, generated on the fly.
        if c.name == "synthetic":
            scenes = SyntheticScenes(
                c.seed, "train", c.synthetic_train_size, c.synthetic_image_size, family_size=c.synthetic_family_size
            )
            return ImageTextDataset(
                SyntheticPairs(scenes, c.synthetic_captions_per_image), self.train_transform, **picker_args
            )

        # Streams: shards or streaming Hugging Face data.
        rank, world = self.rank_world()
        if c.name == "webdataset":
            urls = expand_shards(c.shards, c.root)
            return ShardStream(
                urls, self.train_transform, CaptionPicker(**picker_args), self.limits, rank, world, c.resampled,
                c.epoch_size, c.shuffle_buffer, c.caption_column, c.image_id_column,
            )  # fmt: skip
        if c.name == "hf":
            return self._build_hf_train(picker_args, rank, world)

        # Annotation files.
        path = self._require_file("train_file", "fit")
        ann = self._load_annotations(path, "data.train_file", "train")
        image_root = c.path(c.image_root)
        check_image_root(
            ann.images, image_root, path, "data.image_root", c.image_check_samples, c.max_missing_fraction, c.seed
        )
        return ImageTextDataset(TablePairs(ann, image_root, self.limits), self.train_transform, **picker_args)

    def _build_hf_train(self, picker_args: dict[str, Any], rank: int, world: int) -> Dataset:
        c = self.cfg
        path = self._require_file("train_file", "fit")
        ds = prepare_columns(
            load_hf(path, "data.train_file", c.hf_builder, c.hf_cache_dir, c.streaming), "data.train_file", path,
            self._hf_columns(),
        )  # fmt: skip
        image_root = c.path(c.image_root)
        if c.streaming:
            columns = (c.image_column, c.caption_column, c.image_id_column)
            return HFStream(
                ds, self.train_transform, CaptionPicker(**picker_args), columns, image_root, self.limits, rank,
                world, c.epoch_size, c.shuffle_buffer,
            )  # fmt: skip
        ids = group_codes(ds, c.image_id_column) if c.image_id_column else None
        source = HFPairs(ds, c.image_column, c.caption_column, ids, image_root, self.limits)
        return ImageTextDataset(source, self.train_transform, **picker_args)

    def _build_eval(self, split: str) -> RetrievalDataset | None:
        c = self.cfg
        args = (self.eval_transform, c.clean, c.max_words)

        # Synthetic: a separate, unique-scene split.
        if c.name == "synthetic":
            scenes = SyntheticScenes(c.seed, split, c.synthetic_eval_size, c.synthetic_image_size)
            return retrieval_from_synthetic(scenes, c.synthetic_captions_per_image, *args)

        # Which file and image root; Karpathy keeps every split in one file.
        file_key = f"{split}_file"
        path = c.path(getattr(c, file_key))
        if c.name == "karpathy" and path is None:
            path, file_key = c.path(c.train_file), "train_file"
        if path is None:
            log.info("no data.%s: the %s loader is disabled", file_key, split)
            return None
        image_root = c.path(getattr(c, f"{split}_image_root") or c.image_root)

        # Hugging Face evaluation tables (always map-style).
        if c.name == "hf":
            ds = prepare_columns(
                load_hf(path, f"data.{file_key}", c.hf_builder, c.hf_cache_dir), f"data.{file_key}", path,
                self._hf_columns(),
            )  # fmt: skip
            return retrieval_from_hf(
                ds, c.image_column, c.caption_column, c.image_id_column, image_root, *args, self.limits
            )

        # Annotation files (webdataset runs evaluate on ALBEF-style JSON lists).
        ann = self._load_annotations(path, f"data.{file_key}", split)
        root_key = f"data.{split}_image_root" if getattr(c, f"{split}_image_root") else "data.image_root"
        self._check_eval_images(ann.images, image_root, path, root_key)
        return retrieval_from_annotations(ann, image_root, *args, self.limits)

    def _load_annotations(self, path: str, key: str, split: str):
        c = self.cfg
        if c.name in ("json", "webdataset"):
            return load_albef_json(path, key)
        # Evaluation always lists every caption; the train unit only shapes training samples.
        unit = c.train_unit if split == "train" else "caption"
        if c.name == "coco":
            return load_coco_captions(path, key, unit)
        splits = c.train_splits if split == "train" else [c.val_split if split == "val" else c.test_split]
        return load_karpathy(path, key, splits, unit)

    def _check_eval_images(self, paths: Any, image_root: str, source: str, key: str) -> None:
        """Every evaluation image is checked, not a sample: a missing one would silently change recall."""
        missing = check_image_root(
            paths, image_root, source, key, samples=len(paths), max_missing=self.cfg.max_missing_fraction
        )
        if missing and self.cfg.eval_missing_images == "error":
            raise DataSetupError(
                f"{key}: {len(missing)} evaluation images listed in {source} are missing, e.g. {missing[:3]} "
                "(data.eval_missing_images=error)"
            )
        if missing:
            log.warning(
                "%d evaluation images of %s are missing; they are scored from a blank image, e.g. %s",
                len(missing), source, missing[:3],
            )  # fmt: skip

    def _require_file(self, key: str, stage: str) -> str:
        value = getattr(self.cfg, key)
        if value is None:
            raise DataSetupError(f"data.{key} must be set for stage '{stage}' with data.name={self.cfg.name}")
        return self.cfg.path(value)

    def _hf_columns(self) -> dict[str, str | None]:
        c = self.cfg
        return {
            "data.image_column": c.image_column,
            "data.caption_column": c.caption_column,
            "data.image_id_column": c.image_id_column,
        }

    # -----------------------------------------------------------------------------------------------------------
    # Loaders

    def _train_group_size(self) -> int:
        """Indices the sampler keeps together in one batch: a synthetic scene family, else single samples."""
        return self.cfg.synthetic_family_size if self.cfg.name == "synthetic" else 1

    def train_dataloader(self) -> DataLoader:
        if self.train_dataset is None:
            self.setup("fit")
        c = self.cfg
        collate = ImageTextCollator(self.tokenizer, c.max_length, c.image_size)

        # Streams shard themselves across ranks and workers.
        if not isinstance(self.train_dataset, ImageTextDataset):
            return DataLoader(self.train_dataset, batch_size=c.batch_size, collate_fn=collate, **self._loader_args())

        # Map-style: sampler shards across ranks; its epoch also re-draws per-epoch captions. A rebuilt loader
        # (reload_dataloaders_every_n_epochs) keeps the previous sampler's position.
        rank, world = self.rank_world()
        if self._pending_sampler_state is None and self.train_sampler is not None:
            self._pending_sampler_state = self.train_sampler.state_dict()
        self.train_sampler = ShardedSampler(
            len(self.train_dataset), world, rank, shuffle=True, seed=c.seed, batch_size=c.batch_size,
            on_epoch=self.train_dataset.set_epoch, group_size=self._train_group_size(),
        )  # fmt: skip
        if self._pending_sampler_state is not None:
            self.train_sampler.load_state_dict(self._pending_sampler_state)
            self._pending_sampler_state = None
        return DataLoader(
            self.train_dataset, batch_size=c.batch_size, sampler=self.train_sampler, collate_fn=collate,
            drop_last=False, **self._loader_args(),
        )  # fmt: skip

    def val_dataloader(self) -> DataLoader | list:
        if self.val_dataset is None:
            self.setup("validate")
        return self._eval_loader(self.val_dataset)

    def test_dataloader(self) -> DataLoader | list:
        if self.test_dataset is None:
            self.setup("test")
        return self._eval_loader(self.test_dataset)

    def _eval_loader(self, dataset: RetrievalDataset | None) -> DataLoader | list:
        # No evaluation file configured: Lightning accepts an empty list and skips the loop.
        if dataset is None:
            return []
        rank, world = self.rank_world()
        sampler = IndexSampler(eval_shard_indices(len(dataset), world, rank))
        return DataLoader(
            dataset, batch_size=self.cfg.eval_batch_size, sampler=sampler,
            collate_fn=EvalImageCollator(self.cfg.image_size), **self._loader_args(),
        )  # fmt: skip

    def _loader_args(self) -> dict[str, Any]:
        c = self.cfg
        pin = torch.cuda.is_available() if c.pin_memory is None else c.pin_memory
        return {
            "num_workers": c.num_workers,
            "pin_memory": pin,
            "persistent_workers": c.persistent_workers and c.num_workers > 0,
        }

    # -----------------------------------------------------------------------------------------------------------
    # Epoch / batch bookkeeping and checkpoint state

    def set_epoch(self, epoch: int) -> None:
        """Forward the epoch to streaming datasets (map-style data gets it through the sampler)."""
        dataset = self.train_dataset
        if dataset is not None and hasattr(dataset, "set_epoch"):
            dataset.set_epoch(epoch)
        if self.train_sampler is not None:
            self.train_sampler.set_epoch(epoch)

    def train_batch_done(self, batch: Mapping[str, Any]) -> None:
        """Call once per trained batch: counts its skipped samples and advances the resume position."""
        self.skip_counter.update(batch["skipped"])
        if self.train_sampler is not None:
            self.train_sampler.advance(int(batch["raw_size"]))

    def train_epoch_done(self, label: str = "train epoch") -> dict[str, Any]:
        """Log and return the epoch's skip summary, then reset the counter."""
        summary = self.skip_counter.log_summary(label)
        self.skip_counter.reset()
        return summary

    def skip_stats(self) -> dict[str, Any]:
        """Skip summary so far this epoch (see :meth:`SkipCounter.summary`)."""
        return self.skip_counter.summary()

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"skip_counter": self.skip_counter.state_dict()}
        if self.train_sampler is not None:
            state["sampler"] = self.train_sampler.state_dict()
        elif self._pending_sampler_state is not None:
            state["sampler"] = dict(self._pending_sampler_state)
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "skip_counter" in state:
            self.skip_counter.load_state_dict(state["skip_counter"])
        if "sampler" not in state:
            return
        # Lightning restores before it asks for the train loader: keep the state until the sampler exists.
        if self.train_sampler is not None:
            self.train_sampler.load_state_dict(state["sampler"])
        else:
            self._pending_sampler_state = dict(state["sampler"])


class DataProgressCallback(L.Callback):
    """Wires :class:`VLPDataModule` bookkeeping into a Trainer (epoch, skips, resume position)."""

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if isinstance(trainer.datamodule, VLPDataModule):
            trainer.datamodule.set_epoch(trainer.current_epoch)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # noqa: ANN001
        if isinstance(trainer.datamodule, VLPDataModule):
            trainer.datamodule.train_batch_done(batch)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if isinstance(trainer.datamodule, VLPDataModule):
            summary = trainer.datamodule.train_epoch_done(f"train epoch {trainer.current_epoch}")
            pl_module.log("data/skipped", float(summary["skipped"]), sync_dist=True, reduce_fx="sum")
