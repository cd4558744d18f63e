"""DataConfig validation and the configs/data YAML files."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from vlp.data.config import DataConfig

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs" / "data"


def test_defaults_validate_and_describe_synthetic():
    cfg = DataConfig().validate()
    assert cfg.name == "synthetic"
    assert cfg.crop_scale == (0.2, 1.0)
    assert cfg.clean == "albef"


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        ({"clean": "fancy"}, "data.clean"),
        ({"name": "csv"}, "data.name"),
        ({"crop_scale": (0.7, 0.2)}, "data.crop_scale"),
        ({"crop_scale": (0.0, 1.0)}, "data.crop_scale"),
        ({"batch_size": 0}, "data.batch_size"),
        ({"num_workers": -1}, "data.num_workers"),
        ({"max_words": 0}, "data.max_words"),
        ({"synthetic_captions_per_image": 9}, "data.synthetic_captions_per_image"),
        ({"synthetic_family_size": 3}, "data.synthetic_family_size"),  # does not divide batch_size 32
        ({"name": "json"}, "data.train_file"),
        ({"name": "webdataset"}, "data.shards"),
        ({"name": "webdataset", "shards": "x.tar", "resampled": True}, "data.epoch_size"),
        ({"streaming": True}, "data.streaming"),
        ({"train_unit": "row"}, "data.train_unit"),
        ({"eval_missing_images": "ignore"}, "data.eval_missing_images"),
        ({"max_missing_fraction": 1.5}, "data.max_missing_fraction"),
        ({"max_image_side": 100}, "data.max_image_side"),
    ],
)
def test_invalid_values_name_the_key(overrides, key):
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        DataConfig(**overrides).validate()


def test_from_mapping_rejects_unknown_keys_and_converts_lists():
    cfg = DataConfig.from_mapping({"crop_scale": [0.5, 1.0], "train_splits": ("train",)})
    assert cfg.crop_scale == (0.5, 1.0)
    assert cfg.train_splits == ["train"]
    with pytest.raises(ValueError, match="batchsize"):
        DataConfig.from_mapping({"batchsize": 4})


def test_paths_resolve_against_root(tmp_path):
    cfg = DataConfig(root=str(tmp_path))
    assert cfg.path("ann/a.json") == str(tmp_path / "ann" / "a.json")
    assert cfg.path("/abs/a.json") == "/abs/a.json"
    assert cfg.path(None) is None


YAMLS = sorted(CONFIG_DIR.glob("*.yaml"))


def test_expected_yaml_files_exist():
    names = {p.stem for p in YAMLS}
    assert {"synthetic", "flickr8k", "flickr8k_mini", "coco", "coco_karpathy", "webdataset"} <= names


@pytest.mark.parametrize("path", YAMLS, ids=[p.stem for p in YAMLS])
def test_yaml_keys_match_dataclass_and_validate(path):
    raw = OmegaConf.load(path)
    fields = [f.name for f in dataclasses.fields(DataConfig)]
    assert list(raw.keys()) == fields

    # Composed the way the lead will: under `data`, next to `paths.data_root`, merged onto the structured schema.
    root = OmegaConf.create({"paths": {"data_root": "/data"}})
    root.data = OmegaConf.merge(OmegaConf.structured(DataConfig), raw)
    cfg = DataConfig.from_mapping(root.data).validate()
    assert "${" not in cfg.root
    if cfg.name != "synthetic":
        assert cfg.root.startswith("/data")


def test_synthetic_yaml_keeps_spatial_captions_true():
    cfg = DataConfig.from_mapping(OmegaConf.load(CONFIG_DIR / "synthetic.yaml"))
    # Flips and RandAugment would turn "left of" into a false caption.
    assert cfg.hflip is False
    assert cfg.randaugment is False
    assert cfg.crop_scale[0] >= 0.8
