"""Typed configuration of retrieval evaluation (the ``eval:`` section of ``configs/eval.yaml``)."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

SCORES = ("itm", "itm_plus_itc", "itm_prob", "itm_logp_plus_itc_logit")
AUTOCAST_DTYPES = ("bfloat16", "float16")


@dataclass
class RetrievalConfig:
    """How retrieval is evaluated; every count is per process.

    ``score`` is the final re-ranking score of a pair: ``itm`` the ITM match logit (ALBEF), ``itm_plus_itc``
    that logit plus the ITC cosine similarity (BLIP), ``itm_prob`` the ITM match probability,
    ``itm_logp_plus_itc_logit`` the ITM log-probability of a match plus the ITC logit (cosine / temperature): the
    product of both heads' probabilities, where the cosine alone is too small to count next to a logit.
    """

    k: int = 128  # ITC candidates re-ranked per query, both directions (ALBEF/BLIP: 128 Flickr30k, 256 COCO)
    score: str = "itm"
    batch_size: int = 64  # images or captions per encoder forward
    rerank_batch_size: int = 256  # (image, caption) pairs per fusion forward, packed across queries
    chunk_size: int = 1024  # query rows per ITC similarity chunk (bounds the (chunk, N) similarity block)
    report_samples: int = 8  # queries per direction shown in report.html
    autocast: bool = True  # mixed precision on CUDA (ignored on CPU)
    autocast_dtype: str = "bfloat16"

    def validate(self) -> None:
        """Raise ``ValueError`` naming the ``eval.*`` key to change."""
        checks = [
            (self.k >= 1, f"eval.k must be >= 1, got {self.k}"),
            (self.score in SCORES, f"eval.score must be one of {', '.join(SCORES)}; got {self.score!r}"),
            (self.batch_size >= 1, f"eval.batch_size must be >= 1, got {self.batch_size}"),
            (self.rerank_batch_size >= 1, f"eval.rerank_batch_size must be >= 1, got {self.rerank_batch_size}"),
            (self.chunk_size >= 1, f"eval.chunk_size must be >= 1, got {self.chunk_size}"),
            (self.report_samples >= 0, f"eval.report_samples must be >= 0, got {self.report_samples}"),
            (
                self.autocast_dtype in AUTOCAST_DTYPES,
                f"eval.autocast_dtype must be one of {', '.join(AUTOCAST_DTYPES)}; got {self.autocast_dtype!r}",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    @classmethod
    def from_dict(cls, values: dict[str, Any] | None) -> RetrievalConfig:
        """Build from a plain mapping (e.g. an OmegaConf section), rejecting unknown keys by name."""
        values = dict(values or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown key eval.{unknown[0]}; expected one of {', '.join(sorted(known))}")
        cfg = cls(**values)
        cfg.validate()
        return cfg
