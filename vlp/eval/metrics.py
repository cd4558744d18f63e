"""Recall@K for image-text retrieval (the ALBEF/BLIP protocol), from dense score matrices or top-k lists.

Ranking rule, the same everywhere in ``vlp.eval``: a query's candidates are ordered by descending score and
ties by ascending candidate index, i.e. the order of a stable sort on ``(-score, index)``. A ground truth
therefore wins a tie only against candidates with a larger index. Ranks are 1-based.

* TR (text retrieval, image query): rank of the best-ranked of the image's ground-truth captions.
* IR (image retrieval, text query): rank of the caption's one image.

Top-k lists (:class:`TopK`) hold only the k best candidates of every query; a ground truth absent from a list
gets rank ``k + 1``. Recall@r for r > k is then unknown and raises, unless the lists are complete. Mean and
median ranks from top-k lists are those of ranks clipped at ``k + 1`` (lower bounds of the true ones).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

RECALL_AT = (1, 5, 10)
METRIC_KEYS = (
    "tr@1",
    "tr@5",
    "tr@10",
    "ir@1",
    "ir@5",
    "ir@10",
    "tr_mean",
    "ir_mean",
    "r_mean",
    "tr_mean_rank",
    "ir_mean_rank",
    "tr_median_rank",
    "ir_median_rank",
)
# Comparisons (rows x positives x candidates) evaluated at once when ranking dense scores (a few MB of booleans).
_RANK_BLOCK_ELEMENTS = 1 << 22


@dataclass(frozen=True)
class TopK:
    """The best ``k`` candidates of every query: ``indices`` and ``scores``, both (Q, k).

    Rows need not be sorted; they are ordered by ``(-score, index)`` before ranking. ``num_candidates`` (the
    size of the candidate set) marks lists that are complete when ``k == num_candidates``.
    """

    indices: np.ndarray | torch.Tensor
    scores: np.ndarray | torch.Tensor
    num_candidates: int | None = None

    @property
    def k(self) -> int:
        return int(self.indices.shape[1])


# ---------------------------------------------------------------------------------------------------------------
# Ground truth
# ---------------------------------------------------------------------------------------------------------------


def check_ground_truth(img2txt: Sequence[Sequence[int]], txt2img: Sequence[int]) -> None:
    """Raise ``ValueError`` unless ``img2txt`` and ``txt2img`` describe the same image-caption pairs."""
    txt2img = np.asarray(txt2img, dtype=np.int64)
    n_img, n_txt = len(img2txt), len(txt2img)
    if txt2img.ndim != 1:
        raise ValueError(f"txt2img must be one image index per caption, got shape {txt2img.shape}")
    if n_txt and (txt2img.min() < 0 or txt2img.max() >= n_img):
        raise ValueError(f"txt2img holds image indices outside [0, {n_img}) (len(img2txt) = {n_img})")

    # Every caption listed exactly once, under the image that txt2img names.
    seen = np.zeros(n_txt, dtype=np.int64)
    for image, captions in enumerate(img2txt):
        captions = np.asarray(captions, dtype=np.int64).reshape(-1)
        if captions.size == 0:
            raise ValueError(f"image {image} has no ground-truth caption in img2txt; TR rank is undefined")
        if captions.min() < 0 or captions.max() >= n_txt:
            raise ValueError(f"img2txt[{image}] holds caption indices outside [0, {n_txt}) (len(txt2img))")
        wrong = captions[txt2img[captions] != image]
        if wrong.size:
            raise ValueError(f"img2txt[{image}] lists caption {wrong[0]} but txt2img[{wrong[0]}] = {txt2img[wrong[0]]}")
        np.add.at(seen, captions, 1)
    if n_txt and (seen != 1).any():
        caption = int(np.flatnonzero(seen != 1)[0])
        raise ValueError(f"caption {caption} appears {seen[caption]} times in img2txt (expected once)")


def pad_positives(positives: Sequence[Sequence[int]] | np.ndarray, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Ragged ground-truth lists as a (Q, G) index tensor padded with 0 and a (Q, G) validity mask."""
    rows = [np.asarray(p, dtype=np.int64).reshape(-1) for p in positives]
    width = max((len(r) for r in rows), default=1)
    index = np.zeros((len(rows), max(width, 1)), dtype=np.int64)
    valid = np.zeros_like(index, dtype=bool)
    for q, row in enumerate(rows):
        index[q, : len(row)], valid[q, : len(row)] = row, True
    return torch.from_numpy(index).to(device), torch.from_numpy(valid).to(device)


# ---------------------------------------------------------------------------------------------------------------
# Ranks
# ---------------------------------------------------------------------------------------------------------------


def _as_tensor(x: np.ndarray | torch.Tensor) -> torch.Tensor:
    return x if isinstance(x, torch.Tensor) else torch.from_numpy(np.asarray(x))


def dense_ranks(scores: torch.Tensor, pos: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """1-based rank (Q,) of the best-ranked positive of every row of ``scores`` (Q, C); ``pos``/``valid`` (Q, G).

    A candidate's rank is 1 + the number of candidates ahead of it under the ``(-score, index)`` order.
    """
    if torch.isnan(scores).any():
        raise ValueError("retrieval scores contain NaN; ranks would be undefined")
    n_q, n_c = scores.shape
    pos, valid = pos.to(scores.device), valid.to(scores.device)
    columns = torch.arange(n_c, device=scores.device)
    out = torch.empty(n_q, dtype=torch.long, device=scores.device)

    # Blocks of rows keep the (rows, G, C) comparison tensors bounded.
    block = max(1, _RANK_BLOCK_ELEMENTS // max(1, pos.shape[1] * n_c))
    for start in range(0, n_q, block):
        s, p, v = scores[start : start + block], pos[start : start + block], valid[start : start + block]
        pos_score = s.gather(1, p)[:, :, None]  # (b, G, 1) scores of the positives
        ahead = (s[:, None, :] > pos_score).count_nonzero(-1)  # (b, 1, C) vs (b, G, 1) -> (b, G)
        tied_ahead = ((s[:, None, :] == pos_score) & (columns < p[:, :, None])).count_nonzero(-1)  # (b, G)
        rank = (ahead + tied_ahead + 1).masked_fill(~v, n_c + 1)
        out[start : start + block] = rank.min(dim=1).values
    return out


def sort_topk(indices: torch.Tensor, scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Order every row of (Q, k) top-k lists by ``(-score, index)``: a stable sort by index, then by score."""
    by_index = indices.argsort(dim=1, stable=True)
    indices, scores = indices.gather(1, by_index), scores.gather(1, by_index)  # (Q, k)
    by_score = scores.argsort(dim=1, descending=True, stable=True)
    return indices.gather(1, by_score), scores.gather(1, by_score)  # (Q, k)


def stable_topk(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices and scores (Q, k) of the k best candidates of every row of ``scores`` (Q, C), best first.

    The ``(-score, index)`` order decides ties, also across the cut (``torch.topk`` keeps an unspecified one).
    """
    values, indices = scores.topk(k, dim=1)  # (Q, k)
    straddles = (scores >= values[:, -1:]).count_nonzero(dim=1) > k  # rows with ties across the cut
    if straddles.any():
        rows = straddles.nonzero().squeeze(1)
        order = scores[rows].argsort(dim=1, descending=True, stable=True)[:, :k]  # (r, k): smaller index first
        indices[rows], values[rows] = order, scores[rows].gather(1, order)
    return sort_topk(indices, values)


def topk_ranks(
    indices: torch.Tensor, pos: torch.Tensor, valid: torch.Tensor, fallback: torch.Tensor | None = None
) -> torch.Tensor:
    """1-based rank (Q,) of the best positive in lists (Q, k) already sorted best first.

    A query with no positive in its list gets ``fallback`` (its rank in the full ordering, when known) or k + 1.
    """
    n_q, k = indices.shape
    pos, valid = pos.to(indices.device), valid.to(indices.device)
    hit = ((indices[:, :, None] == pos[:, None, :]) & valid[:, None, :]).any(-1)  # (Q, k, G) -> (Q, k)
    found = hit.any(dim=1)
    first = hit.to(torch.int8).argmax(dim=1) + 1  # position of the first hit; 1 when there is none
    missing = torch.full_like(first, k + 1) if fallback is None else fallback.to(first.device, torch.long)
    return torch.where(found, first, missing)


def _check_topk(topk: TopK, n_queries: int) -> tuple[torch.Tensor, torch.Tensor]:
    indices, scores = _as_tensor(topk.indices).long(), _as_tensor(topk.scores)
    if indices.shape != scores.shape or indices.dim() != 2 or indices.shape[0] != n_queries:
        raise ValueError(
            f"top-k lists must be (queries, k) with {n_queries} queries; got indices {tuple(indices.shape)}, "
            f"scores {tuple(scores.shape)}"
        )
    if torch.isnan(scores).any():
        raise ValueError("retrieval scores contain NaN; ranks would be undefined")
    ordered = indices.sort(dim=1).values
    if (ordered[:, 1:] == ordered[:, :-1]).any():
        raise ValueError("a top-k list names the same candidate twice")
    return indices, scores


def ranks(
    scores: np.ndarray | torch.Tensor | TopK, positives: Sequence[Sequence[int]] | np.ndarray, max_recall_at: int = 0
) -> np.ndarray:
    """1-based ranks (Q,) of the best positive per query, from dense scores (Q, C) or :class:`TopK` lists."""
    pos, valid = pad_positives(positives)
    if isinstance(scores, TopK):
        indices, values = _check_topk(scores, len(pos))
        complete = scores.num_candidates is not None and scores.k >= scores.num_candidates
        if max_recall_at > scores.k and not complete:
            raise ValueError(f"recall@{max_recall_at} needs top-k lists with k >= {max_recall_at}, got k={scores.k}")
        indices, _ = sort_topk(indices, values)
        return topk_ranks(indices, pos, valid).numpy()
    scores = _as_tensor(scores)
    if scores.dim() != 2 or scores.shape[0] != len(pos):
        raise ValueError(f"scores must be (queries, candidates) with {len(pos)} queries, got {tuple(scores.shape)}")
    return dense_ranks(scores, pos, valid).cpu().numpy()


# ---------------------------------------------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------------------------------------------


def metrics_from_ranks(tr_ranks: np.ndarray, ir_ranks: np.ndarray, prefix: str = "") -> dict[str, float]:
    """Recall@1/5/10 in percent, their means, and mean/median ranks, under the keys of :data:`METRIC_KEYS`."""
    tr_ranks, ir_ranks = np.asarray(tr_ranks, dtype=np.float64), np.asarray(ir_ranks, dtype=np.float64)
    if tr_ranks.size == 0 or ir_ranks.size == 0:
        raise ValueError("retrieval metrics need at least one image and one caption")
    out = {}
    for name, r in (("tr", tr_ranks), ("ir", ir_ranks)):
        for at in RECALL_AT:
            out[f"{name}@{at}"] = 100.0 * float((r <= at).mean())
        out[f"{name}_mean"] = float(np.mean([out[f"{name}@{at}"] for at in RECALL_AT]))
        out[f"{name}_mean_rank"] = float(r.mean())
        out[f"{name}_median_rank"] = float(np.median(r))
    out["r_mean"] = (out["tr_mean"] + out["ir_mean"]) / 2
    return {prefix + key: out[key] for key in METRIC_KEYS}


def recall_at_k(
    scores_i2t: np.ndarray | torch.Tensor | TopK,
    scores_t2i: np.ndarray | torch.Tensor | TopK | None,
    img2txt: Sequence[Sequence[int]],
    txt2img: Sequence[int] | np.ndarray,
    prefix: str = "",
) -> dict[str, float]:
    """Standard retrieval metrics (see the module docstring for ranks and ties).

    ``scores_i2t``: dense (N_img, N_txt) or :class:`TopK` lists of caption indices per image.
    ``scores_t2i``: dense (N_txt, N_img) or :class:`TopK` lists of image indices per caption; ``None`` uses the
    transpose of a dense ``scores_i2t``. Returns ``tr@1/5/10``, ``ir@1/5/10`` (percent), ``tr_mean``, ``ir_mean``,
    ``r_mean``, and ``tr/ir_mean_rank``, ``tr/ir_median_rank``, each key prefixed with ``prefix``.
    """
    check_ground_truth(img2txt, txt2img)
    if scores_t2i is None:
        if isinstance(scores_i2t, TopK):
            raise ValueError("scores_t2i=None needs dense scores_i2t (it is then transposed)")
        scores_t2i = _as_tensor(scores_i2t).t()
    tr = ranks(scores_i2t, img2txt, max_recall_at=max(RECALL_AT))
    ir = ranks(scores_t2i, np.asarray(txt2img, dtype=np.int64)[:, None], max_recall_at=max(RECALL_AT))
    return metrics_from_ranks(tr, ir, prefix=prefix)
