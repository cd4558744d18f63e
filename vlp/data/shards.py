"""webdataset tar shards as img2dataset writes them: ``KEY.jpg`` + ``KEY.txt`` (+ ``KEY.json``) per sample.

Two ways to cover the shards each epoch:

* ``resampled=False``: the shard list is shuffled per epoch (same order on every rank) and dealt out to ranks and
  then to DataLoader workers, so each sample is read once per epoch. Ranks see equal counts only when the shards
  divide evenly; set ``epoch_size`` to cap every rank at the same number.
* ``resampled=True`` (multi-node pretraining): every worker draws shards at random with replacement, from its
  own (seed, epoch, rank, worker) stream, forever; ``epoch_size`` (required, total over ranks) ends the epoch.
  This is the usual way to keep many nodes busy with uneven shards; samples may repeat within an epoch.

Decoding is done here with the robust image loader, so a bad member yields a counted skip; a corrupt tar header
is logged and the rest of that shard is abandoned.
"""

from __future__ import annotations

import json
import logging
import os
import random
from collections.abc import Callable, Iterable, Iterator
from itertools import count
from typing import Any

from braceexpand import braceexpand
from torch.utils.data import IterableDataset, get_worker_info
from webdataset.tariterators import tarfile_samples

from vlp.data.captions import caption_candidates
from vlp.data.datasets import CaptionPicker, mix64
from vlp.data.errors import BadSample, DataSetupError, skipped_item
from vlp.data.hf import stable_id, worker_quota
from vlp.data.images import ImageLimits, load_image

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")


def expand_shards(pattern: str, root: str, key: str = "data.shards") -> list[str]:
    """Brace-expand ``pattern`` (e.g. ``shards/{00000..00009}.tar``) under ``root``; every shard must exist."""
    urls = [os.path.join(root, p) for part in pattern.split("::") for p in braceexpand(part.strip())]
    missing = [u for u in urls if not os.path.isfile(u)]
    if not urls or missing:
        raise FileNotFoundError(f"{key}: {len(missing)} of {len(urls)} shards not found, e.g. {missing[:3]}")
    return urls


class ShardStream(IterableDataset):
    """Training samples from tar shards (see the module docstring for the coverage modes)."""

    def __init__(self, urls: list[str], transform: Callable, pick_caption: CaptionPicker, limits: ImageLimits,
                 rank: int = 0, world: int = 1, resampled: bool = False, epoch_size: int | None = None,
                 shuffle_buffer: int = 1000, caption_field: str = "caption",
                 image_id_field: str | None = None) -> None:  # fmt: skip
        if resampled and not epoch_size:
            raise DataSetupError("data.epoch_size is required when data.resampled is true")
        self.urls, self.transform, self.pick_caption, self.limits = urls, transform, pick_caption, limits
        self.rank, self.world, self.resampled, self.epoch_size = rank, world, resampled, epoch_size
        self.shuffle_buffer, self.caption_field, self.image_id_field = shuffle_buffer, caption_field, image_id_field

    def set_epoch(self, epoch: int) -> None:
        self.pick_caption.set_epoch(epoch)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        worker = get_worker_info()
        wid, workers = (worker.id, worker.num_workers) if worker else (0, 1)
        epoch, seed = self.pick_caption.epoch, self.pick_caption.seed
        rng = random.Random(mix64(seed, epoch, self.rank, wid))

        # Which shards this worker reads, in which order.
        if self.resampled:
            shards: Iterable[str] = (rng.choice(self.urls) for _ in count())
        else:
            order = list(self.urls)
            random.Random(mix64(seed, epoch)).shuffle(order)
            shards = order[self.rank :: self.world][wid::workers]

        # Stream samples, shuffle within a buffer, stop at the quota.
        samples = tarfile_samples(({"url": u} for u in shards), handler=_log_and_continue)
        quota = worker_quota(self.epoch_size, self.world, wid, workers)
        for n, sample in enumerate(_buffer_shuffle(samples, self.shuffle_buffer, rng)):
            if quota is not None and n >= quota:
                return
            yield self.decode(sample)

    def decode(self, sample: dict[str, Any]) -> dict[str, Any]:
        """One tar sample -> training item (or skipped item)."""
        key, url = sample.get("__key__", ""), sample.get("__url__", "")
        meta = _json_member(sample)
        image_id = stable_id(meta.get(self.image_id_field, key) if self.image_id_field else meta.get("key", key))
        path = f"{url}:{key}"
        try:
            caption = self.pick_caption(caption_candidates(self._caption(sample, meta)), image_id)
            member = next((sample[e] for e in IMAGE_EXTENSIONS if e in sample), None)
            if member is None:
                raise BadSample("missing file", f"no image member ({'/'.join(IMAGE_EXTENSIONS)}) in sample")
            image = self.transform(load_image(member, self.limits))
        except BadSample as exc:
            return skipped_item(image_id, path, exc)
        return {"image": image, "caption": caption, "image_id": image_id, "index": image_id}

    def _caption(self, sample: dict[str, Any], meta: dict[str, Any]) -> Any:
        # img2dataset writes the caption to KEY.txt (and usually also into KEY.json).
        if "txt" in sample:
            try:
                return sample["txt"].decode("utf-8")
            except UnicodeDecodeError as exc:
                raise BadSample("caption not a string", f"undecodable .txt ({exc})") from exc
        return meta.get(self.caption_field)


def _json_member(sample: dict[str, Any]) -> dict[str, Any]:
    """The parsed KEY.json member, or {} when absent or unreadable (its fields are optional)."""
    raw = sample.get("json")
    if raw is None:
        return {}
    try:
        meta = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        log.warning("unreadable json member in %s:%s", sample.get("__url__"), sample.get("__key__"))
        return {}
    return meta if isinstance(meta, dict) else {}


def _buffer_shuffle(items: Iterable[Any], size: int, rng: random.Random) -> Iterator[Any]:
    """Approximate shuffle with a fixed-size buffer (streams cannot be permuted whole)."""
    if size <= 1:
        yield from items
        return
    buffer: list[Any] = []
    for item in items:
        if len(buffer) < size:
            buffer.append(item)
            continue
        j = rng.randrange(size)
        yield buffer[j]
        buffer[j] = item
    rng.shuffle(buffer)
    yield from buffer


def _log_and_continue(exc: Exception) -> bool:
    """webdataset error handler: a broken shard is logged and skipped, the stream goes on."""
    log.warning("skipping unreadable shard data: %r", exc)
    return True
