"""Image transforms: shapes, caller-provided normalisation, augmentation switches."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from PIL import Image

from vlp.data.transforms import build_transform


def _gradient(width=96, height=64) -> Image.Image:
    # Left half dark, right half bright: a flip is visible in the mean of each half.
    arr = np.zeros((height, width, 3), dtype=np.uint8)
    arr[:, width // 2 :] = 250
    return Image.fromarray(arr)


def test_eval_transform_resizes_and_uses_given_mean_std(util):
    t = build_transform(False, 48, util.MEAN, util.STD)
    out = t(Image.new("RGB", (100, 30), (255, 0, 128)))
    assert out.shape == (3, 48, 48) and out.dtype == torch.float32
    expected = (np.array([255, 0, 128]) / 255.0 - np.array(util.MEAN)) / np.array(util.STD)
    assert np.allclose(out.mean(dim=(1, 2)).numpy(), expected, atol=0.02)


def test_eval_transform_is_deterministic(util):
    t = build_transform(False, 32, util.MEAN, util.STD)
    img = _gradient()
    assert torch.equal(t(img), t(img))


def test_train_transform_output_shape_with_all_augmentations(util):
    t = build_transform(True, 40, util.MEAN, util.STD, crop_scale=(0.2, 1.0), hflip=True, randaugment=True)
    torch.manual_seed(0)
    outs = [t(_gradient()) for _ in range(4)]
    assert all(o.shape == (3, 40, 40) for o in outs)
    assert not all(torch.equal(outs[0], o) for o in outs[1:])  # random crops differ


def test_hflip_off_never_flips(util):
    # Full-image crop (scale 1, ratio ~1 from a square image) so only a flip could move the bright half.
    t = build_transform(True, 32, util.MEAN, util.STD, crop_scale=(1.0, 1.0), hflip=False, randaugment=False)
    square = _gradient(64, 64)
    for seed in range(8):
        torch.manual_seed(seed)
        out = t(square)
        assert out[:, :, :16].mean() < out[:, :, 16:].mean()


def test_hflip_on_flips_sometimes(util):
    t = build_transform(True, 32, util.MEAN, util.STD, crop_scale=(1.0, 1.0), hflip=True, randaugment=False)
    square = _gradient(64, 64)
    results = []
    for seed in range(16):
        torch.manual_seed(seed)
        out = t(square)
        results.append(bool(out[:, :, :16].mean() > out[:, :, 16:].mean()))
    assert any(results) and not all(results)


def test_randaugment_changes_pixels_when_on(util):
    base = build_transform(True, 32, util.MEAN, util.STD, crop_scale=(1.0, 1.0), hflip=False, randaugment=False)
    aug = build_transform(
        True, 32, util.MEAN, util.STD, crop_scale=(1.0, 1.0), hflip=False, randaugment=True,
        randaugment_config="rand-m9-n3-mstd0",
    )  # fmt: skip
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    torch.manual_seed(0)
    reference = base(img)
    random.seed(0)  # timm's RandAugment draws from Python's RNG
    assert sum(not torch.allclose(aug(img), reference) for _ in range(20)) >= 10


@pytest.mark.parametrize(
    ("mean", "std"), [((124.0, 116.0, 104.0), (58.0, 57.0, 57.0)), ((0.5, 0.5), (0.2, 0.2)), ((0.5,) * 3, (0.0,) * 3)]
)
def test_bad_statistics_are_rejected(mean, std):
    with pytest.raises(ValueError, match="mean"):
        build_transform(False, 32, mean, std)
