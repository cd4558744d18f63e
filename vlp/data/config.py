"""Typed configuration of the data layer (the Hydra ``data`` group).

Every YAML file in ``configs/data/`` has exactly the keys of :class:`DataConfig`. The lead composes it under
``data`` and builds the dataclass with :meth:`DataConfig.from_mapping`; :meth:`DataConfig.validate` checks
values and names the key to change in every message.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

FORMATS = ("synthetic", "json", "coco", "karpathy", "hf", "webdataset")
CLEAN_RULES = ("albef", "blip", "none")
TRAIN_UNITS = ("caption", "image")
EVAL_MISSING_POLICIES = ("warn", "error")
HF_BUILDERS = ("parquet", "arrow", "imagefolder", "json", "csv", "disk")

# RandAugment ops that keep colour words true: Invert, Solarize, Posterize and Color change hues, which would turn
# "a red circle" into a false caption, so the default list leaves them out (BLIP makes the same choice).
DEFAULT_RANDAUGMENT_OPS = (
    "AutoContrast",
    "Equalize",
    "Brightness",
    "Sharpness",
    "Contrast",
    "ShearX",
    "ShearY",
    "TranslateXRel",
    "TranslateYRel",
    "Rotate",
)


@dataclass
class DataConfig:
    """All data settings. Paths are relative to ``root`` unless absolute."""

    # Which loader to use and where the files are.
    name: str = "synthetic"
    root: str = "."
    train_file: str | None = None
    val_file: str | None = None
    test_file: str | None = None
    image_root: str = "."
    val_image_root: str | None = None
    test_image_root: str | None = None

    # Karpathy files hold every split in one file; these pick the split names.
    train_splits: list[str] = field(default_factory=lambda: ["train", "restval"])
    val_split: str = "val"
    test_split: str = "test"
    # coco/karpathy training: one sample per caption (ALBEF) or per image with a caption drawn each epoch.
    train_unit: str = "caption"

    # Loader sizes.
    image_size: int = 224
    batch_size: int = 32
    eval_batch_size: int = 64
    num_workers: int = 2
    persistent_workers: bool = True
    pin_memory: bool | None = None

    # Text: words kept by cleaning, then tokens kept by the collator (the text tower's limit).
    max_words: int = 30
    max_length: int = 40
    clean: str = "albef"

    # Augmentation (training only; evaluation is a plain resize). augment=false trains on the plain resize too.
    augment: bool = True
    crop_scale: tuple[float, float] = (0.2, 1.0)
    hflip: bool = True
    randaugment: bool = True
    randaugment_config: str = "rand-m9-n2-mstd0.5"
    randaugment_ops: list[str] = field(default_factory=lambda: list(DEFAULT_RANDAUGMENT_OPS))

    # Synthetic compositional data.
    synthetic_train_size: int = 10000
    synthetic_eval_size: int = 500
    synthetic_captions_per_image: int = 5
    synthetic_image_size: int = 64
    # Training scenes in families of this many (a scene and its one-attribute swaps), each family in one batch:
    # compositional hard negatives for ITC and ITM in every batch. 1: independent scenes.
    synthetic_family_size: int = 1
    seed: int = 0

    # Hugging Face datasets and webdataset shards.
    hf_builder: str | None = None
    hf_cache_dir: str | None = None
    image_column: str = "image"
    caption_column: str = "caption"
    image_id_column: str | None = None
    streaming: bool = False
    shuffle_buffer: int = 1000
    shards: str = ""
    resampled: bool = False
    epoch_size: int | None = None

    # Bad-input policy.
    min_image_side: int = 8
    max_image_side: int = 4096
    max_aspect_ratio: float = 20.0
    image_check_samples: int = 100
    max_missing_fraction: float = 0.5
    eval_missing_images: str = "warn"

    def __post_init__(self) -> None:
        # YAML and OmegaConf hand over lists; the dataclass promises a tuple.
        if not isinstance(self.crop_scale, tuple):
            self.crop_scale = tuple(float(v) for v in self.crop_scale)
        self.train_splits = list(self.train_splits)
        self.randaugment_ops = list(self.randaugment_ops)

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, Any] | Any) -> DataConfig:
        """Build from a dict or an OmegaConf node, rejecting unknown keys by name."""
        # OmegaConf nodes are resolved first so ${paths.data_root} becomes a real path.
        if not isinstance(mapping, Mapping) or type(mapping).__module__.startswith("omegaconf"):
            from omegaconf import OmegaConf

            mapping = OmegaConf.to_container(mapping, resolve=True)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(mapping) - known)
        if unknown:
            raise ValueError(
                f"unknown data config key(s) {unknown}; valid keys are data.{', data.'.join(sorted(known))}"
            )
        return cls(**mapping)

    def path(self, value: str | None, base: str | None = None) -> str | None:
        """Resolve a config path against ``root`` (or ``base``); absolute paths are kept."""
        if value is None:
            return None
        return os.path.normpath(os.path.join(base if base is not None else self.root, os.path.expanduser(value)))

    def validate(self) -> DataConfig:
        """Check every value; raises ValueError naming the key to change. Returns self for chaining."""
        # Choices.
        _choice("data.name", self.name, FORMATS)
        _choice("data.clean", self.clean, CLEAN_RULES)
        _choice("data.train_unit", self.train_unit, TRAIN_UNITS)
        _choice("data.eval_missing_images", self.eval_missing_images, EVAL_MISSING_POLICIES)
        if self.hf_builder is not None:
            _choice("data.hf_builder", self.hf_builder, HF_BUILDERS)

        # Sizes and counts.
        for key in ("image_size", "batch_size", "eval_batch_size", "max_words", "max_length", "synthetic_image_size"):
            _positive(f"data.{key}", getattr(self, key))
        for key in ("synthetic_train_size", "synthetic_eval_size", "shuffle_buffer", "image_check_samples"):
            _positive(f"data.{key}", getattr(self, key), allow_zero=True)
        if not isinstance(self.num_workers, int) or self.num_workers < 0:
            raise ValueError(f"data.num_workers must be an integer >= 0 (got {self.num_workers!r})")
        from vlp.data.synthetic import MAX_FAMILY_SIZE, TEMPLATES

        if not 1 <= self.synthetic_family_size <= MAX_FAMILY_SIZE or self.batch_size % self.synthetic_family_size:
            raise ValueError(
                f"data.synthetic_family_size must be between 1 and {MAX_FAMILY_SIZE} and divide data.batch_size="
                f"{self.batch_size} (got {self.synthetic_family_size})"
            )

        if not 1 <= self.synthetic_captions_per_image <= len(TEMPLATES):
            raise ValueError(
                f"data.synthetic_captions_per_image must be between 1 and {len(TEMPLATES)} "
                f"(got {self.synthetic_captions_per_image})"
            )

        # Augmentation ranges.
        if len(self.crop_scale) != 2 or not 0.0 < self.crop_scale[0] <= self.crop_scale[1] <= 1.0:
            raise ValueError(f"data.crop_scale must be [low, high] with 0 < low <= high <= 1 (got {self.crop_scale})")
        if self.randaugment and not self.randaugment_config.startswith("rand"):
            raise ValueError(
                f"data.randaugment_config must be a timm RandAugment string such as 'rand-m9-n2-mstd0.5' "
                f"(got {self.randaugment_config!r})"
            )

        # Bad-input limits.
        _positive("data.min_image_side", self.min_image_side)
        if self.max_image_side < max(self.min_image_side, self.image_size):
            raise ValueError(
                f"data.max_image_side must be >= data.image_size and data.min_image_side (got {self.max_image_side})"
            )
        if self.max_aspect_ratio < 1.0:
            raise ValueError(f"data.max_aspect_ratio must be >= 1 (got {self.max_aspect_ratio})")
        if not 0.0 <= self.max_missing_fraction <= 1.0:
            raise ValueError(f"data.max_missing_fraction must be in [0, 1] (got {self.max_missing_fraction})")

        # Format-specific requirements.
        self._validate_format()
        return self

    def _validate_format(self) -> None:
        """Requirements that only apply to one loader."""
        if self.name in ("json", "coco", "karpathy", "hf") and not any(
            (self.train_file, self.val_file, self.test_file)
        ):
            raise ValueError(
                f"data.train_file (or data.val_file / data.test_file) must be set for data.name={self.name}"
            )
        if self.name == "webdataset" and not self.shards:
            raise ValueError("data.shards must name the tar shards (e.g. 'shards/{00000..00099}.tar') for webdataset")
        if self.resampled and self.name != "webdataset":
            raise ValueError("data.resampled only applies to data.name=webdataset")
        if self.resampled and not self.epoch_size:
            raise ValueError("data.epoch_size is required when data.resampled is true (resampling never ends)")
        if self.epoch_size is not None and self.epoch_size <= 0:
            raise ValueError(f"data.epoch_size must be a positive integer or null (got {self.epoch_size})")
        if self.streaming and self.name != "hf":
            raise ValueError("data.streaming only applies to data.name=hf (webdataset always streams)")
        if self.name == "karpathy" and not self.train_splits:
            raise ValueError("data.train_splits must list at least one Karpathy split name (e.g. ['train', 'restval'])")


def _choice(key: str, value: Any, options: tuple[str, ...]) -> None:
    if value not in options:
        raise ValueError(f"{key} must be one of {', '.join(repr(o) for o in options)} (got {value!r})")


def _positive(key: str, value: Any, allow_zero: bool = False) -> None:
    low = 0 if allow_zero else 1
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise ValueError(f"{key} must be an integer >= {low} (got {value!r})")
