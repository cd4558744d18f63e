"""Rank-aware logging: every record carries its rank; only rank zero emits records below WARNING.

Warnings and errors from any rank still come through (tagged with the rank), so a problem on one process
is not hidden, while the info lines that all ranks would repeat identically are written once.
"""

from __future__ import annotations

import logging

from lightning.pytorch.utilities import rank_zero_only

FORMAT = "[%(asctime)s][rank %(rank)s][%(name)s][%(levelname)s] %(message)s"


class RankFilter(logging.Filter):
    """Adds ``record.rank``; drops records below WARNING on ranks other than zero."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.rank = getattr(rank_zero_only, "rank", 0)
        return record.rank == 0 or record.levelno >= logging.WARNING


def install_rank_filter(level: int = logging.INFO) -> None:
    """Attach the filter to the root handlers (Hydra's, or a new stream handler when there is none)."""
    root = logging.getLogger()
    if not root.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter(FORMAT))
        root.addHandler(handler)
    for handler in root.handlers:
        if not any(isinstance(f, RankFilter) for f in handler.filters):
            handler.addFilter(RankFilter())
    logging.getLogger("vlp").setLevel(level)
