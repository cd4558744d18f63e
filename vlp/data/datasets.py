"""The two map-style datasets every format feeds: training pairs and retrieval evaluation.

Sample schema (the same for every format):

* training item: ``dict(image=FloatTensor(3, H, W), caption=str, image_id=int >= 0, index=int)``
* skipped item: ``dict(skipped=True, index, path, reason)``; padding item: ``dict(pad=True, index)``
* retrieval item (one per image): ``dict(image=FloatTensor(3, H, W), index=i, image_id=int)`` or a skipped item.

A format plugs in through a small *source* object (annotation table, Hugging Face table, synthetic scenes) that
answers: how many items, the raw captions of item i, the PIL image of item i, its image_id and a printable path.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from vlp.data.annotations import Annotations
from vlp.data.captions import clean_caption
from vlp.data.errors import BadSample, pad_item, skipped_item
from vlp.data.images import ImageLimits, load_image
from vlp.data.storage import StringTable
from vlp.data.synthetic import SyntheticScenes

log = logging.getLogger(__name__)


class PairSource(Protocol):
    """What a training dataset needs from a format."""

    def __len__(self) -> int: ...
    def captions(self, i: int) -> list[str]: ...  # raw usable captions; raises BadSample
    def image(self, i: int) -> Image.Image: ...  # RGB; raises BadSample
    def image_id(self, i: int) -> int: ...
    def describe(self, i: int) -> str: ...  # path (or pseudo-path) for logs


class ImageSource(Protocol):
    """What a retrieval dataset needs from a format (one item per image)."""

    def __len__(self) -> int: ...
    def image(self, i: int) -> Image.Image: ...
    def image_id(self, i: int) -> int: ...
    def describe(self, i: int) -> str: ...


# ---------------------------------------------------------------------------------------------------------------
# Sources


class TablePairs:
    """Training pairs from an :class:`Annotations` table; images are files under ``image_root``."""

    def __init__(self, ann: Annotations, image_root: str, limits: ImageLimits) -> None:
        self.ann, self.image_root, self.limits = ann, image_root, limits

    def __len__(self) -> int:
        return len(self.ann)

    def captions(self, i: int) -> list[str]:
        return self.ann.entry_captions(i)

    def image(self, i: int) -> Image.Image:
        return load_image(self.describe(i), self.limits)

    def image_id(self, i: int) -> int:
        return int(self.ann.entry_image[i])

    def describe(self, i: int) -> str:
        return os.path.join(self.image_root, self.ann.images[int(self.ann.entry_image[i])])


class FileImages:
    """Retrieval images stored as files: ``paths[i]`` under ``image_root``, image_id ``ids[i]``."""

    def __init__(self, paths: StringTable, ids: np.ndarray, image_root: str, limits: ImageLimits) -> None:
        self.paths, self.ids, self.image_root, self.limits = paths, ids, image_root, limits

    def __len__(self) -> int:
        return len(self.paths)

    def image(self, i: int) -> Image.Image:
        return load_image(self.describe(i), self.limits)

    def image_id(self, i: int) -> int:
        return int(self.ids[i])

    def describe(self, i: int) -> str:
        return os.path.join(self.image_root, self.paths[i])


class SyntheticPairs:
    """Synthetic scenes as training pairs (one item per image, one of its paraphrases drawn per epoch)."""

    def __init__(self, scenes: SyntheticScenes, captions_per_image: int) -> None:
        self.scenes, self.k = scenes, captions_per_image

    def __len__(self) -> int:
        return len(self.scenes)

    def captions(self, i: int) -> list[str]:
        return self.scenes.scene(i).captions(self.k)

    def image(self, i: int) -> Image.Image:
        return self.scenes.image(i)

    def image_id(self, i: int) -> int:
        return i

    def describe(self, i: int) -> str:
        return f"synthetic:{self.scenes.split}:{i}"


# ---------------------------------------------------------------------------------------------------------------
# Training dataset


class CaptionPicker:
    """Cleans an entry's raw captions and draws one per epoch from ``(seed, epoch, index)``.

    The epoch lives in a shared-memory tensor, so :meth:`set_epoch` in the main process reaches DataLoader workers
    that are already running (persistent workers) as well as ones forked later.
    """

    def __init__(self, clean: str = "albef", max_words: int = 30, seed: int = 0) -> None:
        self.clean, self.max_words, self.seed = clean, max_words, seed
        self._epoch = torch.zeros((), dtype=torch.int64).share_memory_()

    @property
    def epoch(self) -> int:
        return int(self._epoch)

    def set_epoch(self, epoch: int) -> None:
        self._epoch.fill_(int(epoch))

    def __call__(self, raw: list[str], index: int) -> str:
        """The caption of ``index`` for this epoch; raises BadSample if no caption survives cleaning."""
        cleaned = [c for c in (clean_caption(r, self.clean, self.max_words) for r in raw) if c]
        if not cleaned:
            raise BadSample("empty caption", "nothing left after cleaning")
        if len(cleaned) == 1:
            return cleaned[0]
        return cleaned[mix64(self.seed, self.epoch, index) % len(cleaned)]


class ImageTextDataset(Dataset):
    """Training pairs from any :class:`PairSource`, robust to bad samples.

    Index ``i < len(self)`` is a sample; ``i >= len(self)`` is a sampler padding slot for sample ``i - len(self)``
    and returns a padding item. When an entry has several captions, one is drawn per epoch (see
    :class:`CaptionPicker`).
    """

    def __init__(
        self,
        source: PairSource,
        transform: Callable[[Image.Image], torch.Tensor],
        clean: str = "albef",
        max_words: int = 30,
        seed: int = 0,
    ) -> None:
        self.source, self.transform = source, transform
        self.pick_caption = CaptionPicker(clean, max_words, seed)

    def __len__(self) -> int:
        return len(self.source)

    def set_epoch(self, epoch: int) -> None:
        self.pick_caption.set_epoch(epoch)

    def __getitem__(self, index: int) -> dict[str, Any]:
        # Sampler padding slots carry no data (see ShardedSampler).
        n = len(self.source)
        if index >= n:
            return pad_item(index - n)

        # Caption first: a bad caption costs no image decode.
        try:
            caption = self.pick_caption(self.source.captions(index), index)
            image = self.transform(self.source.image(index))
        except BadSample as exc:
            return skipped_item(index, self.source.describe(index), exc)
        return {"image": image, "caption": caption, "image_id": self.source.image_id(index), "index": int(index)}


def mix64(*values: int) -> int:
    """Deterministic 64-bit hash of small integers (splitmix64 steps); cheap enough per sample."""
    h = 0x9E3779B97F4A7C15
    for v in values:
        h = (h ^ (v & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        h = (h ^ (h >> 31)) * 0x94D049BB133111EB & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 29
    return h


# ---------------------------------------------------------------------------------------------------------------
# Retrieval dataset


class RetrievalDataset(Dataset):
    """Retrieval evaluation set: one item per image, captions exposed as arrays for the scorer.

    Attributes:
        texts: every caption, cleaned.
        txt2img: (n_texts,) int64, the image position of each text.
        img2txt: one int64 array per image with its text positions.
        image_paths: printable image paths (None for synthetic data).

    Policy for bad evaluation images: a missing file is found at setup (``data.eval_missing_images``: "warn" logs
    it, "error" raises). An image that fails at load time yields a skipped item; the eval collator keeps its slot
    with a blank (all-zero, i.e. mean-colour) image and lists it in ``batch["skipped"]``, so it still counts in
    the recall denominator instead of silently vanishing.
    """

    def __init__(
        self,
        images: ImageSource,
        texts: list[str],
        txt2img: np.ndarray,
        transform: Callable[[Image.Image], torch.Tensor],
        image_paths: Sequence[str] | None = None,
    ) -> None:
        self.images, self.texts, self.transform = images, texts, transform
        self.txt2img = np.asarray(txt2img, dtype=np.int64)
        self.img2txt = _invert(self.txt2img, len(images))
        self.image_paths = image_paths

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict[str, Any]:
        if i >= len(self.images):
            return pad_item(i - len(self.images))
        try:
            image = self.transform(self.images.image(i))
        except BadSample as exc:
            # The image_id rides along so the eval collator can keep the gallery slot complete.
            return {**skipped_item(i, self.images.describe(i), exc), "image_id": self.images.image_id(i)}
        return {"image": image, "index": int(i), "image_id": self.images.image_id(i)}

    def load_image_pil(self, i: int) -> Image.Image:
        """The untransformed RGB image (for report thumbnails); raises BadSample if it cannot be read."""
        return self.images.image(i)


def _invert(txt2img: np.ndarray, n_images: int) -> list[np.ndarray]:
    """img2txt from txt2img: texts of each image, in text order."""
    order = np.argsort(txt2img, kind="stable")
    bounds = np.searchsorted(txt2img[order], np.arange(n_images + 1))
    return [order[bounds[i] : bounds[i + 1]] for i in range(n_images)]


def retrieval_from_annotations(
    ann: Annotations,
    image_root: str,
    transform: Callable,
    clean: str,
    max_words: int,
    limits: ImageLimits,
) -> RetrievalDataset:
    """Group annotation entries by image; drop unusable captions and images left without any (both logged)."""
    # Cleaned texts per image, in first-appearance order of the images.
    per_image: dict[int, list[str]] = {}
    dropped_texts = 0
    for i in range(len(ann)):
        image = int(ann.entry_image[i])
        per_image.setdefault(image, [])
        try:
            raw = ann.entry_captions(i)
        except BadSample:
            dropped_texts += 1
            continue
        cleaned = [c for c in (clean_caption(r, clean, max_words) for r in raw) if c]
        dropped_texts += len(raw) - len(cleaned)
        per_image[image].extend(cleaned)

    # Images without texts cannot be scored for image-to-text recall: leave them out, loudly.
    kept = [image for image, texts in per_image.items() if texts]
    if len(kept) < len(per_image) or dropped_texts:
        log.warning(
            "%s: dropped %d unusable captions and %d images left without a caption from the evaluation set",
            ann.source,
            dropped_texts,
            len(per_image) - len(kept),
        )
    texts = [t for image in kept for t in per_image[image]]
    txt2img = np.repeat(np.arange(len(kept), dtype=np.int64), [len(per_image[image]) for image in kept])  # (n_texts,)

    # Image table of the kept images.
    paths = StringTable.from_strings(ann.images[image] for image in kept)
    source = FileImages(paths, np.asarray(kept, dtype=np.int64), image_root, limits)
    image_paths = [source.describe(i) for i in range(len(kept))]
    return RetrievalDataset(source, texts, txt2img, transform, image_paths)


class SyntheticImages:
    """Synthetic scenes as retrieval images."""

    def __init__(self, scenes: SyntheticScenes) -> None:
        self.scenes = scenes

    def __len__(self) -> int:
        return len(self.scenes)

    def image(self, i: int) -> Image.Image:
        return self.scenes.image(i)

    def image_id(self, i: int) -> int:
        return i

    def describe(self, i: int) -> str:
        return f"synthetic:{self.scenes.split}:{i}"


def retrieval_from_synthetic(
    scenes: SyntheticScenes, captions_per_image: int, transform: Callable, clean: str, max_words: int
) -> RetrievalDataset:
    """Each synthetic image with its first ``captions_per_image`` paraphrases."""
    texts = [
        clean_caption(c, clean, max_words)
        for i in range(len(scenes))
        for c in scenes.scene(i).captions(captions_per_image)
    ]
    txt2img = np.repeat(np.arange(len(scenes), dtype=np.int64), captions_per_image)  # (n_images * k,)
    return RetrievalDataset(SyntheticImages(scenes), texts, txt2img, transform, image_paths=None)
