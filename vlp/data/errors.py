"""Exceptions and the two marker items that flow through the loaders.

Two kinds of problem, two paths:

* :class:`DataSetupError` (and FileNotFoundError): the input is structurally broken (missing or malformed
  annotation file, wrong schema, an image root where most images are missing). Raised at setup, before training,
  naming the file and the key.
* :class:`BadSample`: one sample is unusable (unreadable image, empty caption, ...). Caught inside the dataset,
  which returns a *skipped item* instead; the collator drops it and reports it, so one bad sample never stops a run.
"""

from __future__ import annotations

from typing import Any


class DataSetupError(ValueError):
    """Structurally broken input, found before training starts."""


class BadSample(Exception):
    """One unusable sample. ``kind`` is a short fixed label used to group skips; ``detail`` says more."""

    def __init__(self, kind: str, detail: str = "") -> None:
        super().__init__(f"{kind}: {detail}" if detail else kind)
        self.kind = kind
        self.detail = detail


def skipped_item(index: int, path: str, error: BadSample) -> dict[str, Any]:
    """The dict a dataset returns instead of a sample it had to skip."""
    return {"skipped": True, "index": int(index), "path": str(path), "reason": str(error)}


def pad_item(index: int) -> dict[str, Any]:
    """The dict a dataset returns for a sampler padding index (dropped silently by the collators)."""
    return {"pad": True, "index": int(index)}


def reason_kind(reason: str) -> str:
    """The grouping label of a skip reason ("missing file: /x.jpg" -> "missing file")."""
    return reason.split(":", 1)[0]
