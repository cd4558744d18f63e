"""Annotation-file formats parsed into one compact table.

Supported files:

* ALBEF/BLIP JSON lists: training entries ``{"image", "caption", "image_id"}`` (caption a string or a list, one
  drawn per epoch) and evaluation entries ``{"image", "caption": [...]}``.
* Official COCO captions JSON: ``{"images": [{"id", "file_name"}], "annotations": [{"image_id", "caption"}]}``.
* Karpathy splits (``dataset_coco.json``, ``dataset_flickr30k.json``, ``dataset_flickr8k.json``):
  ``{"images": [{"filename", "split", "sentences": [{"raw"}], "filepath"?}]}``.

All become an :class:`Annotations` table of numpy arrays. Structural problems (missing file, malformed JSON, wrong
schema) raise at once naming the file, the entry and the key; a per-entry caption problem is recorded in
``Annotations.bad`` and the entry is skipped (and counted) when the loader reaches it.
"""

from __future__ import annotations

import json
import logging
import os
import re
from array import array
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from vlp.data.captions import caption_candidates
from vlp.data.errors import BadSample, DataSetupError
from vlp.data.storage import StringTable, StringTableBuilder

log = logging.getLogger(__name__)

# Codes stored in Annotations.bad; index 0 means the caption field is usable.
BAD_KINDS = ("", "empty caption", "empty caption list", "caption not a string")


@dataclass
class Annotations:
    """Image-caption entries held in numpy arrays (no per-entry Python objects).

    Entry ``i`` shows image ``entry_image[i]`` (a position in ``images``, which is also its image_id) with the
    raw captions ``captions[caption_start[i]:caption_start[i + 1]]``; ``bad[i]`` is non-zero when its caption
    field was unusable (see :data:`BAD_KINDS`).
    """

    source: str
    images: StringTable
    entry_image: np.ndarray
    captions: StringTable
    caption_start: np.ndarray
    bad: np.ndarray

    def __len__(self) -> int:
        return len(self.entry_image)

    def entry_captions(self, i: int) -> list[str]:
        """Raw usable captions of entry ``i``; raises BadSample for an entry with an unusable caption field."""
        code = int(self.bad[i])
        if code:
            raise BadSample(BAD_KINDS[code], f"annotation entry {i} of {self.source}")
        return [self.captions[j] for j in range(int(self.caption_start[i]), int(self.caption_start[i + 1]))]

    @property
    def nbytes(self) -> int:
        arrays = (self.entry_image, self.caption_start, self.bad)
        return self.images.nbytes + self.captions.nbytes + sum(int(a.nbytes) for a in arrays)


class AnnotationBuilder:
    """Accumulates entries into compact buffers; image paths are de-duplicated into image ids."""

    def __init__(self, source: str) -> None:
        self.source = source
        self._paths = StringTableBuilder()
        self._path_ids: dict[str, int] = {}
        self._entry_image = array("q")
        self._captions = StringTableBuilder()
        self._caption_end = array("q")
        self._bad = array("b")

    def image(self, path: str) -> int:
        """Id of ``path`` (new paths get the next id)."""
        image_id = self._path_ids.get(path)
        if image_id is None:
            image_id = self._path_ids[path] = self._paths.add(path)
        return image_id

    def add(self, image_path: str, caption_field: Any) -> None:
        """One entry; an unusable caption field is recorded, not raised (the loader skips it later)."""
        self._entry_image.append(self.image(image_path))
        try:
            for caption in caption_candidates(caption_field):
                self._captions.add(caption)
            self._bad.append(0)
        except BadSample as exc:
            self._bad.append(BAD_KINDS.index(exc.kind))
        self._caption_end.append(len(self._captions))

    def build(self) -> Annotations:
        caption_start = np.zeros(len(self._caption_end) + 1, dtype=np.int64)
        caption_start[1:] = np.frombuffer(self._caption_end, dtype=np.int64) if len(self._caption_end) else []
        ann = Annotations(
            source=self.source,
            images=self._paths.build(),
            entry_image=np.frombuffer(self._entry_image, dtype=np.int64).copy(),
            captions=self._captions.build(),
            caption_start=caption_start,
            bad=np.frombuffer(self._bad, dtype=np.int8).copy(),
        )
        self._path_ids.clear()
        n_bad = int(np.count_nonzero(ann.bad))
        if n_bad:
            log.warning(
                "%s: %d of %d entries have an unusable caption and will be skipped", self.source, n_bad, len(ann)
            )
        return ann


# ---------------------------------------------------------------------------------------------------------------
# Format parsers


def load_albef_json(path: str, key: str) -> Annotations:
    """ALBEF/BLIP list format (training or evaluation entries). ``key`` names the config key in errors."""
    builder = AnnotationBuilder(path)
    for i, entry in enumerate(iter_json_array(path, key)):
        # Schema: each entry is an object with a string "image" and a "caption" field.
        if not isinstance(entry, dict):
            raise DataSetupError(f"{key}: entry {i} of {path} is a {type(entry).__name__}, expected an object")
        image = entry.get("image")
        if not isinstance(image, str) or not image:
            raise DataSetupError(f"{key}: entry {i} of {path} needs a non-empty string 'image' (got {image!r})")
        if "caption" not in entry:
            raise DataSetupError(f"{key}: entry {i} of {path} has no 'caption' key (keys: {sorted(entry)})")
        builder.add(image, entry["caption"])
    return builder.build()


def load_coco_captions(path: str, key: str, unit: str = "caption") -> Annotations:
    """Official COCO captions file; ``unit`` "caption" gives one entry per caption, "image" one per image."""
    data = read_json(path, key)
    images = _require_list(data, "images", path, key)
    annotations = _require_list(data, "annotations", path, key)

    # Image table: id -> file name, keeping the file's image order.
    file_names: dict[Any, str] = {}
    for i, img in enumerate(images):
        if not isinstance(img, dict) or "id" not in img or not isinstance(img.get("file_name"), str):
            raise DataSetupError(f"{key}: images[{i}] of {path} needs 'id' and a string 'file_name'")
        file_names[img["id"]] = img["file_name"]

    # Captions grouped by image; an annotation pointing at an unknown image is a broken file.
    per_image: dict[Any, list] = {image_id: [] for image_id in file_names}
    for i, ann in enumerate(annotations):
        if not isinstance(ann, dict) or "image_id" not in ann or "caption" not in ann:
            raise DataSetupError(f"{key}: annotations[{i}] of {path} needs 'image_id' and 'caption'")
        if ann["image_id"] not in per_image:
            raise DataSetupError(f"{key}: annotations[{i}] of {path} refers to unknown image_id {ann['image_id']!r}")
        per_image[ann["image_id"]].append(ann["caption"])
    return _build_grouped(path, ((file_names[i], caps) for i, caps in per_image.items() if caps), unit)


def load_karpathy(path: str, key: str, splits: list[str] | tuple[str, ...], unit: str = "caption") -> Annotations:
    """Karpathy split file; keeps images whose ``split`` is in ``splits``."""
    data = read_json(path, key)
    images = _require_list(data, "images", path, key)
    wanted = set(splits)

    def selected() -> Iterator[tuple[str, list]]:
        for i, img in enumerate(images):
            if not isinstance(img, dict) or not isinstance(img.get("filename"), str) or "split" not in img:
                raise DataSetupError(f"{key}: images[{i}] of {path} needs a string 'filename' and a 'split'")
            if img["split"] not in wanted:
                continue
            sentences = img.get("sentences")
            if not isinstance(sentences, list):
                raise DataSetupError(f"{key}: images[{i}] of {path} needs a 'sentences' list")
            # COCO entries carry the folder (train2014/val2014) in "filepath"; Flickr entries have none.
            yield os.path.join(img.get("filepath") or "", img["filename"]), [_sentence_text(s) for s in sentences]

    ann = _build_grouped(path, selected(), unit)
    if len(ann) == 0:
        found = sorted({str(img.get("split")) for img in images if isinstance(img, dict)})
        raise DataSetupError(f"{key}: no image of {path} has a split in {sorted(wanted)} (splits present: {found})")
    return ann


def _sentence_text(sentence: Any) -> Any:
    """Karpathy sentence -> raw caption (falls back to the joined tokens; anything else is a bad caption)."""
    if isinstance(sentence, dict):
        if "raw" in sentence:
            return sentence["raw"]
        if isinstance(sentence.get("tokens"), list):
            return " ".join(str(t) for t in sentence["tokens"])
    return sentence


def _build_grouped(source: str, groups: Iterator[tuple[str, list]], unit: str) -> Annotations:
    """Entries from (image path, captions) groups: one per caption, or one per image with the caption list."""
    builder = AnnotationBuilder(source)
    for image_path, captions in groups:
        if unit == "image":
            builder.add(image_path, captions)
        else:
            for caption in captions:
                builder.add(image_path, caption)
    return builder.build()


def _require_list(data: Any, field: str, path: str, key: str) -> list:
    if not isinstance(data, dict) or not isinstance(data.get(field), list):
        found = sorted(data) if isinstance(data, dict) else type(data).__name__
        raise DataSetupError(f"{key}: {path} needs a top-level '{field}' list (found {found}); check data.name")
    return data[field]


# ---------------------------------------------------------------------------------------------------------------
# JSON reading with errors that name the file, the key and the position

_WS = re.compile(r"[ \t\n\r]*")


def read_json(path: str, key: str) -> Any:
    """Whole-file JSON load."""
    text = _read_text(path, key)
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataSetupError(
            f"{key}: malformed JSON in {path} at line {exc.lineno} column {exc.colno}: {exc.msg}"
        ) from None


def iter_json_array(path: str, key: str) -> Iterator[Any]:
    """Yield the elements of a top-level JSON list one at a time.

    Decoding element by element never materialises the whole list of dicts, so loading a 1M-entry file peaks at
    the file's text plus the compact table instead of several GB of Python objects.
    """
    text = _read_text(path, key)
    decoder = json.JSONDecoder()

    # Opening bracket (an object here usually means the wrong data.name).
    pos = _WS.match(text, 0).end()
    if pos == len(text):
        raise DataSetupError(f"{key}: {path} is empty; expected a JSON list of entries")
    if text[pos] != "[":
        hint = " (a COCO or Karpathy file? set data.name accordingly)" if text[pos] == "{" else ""
        raise DataSetupError(f"{key}: {path} must contain a JSON list of entries{hint}")
    pos = _WS.match(text, pos + 1).end()
    if text.startswith("]", pos):
        return

    # Elements separated by commas, up to the closing bracket.
    while True:
        try:
            element, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as exc:
            raise DataSetupError(
                f"{key}: malformed JSON in {path} at line {exc.lineno} column {exc.colno}: {exc.msg}"
            ) from None
        yield element
        pos = _WS.match(text, pos).end()
        if text.startswith(",", pos):
            pos = _WS.match(text, pos + 1).end()
        elif text.startswith("]", pos):
            if _WS.match(text, pos + 1).end() != len(text):
                raise DataSetupError(f"{key}: malformed JSON in {path} at {_position(text, pos + 1)}: extra data")
            return
        else:
            raise DataSetupError(f"{key}: malformed JSON in {path} at {_position(text, pos)}: expected ',' or ']'")


def _read_text(path: str, key: str) -> str:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{key}: annotation file not found: {path}")
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except UnicodeDecodeError as exc:
        raise DataSetupError(f"{key}: {path} is not UTF-8 text ({exc})") from None


def _position(text: str, pos: int) -> str:
    line = text.count("\n", 0, pos) + 1
    column = pos - text.rfind("\n", 0, pos)
    return f"line {line} column {column}"


# ---------------------------------------------------------------------------------------------------------------
# Image root check


def check_image_root(
    paths: StringTable | list[str],
    image_root: str,
    source: str,
    key: str,
    samples: int = 100,
    max_missing: float = 0.5,
    seed: int = 0,
) -> list[str]:
    """Fail fast when most images are absent (wrong ``image_root``); return the missing paths of the sample.

    Only ``samples`` paths are stat-ed (a random, seeded sample), so the check costs the same for 1M entries. A
    few missing files are fine: they are skipped and counted at load time.
    """
    # The root itself.
    if not os.path.isdir(image_root):
        raise DataSetupError(f"{key}: image directory not found: {image_root} (images listed in {source})")
    n = len(paths)
    if n == 0 or samples == 0:
        return []

    # A seeded sample of image paths.
    picks = np.random.default_rng(seed).choice(n, size=min(samples, n), replace=False)
    missing = [paths[int(i)] for i in picks if not os.path.exists(os.path.join(image_root, paths[int(i)]))]
    if len(missing) > max_missing * len(picks):
        raise DataSetupError(
            f"{key}: {len(missing)} of {len(picks)} sampled images listed in {source} are missing under "
            f"{image_root}, e.g. {missing[:3]}; check {key} (and data.root)"
        )
    if missing:
        log.warning("%d of %d sampled images of %s are missing under %s", len(missing), len(picks), source, image_root)
    return missing
