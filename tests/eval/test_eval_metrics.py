"""Recall@K from hand-built score matrices: known ranks, several captions per image, ties, top-k lists."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vlp.eval import METRIC_KEYS, TopK, metrics_from_ranks, ranks, recall_at_k
from vlp.eval.metrics import stable_topk

# Image 0 has captions 0 and 3, image 1 caption 1, image 2 captions 2, 4, 5.
IMG2TXT = [[0, 3], [1], [2, 4, 5]]
TXT2IMG = [0, 1, 2, 0, 2, 2]
SCORES_I2T = np.array(
    [
        [0.1, 0.9, 0.3, 0.5, 0.2, 0.0],  # order 1,3,2,4,0,5: caption 3 at rank 2, caption 0 at 5 -> 2
        [0.5, 0.5, 0.5, 0.1, 0.1, 0.1],  # three-way tie: caption 0 wins (smaller index) -> caption 1 at rank 2
        [0.2, 0.1, 0.7, 0.1, 0.6, 0.7],  # captions 2 and 5 tie at 0.7: the ground truth 2 wins -> rank 1
    ]
)
SCORES_T2I = np.array(
    [
        [0.2, 0.8, 0.1],  # caption 0 -> image 0 at rank 2
        [0.3, 0.3, 0.3],  # tie: image 0 ahead of image 1 -> rank 2
        [0.9, 0.1, 0.5],  # -> rank 2
        [0.4, 0.3, 0.2],  # -> rank 1
        [0.1, 0.2, 0.3],  # -> rank 1
        [0.5, 0.6, 0.4],  # -> rank 3
    ]
)
TR_RANKS, IR_RANKS = [2, 2, 1], [2, 2, 2, 1, 1, 3]


def naive_ranks(scores: np.ndarray, positives) -> list[int]:
    """Reference: sort each row by (-score, index) with Python's sorted, take the best positive's position."""
    out = []
    for row, pos in zip(scores, positives):
        order = sorted(range(len(row)), key=lambda j: (-row[j], j))
        out.append(min(order.index(int(p)) for p in np.atleast_1d(pos)) + 1)
    return out


def test_hand_built_ranks_with_ties():
    assert ranks(SCORES_I2T, IMG2TXT).tolist() == TR_RANKS
    assert ranks(SCORES_T2I, np.array(TXT2IMG)[:, None]).tolist() == IR_RANKS


def test_hand_built_metrics():
    metrics = recall_at_k(SCORES_I2T, SCORES_T2I, IMG2TXT, TXT2IMG)
    assert list(metrics) == list(METRIC_KEYS)
    expected = {
        "tr@1": 100 / 3,
        "tr@5": 100.0,
        "tr@10": 100.0,
        "ir@1": 100 * 2 / 6,
        "ir@5": 100.0,
        "ir@10": 100.0,
        "tr_mean_rank": 5 / 3,
        "ir_mean_rank": 11 / 6,
        "tr_median_rank": 2.0,
        "ir_median_rank": 2.0,
    }
    for key, value in expected.items():
        assert metrics[key] == pytest.approx(value), key
    assert metrics["tr_mean"] == pytest.approx((100 / 3 + 200) / 3)
    assert metrics["r_mean"] == pytest.approx((metrics["tr_mean"] + metrics["ir_mean"]) / 2)


def test_transpose_default_and_prefix():
    # scores_t2i=None uses the transpose of scores_i2t.
    metrics = recall_at_k(SCORES_I2T, None, IMG2TXT, TXT2IMG, prefix="itc_")
    expected = recall_at_k(SCORES_I2T, SCORES_I2T.T, IMG2TXT, TXT2IMG)
    assert metrics == {"itc_" + k: v for k, v in expected.items()}


def planted_scores(rank_per_query: list[int], n_cand: int, seed: int) -> tuple[np.ndarray, list[int]]:
    """Distinct scores with the ground truth (a random candidate) at the given rank of every row."""
    rng = np.random.default_rng(seed)
    scores, gts = np.zeros((len(rank_per_query), n_cand)), []
    for q, rank in enumerate(rank_per_query):
        order = rng.permutation(n_cand)  # order[r] is the candidate at rank r + 1
        scores[q, order] = np.linspace(1.0, 0.0, n_cand)
        gts.append(int(order[rank - 1]))
    return scores, gts


def test_recall_at_each_cutoff():
    planted = [1, 3, 5, 6, 10, 11, 20]
    scores, gts = planted_scores(planted, n_cand=30, seed=0)
    assert ranks(scores, np.array(gts)[:, None]).tolist() == planted
    metrics = metrics_from_ranks(np.array(planted), np.array(planted))
    assert metrics["tr@1"] == pytest.approx(100 / 7)
    assert metrics["tr@5"] == pytest.approx(300 / 7)
    assert metrics["ir@10"] == pytest.approx(500 / 7)
    assert metrics["tr_median_rank"] == 6.0
    assert metrics["ir_mean_rank"] == pytest.approx(56 / 7)


@pytest.mark.parametrize("seed", range(5))
def test_parity_with_naive_reference(seed):
    # Small integer scores: many ties, several captions per image with uneven counts.
    rng = np.random.default_rng(seed)
    n_img = 9
    counts = rng.integers(1, 5, size=n_img)
    txt2img = np.repeat(np.arange(n_img), counts)
    img2txt = [np.flatnonzero(txt2img == i) for i in range(n_img)]
    scores = rng.integers(0, 4, size=(n_img, len(txt2img))).astype(np.float32)
    assert ranks(scores, img2txt).tolist() == naive_ranks(scores, img2txt)
    assert ranks(scores.T, txt2img[:, None]).tolist() == naive_ranks(scores.T, txt2img)
    # Torch input gives the same.
    assert ranks(torch.from_numpy(scores), img2txt).tolist() == naive_ranks(scores, img2txt)


def shuffled_topk(scores: np.ndarray, k: int, seed: int) -> TopK:
    """The true top-k under (-score, index), each row shuffled (ranking must not rely on row order)."""
    rng = np.random.default_rng(seed)
    order = np.array([sorted(range(len(r)), key=lambda j: (-r[j], j))[:k] for r in scores])
    for row in order:
        rng.shuffle(row)
    return TopK(order, np.take_along_axis(scores, order, axis=1), num_candidates=scores.shape[1])


def test_topk_lists_match_dense_within_k():
    rng = np.random.default_rng(1)
    txt2img = np.repeat(np.arange(12), 3)
    img2txt = [np.flatnonzero(txt2img == i) for i in range(12)]
    scores = rng.integers(0, 6, size=(12, 36)).astype(np.float64)  # ties everywhere
    dense = ranks(scores, img2txt)
    topk = ranks(shuffled_topk(scores, 10, seed=2), img2txt)
    # Inside the list: exact ranks; outside: k + 1.
    np.testing.assert_array_equal(topk, np.minimum(dense, 11))
    full = recall_at_k(shuffled_topk(scores, 36, 3), shuffled_topk(scores.T, 12, 4), img2txt, txt2img)
    assert full == recall_at_k(scores, scores.T, img2txt, txt2img)


def test_topk_outside_gets_k_plus_one():
    scores, gts = planted_scores([2, 7, 12], n_cand=20, seed=3)
    topk = shuffled_topk(scores, 10, seed=0)
    assert ranks(topk, np.array(gts)[:, None]).tolist() == [2, 7, 11]


def test_topk_too_short_for_recall_at_10():
    scores, gts = planted_scores([1, 2], n_cand=20, seed=0)
    with pytest.raises(ValueError, match="recall@10 needs top-k lists with k >= 10"):
        ranks(shuffled_topk(scores, 5, 0), np.array(gts)[:, None], max_recall_at=10)
    # Complete lists (k equals the number of candidates) are fine even when short.
    small, small_gts = planted_scores([1, 3], n_cand=4, seed=0)
    assert ranks(shuffled_topk(small, 4, 0), np.array(small_gts)[:, None], max_recall_at=10).tolist() == [1, 3]


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="caption 3 appears 2 times"):
        recall_at_k(SCORES_I2T, SCORES_T2I, [[0, 3, 3], [1], [2, 4, 5]], TXT2IMG)
    with pytest.raises(ValueError, match="image 1 has no ground-truth caption"):
        recall_at_k(SCORES_I2T, SCORES_T2I, [[0, 3], [], [2, 4, 5, 1]], TXT2IMG)
    with pytest.raises(ValueError, match=r"img2txt\[0\] lists caption 1 but txt2img\[1\] = 1"):
        recall_at_k(SCORES_I2T, SCORES_T2I, [[0, 1], [3], [2, 4, 5]], TXT2IMG)
    nan = SCORES_I2T.copy()
    nan[0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        recall_at_k(nan, SCORES_T2I, IMG2TXT, TXT2IMG)
    with pytest.raises(ValueError, match="same candidate twice"):
        ranks(TopK(np.array([[1, 1]]), np.array([[0.5, 0.4]])), [[1]])
    with pytest.raises(ValueError, match="queries"):
        ranks(SCORES_I2T[:2], IMG2TXT)


def test_stable_topk_breaks_ties_by_index_across_the_cut():
    scores = torch.tensor([[1.0, 3.0, 3.0, 2.0, 3.0], [0.5, 0.1, 0.9, 0.9, 0.2]])
    expected = {1: [[1], [2]], 2: [[1, 2], [2, 3]], 3: [[1, 2, 4], [2, 3, 0]], 4: [[1, 2, 4, 3], [2, 3, 0, 4]]}
    for k, want in expected.items():
        indices, values = stable_topk(scores, k)
        assert indices.tolist() == want, k
        assert torch.equal(values, scores.gather(1, indices))
    # Random integer scores (many ties) against the naive order.
    rng = np.random.default_rng(0)
    dense = rng.integers(0, 3, size=(20, 15)).astype(np.float32)
    indices, _ = stable_topk(torch.from_numpy(dense), 6)
    naive = [sorted(range(15), key=lambda j: (-row[j], j))[:6] for row in dense]
    assert indices.tolist() == naive
