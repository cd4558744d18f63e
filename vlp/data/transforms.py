"""Image transforms built from torchvision and timm pieces.

Mean and std are not hard-coded: the caller passes the image encoder's own normalisation (timm
``model.pretrained_cfg["mean"]`` / ``["std"]``), so the pixels match what the pretrained tower expects.
"""

from __future__ import annotations

from collections.abc import Sequence

from timm.data.auto_augment import rand_augment_transform
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode

from vlp.data.config import DEFAULT_RANDAUGMENT_OPS


def build_transform(
    train: bool,
    image_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    crop_scale: tuple[float, float] = (0.2, 1.0),
    hflip: bool = True,
    randaugment: bool = True,
    randaugment_config: str = "rand-m9-n2-mstd0.5",
    randaugment_ops: Sequence[str] = DEFAULT_RANDAUGMENT_OPS,
) -> T.Compose:
    """PIL RGB image -> normalised FloatTensor (3, image_size, image_size).

    Training: RandomResizedCrop(crop_scale) [+ horizontal flip] [+ timm RandAugment]. Evaluation: a plain square
    resize, as ALBEF and BLIP evaluate.
    """
    _check_stats(mean, std)
    to_tensor = [T.ToTensor(), T.Normalize(mean=list(mean), std=list(std))]

    # Evaluation: deterministic square resize, no crop, so every image is seen whole.
    if not train:
        return T.Compose([T.Resize((image_size, image_size), interpolation=InterpolationMode.BICUBIC), *to_tensor])

    # Training: crop first so RandAugment works at the final resolution (cheaper, and translate is in pixels).
    steps: list = [T.RandomResizedCrop(image_size, scale=tuple(crop_scale), interpolation=InterpolationMode.BICUBIC)]
    if hflip:
        steps.append(T.RandomHorizontalFlip())
    if randaugment:
        # timm fills areas uncovered by shear/rotate with this colour; the dataset mean keeps them neutral.
        fill = tuple(round(255 * m) for m in mean)
        steps.append(rand_augment_transform(randaugment_config, {"img_mean": fill}, transforms=list(randaugment_ops)))
    return T.Compose([*steps, *to_tensor])


def _check_stats(mean: Sequence[float], std: Sequence[float]) -> None:
    """Catch swapped or 0-255 statistics early: they silently ruin a pretrained tower."""
    if len(mean) != 3 or len(std) != 3:
        raise ValueError(f"mean and std need 3 values (RGB), got mean={tuple(mean)} std={tuple(std)}")
    if not all(0.0 <= m <= 1.0 for m in mean) or not all(0.0 < s <= 1.0 for s in std):
        raise ValueError(
            f"mean/std must be on the 0-1 scale as in timm pretrained_cfg (got mean={tuple(mean)} std={tuple(std)})"
        )
