"""Hugging Face ``datasets`` from local files: parquet, arrow, imagefolder (+ metadata.jsonl), json, csv, or a
``save_to_disk`` directory, with configurable column names, in-memory-mapped or streaming mode.

The image column may hold an ``Image`` feature, ``{"bytes", "path"}`` structs, raw bytes or a path string
(relative paths resolve under ``data.image_root``). Images are always decoded here, not by ``datasets``, so a
corrupt image becomes a counted skip instead of an exception inside the library. The caption column holds a
string or a list of strings (one drawn per epoch). The table stays in Arrow (memory-mapped), never in Python
lists.
"""

from __future__ import annotations

import glob
import hashlib
import logging
import os
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
from PIL import Image
from torch.utils.data import IterableDataset, get_worker_info

from vlp.data.captions import caption_candidates, clean_caption
from vlp.data.datasets import CaptionPicker, RetrievalDataset
from vlp.data.errors import BadSample, DataSetupError, skipped_item
from vlp.data.images import ImageLimits, load_image, to_rgb

log = logging.getLogger(__name__)

_BUILDER_BY_EXTENSION = {".parquet": "parquet", ".arrow": "arrow", ".json": "json", ".jsonl": "json", ".csv": "csv"}


def load_hf(path: str, key: str, builder: str | None, cache_dir: str | None, streaming: bool = False) -> Any:
    """Load local files as a ``datasets.Dataset`` (or ``IterableDataset`` when streaming)."""
    import datasets

    # The files must exist; a glob must match something.
    matches = glob.glob(path) if glob.has_magic(path) else ([path] if os.path.exists(path) else [])
    if not matches:
        raise FileNotFoundError(f"{key}: no file or directory matches {path}")
    builder = builder or infer_builder(matches[0])

    # Build; library errors about the files become one message naming the key and the path.
    try:
        if builder == "disk":
            ds = datasets.load_from_disk(path)
            return ds.to_iterable_dataset(num_shards=max(1, len(ds.data.to_batches()))) if streaming else ds
        if builder == "imagefolder":
            return datasets.load_dataset(
                "imagefolder", data_dir=path, split="train", cache_dir=cache_dir, streaming=streaming
            )
        return datasets.load_dataset(builder, data_files=path, split="train", cache_dir=cache_dir, streaming=streaming)
    except (OSError, ValueError, TypeError, KeyError, datasets.exceptions.DatasetGenerationError) as exc:
        raise DataSetupError(f"{key}: could not load {path} with the '{builder}' builder: {exc}") from exc


def infer_builder(path: str) -> str:
    """Builder from the path: save_to_disk dir -> disk, other dir -> imagefolder, else by file extension."""
    if os.path.isdir(path):
        return "disk" if os.path.exists(os.path.join(path, "dataset_info.json")) else "imagefolder"
    ext = os.path.splitext(path)[1].lower()
    if ext not in _BUILDER_BY_EXTENSION:
        raise DataSetupError(f"data.hf_builder: cannot infer the builder of {path}; set data.hf_builder")
    return _BUILDER_BY_EXTENSION[ext]


def prepare_columns(ds: Any, key: str, path: str, columns: dict[str, str | None]) -> Any:
    """Check the configured columns exist and turn off library-side image decoding."""
    import datasets

    names = ds.column_names or list(ds.features or {})
    for config_key, column in columns.items():
        if column is not None and column not in names:
            raise DataSetupError(f"{config_key}: column {column!r} is not in {path} ({key}); columns: {names}")
    image_column = columns["data.image_column"]
    if ds.features is not None and isinstance(ds.features.get(image_column), datasets.Image):
        ds = ds.cast_column(image_column, datasets.Image(decode=False))
    return ds


def open_cell(value: Any, image_root: str, limits: ImageLimits) -> Image.Image:
    """Decode one image cell (struct, bytes, path or PIL image)."""
    if isinstance(value, dict):
        value = value.get("bytes") or value.get("path")
    if isinstance(value, Image.Image):
        return to_rgb(value)
    if isinstance(value, str):
        return load_image(os.path.join(image_root, value), limits)
    if isinstance(value, bytes | bytearray):
        return load_image(bytes(value), limits)
    raise BadSample("missing file", f"no image in the row (cell is {type(value).__name__})")


def describe_cell(value: Any, fallback: str) -> str:
    if isinstance(value, dict) and value.get("path"):
        return str(value["path"])
    return value if isinstance(value, str) else fallback


def stable_id(value: Any) -> int:
    """Non-negative int id: non-negative ints (or digit strings) as they are, anything else hashed stably."""
    if isinstance(value, int | np.integer) and value >= 0:
        return int(value)
    text = str(value)
    if text.isdigit():
        return int(text)
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little") >> 2


def group_codes(ds: Any, column: str) -> np.ndarray:
    """Contiguous group id per row (first-appearance order) from any column, computed in Arrow."""
    import pyarrow.compute as pc

    # dictionary_encode gives codes in first-appearance order; (n_rows,) int64 after the cast.
    encoded = pc.dictionary_encode(ds.data.column(column)).combine_chunks()
    return np.asarray(encoded.indices.to_numpy(zero_copy_only=False), dtype=np.int64)


class HFPairs:
    """Training pairs from a map-style ``datasets.Dataset`` (rows are read one at a time from Arrow)."""

    def __init__(self, ds: Any, image_column: str, caption_column: str, image_ids: np.ndarray | None, root: str,
                 limits: ImageLimits) -> None:  # fmt: skip
        self.ds, self.image_column, self.caption_column = ds, image_column, caption_column
        self.image_ids, self.root, self.limits = image_ids, root, limits
        self._row: tuple[int, dict] | None = None

    def __len__(self) -> int:
        return len(self.ds)

    def row(self, i: int) -> dict:
        # captions() then image() read the same row: keep the last one.
        if self._row is None or self._row[0] != i:
            self._row = (i, self.ds[int(i)])
        return self._row[1]

    def captions(self, i: int) -> list[str]:
        return caption_candidates(self.row(i)[self.caption_column])

    def image(self, i: int) -> Image.Image:
        return open_cell(self.row(i)[self.image_column], self.root, self.limits)

    def image_id(self, i: int) -> int:
        return int(self.image_ids[i]) if self.image_ids is not None else int(i)

    def describe(self, i: int) -> str:
        return describe_cell(self.row(i)[self.image_column], f"row {i}")


class HFImages:
    """Retrieval images: the first row of each image group."""

    def __init__(self, ds: Any, image_column: str, rows: np.ndarray, root: str, limits: ImageLimits) -> None:
        self.ds, self.image_column, self.rows, self.root, self.limits = ds, image_column, rows, root, limits

    def __len__(self) -> int:
        return len(self.rows)

    def _cell(self, i: int) -> Any:
        return self.ds[int(self.rows[i])][self.image_column]

    def image(self, i: int) -> Image.Image:
        return open_cell(self._cell(i), self.root, self.limits)

    def image_id(self, i: int) -> int:
        return int(i)

    def describe(self, i: int) -> str:
        return describe_cell(self._cell(i), f"row {int(self.rows[i])}")


def retrieval_from_hf(
    ds: Any,
    image_column: str,
    caption_column: str,
    image_id_column: str | None,
    root: str,
    transform: Callable,
    clean: str,
    max_words: int,
    limits: ImageLimits,
) -> RetrievalDataset:
    """One retrieval image per row, or per ``image_id_column`` value when rows repeat an image per caption."""
    # Group rows into images (codes follow first appearance, so group g starts at first_rows[g]).
    groups = group_codes(ds, image_id_column) if image_id_column else np.arange(len(ds), dtype=np.int64)
    first_rows = np.unique(groups, return_index=True)[1]  # (n_groups,)

    # Cleaned texts per image; unusable captions are dropped and counted.
    texts_of: list[list[str]] = [[] for _ in range(len(first_rows))]
    dropped = 0
    for group, value in zip(groups.tolist(), ds.data.column(caption_column).to_pylist()):
        try:
            raw = caption_candidates(value)
        except BadSample:
            dropped += 1
            continue
        texts_of[group].extend(filter(None, (clean_caption(r, clean, max_words) for r in raw)))

    # Images without any caption cannot be scored for image-to-text recall: leave them out, loudly.
    kept = [g for g, texts in enumerate(texts_of) if texts]
    if dropped or len(kept) < len(texts_of):
        log.warning(
            "evaluation table: dropped %d unusable captions and %d images left without a caption",
            dropped, len(texts_of) - len(kept),
        )  # fmt: skip
    texts = [t for g in kept for t in texts_of[g]]
    txt2img = np.repeat(np.arange(len(kept), dtype=np.int64), [len(texts_of[g]) for g in kept])  # (n_texts,)
    source = HFImages(ds, image_column, first_rows[kept], root, limits)
    return RetrievalDataset(source, texts, txt2img, transform, image_paths=None)


class HFStream(IterableDataset):
    """Streaming ``datasets.IterableDataset`` for training.

    Rows are split across ranks with ``split_dataset_by_node`` and across DataLoader workers by ``datasets``
    itself (by shard), so each row is read once per epoch. ``epoch_size`` (total over ranks) caps every rank at
    the same count, which DDP needs; without it ranks may see different counts. Shuffling uses a buffer of
    ``shuffle_buffer`` rows, reseeded every epoch.
    """

    def __init__(self, ds: Any, transform: Callable, pick_caption: CaptionPicker,
                 columns: tuple[str, str, str | None], root: str, limits: ImageLimits, rank: int, world: int,
                 epoch_size: int | None, shuffle_buffer: int) -> None:  # fmt: skip
        from datasets.distributed import split_dataset_by_node

        self.ds = split_dataset_by_node(ds, rank=rank, world_size=world) if world > 1 else ds
        self.transform, self.pick_caption = transform, pick_caption
        self.image_column, self.caption_column, self.image_id_column = columns
        self.root, self.limits, self.rank, self.world = root, limits, rank, world
        self.epoch_size, self.shuffle_buffer = epoch_size, shuffle_buffer

    def set_epoch(self, epoch: int) -> None:
        self.pick_caption.set_epoch(epoch)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        worker = get_worker_info()
        wid, workers = (worker.id, worker.num_workers) if worker else (0, 1)
        quota = worker_quota(self.epoch_size, self.world, wid, workers)

        # Fresh shuffle order each epoch.
        ds = self.ds
        if self.shuffle_buffer > 0:
            ds = ds.shuffle(seed=self.pick_caption.seed, buffer_size=self.shuffle_buffer)
        ds.set_epoch(self.pick_caption.epoch)

        for count, row in enumerate(ds):
            if quota is not None and count >= quota:
                return
            # A unique index over ranks and workers: (count, worker, rank) interleaved.
            index = (count * workers + wid) * self.world + self.rank
            yield self._item(row, index)

    def _item(self, row: dict, index: int) -> dict[str, Any]:
        path = describe_cell(row.get(self.image_column), f"stream row {index}")
        try:
            raw = caption_candidates(row.get(self.caption_column))
            caption = self.pick_caption(raw, index)
            image = self.transform(open_cell(row.get(self.image_column), self.root, self.limits))
        except BadSample as exc:
            return skipped_item(index, path, exc)
        image_id = stable_id(row[self.image_id_column]) if self.image_id_column else index
        return {"image": image, "caption": caption, "image_id": image_id, "index": index}


def worker_quota(epoch_size: int | None, world: int, wid: int, workers: int) -> int | None:
    """This worker's share of ``epoch_size`` (total over ranks); None means unlimited."""
    if epoch_size is None:
        return None
    per_rank = epoch_size // world
    return per_rank // workers + (1 if wid < per_rank % workers else 0)
