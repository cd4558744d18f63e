"""Counting, logging and summarising skipped samples.

The collators put every skipped sample into ``batch["skipped"]``; a :class:`SkipCounter` in the main process
accumulates them. Usage from a LightningModule::

    def on_train_batch_end(self, outputs, batch, batch_idx):
        self.trainer.datamodule.skip_counter.update(batch["skipped"])

    def on_train_epoch_end(self):
        summary = self.trainer.datamodule.skip_counter.log_summary(f"train epoch {self.current_epoch}")
        self.log("data/skipped", float(summary["skipped"]))
        self.trainer.datamodule.skip_counter.reset()
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable
from typing import Any

from vlp.data.errors import reason_kind

log = logging.getLogger(__name__)


class SkipCounter:
    """Accumulates skipped-sample reports; logs each (the first ``log_first`` at WARNING, the rest at DEBUG)."""

    def __init__(self, log_first: int = 20, keep_examples: int = 20) -> None:
        self.log_first, self.keep_examples = log_first, keep_examples
        self.reset()

    def reset(self) -> None:
        self.total = 0
        self.by_reason: Counter[str] = Counter()
        self.examples: list[dict[str, Any]] = []

    def update(self, skipped: Iterable[dict[str, Any]]) -> None:
        for item in skipped:
            self.total += 1
            self.by_reason[reason_kind(item["reason"])] += 1
            if len(self.examples) < self.keep_examples:
                self.examples.append(dict(item))
            level = logging.WARNING if self.total <= self.log_first else logging.DEBUG
            log.log(level, "skipped sample %s (%s): %s", item["index"], item["path"], item["reason"])

    def summary(self) -> dict[str, Any]:
        """``{"skipped": int, "by_reason": {kind: count}, "examples": [first few skipped dicts]}``."""
        return {"skipped": self.total, "by_reason": dict(self.by_reason), "examples": list(self.examples)}

    def log_summary(self, label: str = "epoch") -> dict[str, Any]:
        """Log a one-line summary (WARNING when anything was skipped) and return :meth:`summary`."""
        summary = self.summary()
        if self.total:
            reasons = ", ".join(f"{kind}: {count}" for kind, count in self.by_reason.most_common())
            log.warning("%s: skipped %d samples (%s)", label, self.total, reasons)
        else:
            log.info("%s: no sample skipped", label)
        return summary

    def state_dict(self) -> dict[str, Any]:
        return {"total": self.total, "by_reason": dict(self.by_reason), "examples": list(self.examples)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.total = int(state["total"])
        self.by_reason = Counter(state["by_reason"])
        self.examples = list(state["examples"])
