"""Loss values against hand-computed numbers and hand-written references."""

import math

import pytest
import torch
import torch.nn.functional as F

from vlp.losses import itc_loss, itm_loss, sample_hard_negatives, soft_cross_entropy


def normalized(*shape, seed=0):
    return F.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed)), dim=-1)


# ----- the classic worked cross-entropy examples, exact values ---------------------------------------------------


def test_binary_cross_entropy_worked_examples():
    probs, labels = torch.tensor([0.95, 0.10]), torch.tensor([1.0, 1.0])
    losses = F.binary_cross_entropy(probs, labels, reduction="none")
    assert losses[0].item() == pytest.approx(0.0513, abs=5e-5)
    assert losses[1].item() == pytest.approx(2.3026, abs=5e-5)
    assert losses[0].item() == pytest.approx(-math.log(0.95), rel=1e-6)


def test_softmax_cross_entropy_worked_examples():
    logits, labels = torch.tensor([[0.2, 2.3], [1.5, 0.3]]), torch.tensor([1, 0])
    per_row = F.cross_entropy(logits, labels, reduction="none")
    assert per_row[0].item() == pytest.approx(0.1155, abs=5e-5)
    assert per_row[1].item() == pytest.approx(0.2633, abs=5e-5)
    # The exact batch mean; the widely copied 0.164 comes from rounding the probabilities to 0.9 / 0.8.
    assert itm_loss(logits, labels).item() == pytest.approx(0.1894, abs=5e-5)
    assert itm_loss(logits, labels).item() != pytest.approx(0.164, abs=5e-3)
    one_hot = F.one_hot(labels, 2).float()
    assert torch.allclose(soft_cross_entropy(logits, one_hot), per_row)


# ----- ITC --------------------------------------------------------------------------------------------------------


def reference_itc(image_feat, text_feat, temperature, image_ids):
    """Written from the formula, loop by loop: mean over rows of -sum_j t_ij log softmax(s_i)_j, both directions."""
    sim = image_feat @ text_feat.t() / temperature
    total = 0.0
    for direction in (sim, sim.t()):
        for i in range(direction.shape[0]):
            positives = [j for j in range(direction.shape[1]) if image_ids[i] == image_ids[j]]
            log_probs = direction[i] - torch.logsumexp(direction[i], dim=0)
            total += -sum(log_probs[j] for j in positives) / len(positives) / direction.shape[0]
    return total / 2


@pytest.mark.parametrize("ids", [None, [0, 1, 2, 3, 4, 5], [0, 0, 1, 2, 2, 2]])
def test_itc_matches_reference(ids):
    image_feat, text_feat = normalized(6, 8, seed=1), normalized(6, 8, seed=2)
    image_ids = torch.tensor(ids) if ids is not None else None
    reference = reference_itc(image_feat, text_feat, 0.07, ids or list(range(6)))
    assert itc_loss(image_feat, text_feat, 0.07, image_ids).item() == pytest.approx(reference.item(), rel=1e-5)


def test_itc_another_caption_of_the_same_image_is_a_positive():
    # Pairs 0 and 1 are two views/captions of image 7, pair 2 is image 9; every text matches its own view.
    image_feat = torch.eye(4)[[0, 3, 1]]
    text_feat = torch.eye(4)[[0, 3, 1]]
    # With ids, row 0 (logits [1, 0, 0]) has targets {0, 1}: loss = log(e + 2) - (1 + 0) / 2. Without ids the
    # other caption is a negative and row 0 costs log(e + 2) - 1. Both directions are symmetric here.
    lse = math.log(math.e + 2)
    with_ids = itc_loss(image_feat, text_feat, 1.0, torch.tensor([7, 7, 9])).item()
    without_ids = itc_loss(image_feat, text_feat, 1.0).item()
    assert with_ids == pytest.approx(((lse - 0.5) * 2 + (lse - 1)) / 3, rel=1e-6)
    assert without_ids == pytest.approx(lse - 1, rel=1e-6)


def test_temperature_is_applied_exactly_once():
    image_feat, text_feat = normalized(4, 8, seed=4), normalized(4, 8, seed=5)
    sim = image_feat @ text_feat.t()
    labels = torch.arange(4)
    expected = (F.cross_entropy(sim / 0.05, labels) + F.cross_entropy(sim.t() / 0.05, labels)) / 2
    assert itc_loss(image_feat, text_feat, torch.tensor(0.05)).item() == pytest.approx(expected.item(), rel=1e-6)


# ----- hard negatives ---------------------------------------------------------------------------------------------


def test_sampler_never_returns_a_positive():
    gen = torch.Generator().manual_seed(0)
    for trial in range(200):
        size = 2 + trial % 15
        ids = torch.randint(0, max(2, size // 2), (size,), generator=gen)
        sim = torch.randn(size, size, generator=gen) * 5
        neg_text, neg_image = (neg[:, 0] for neg in sample_hard_negatives(sim, ids, generator=gen))
        for neg in (neg_text, neg_image):
            has = neg >= 0
            assert (ids[has] != ids[neg[has]]).all()
            # A row lacks a negative exactly when every id in the batch equals its own.
            assert torch.equal(~has, (ids[:, None] == ids[None, :]).all(dim=1))


def test_sampler_follows_softmax_over_valid_negatives():
    sim = torch.tensor([[3.0, 1.0, 2.0, 0.0], [0.5, 1.0, -1.0, 2.0], [0.0, 0.0, 1.0, 0.0], [1.0, 2.0, 3.0, 4.0]])
    ids = torch.tensor([0, 1, 0, 2])
    draws = 40000
    gen = torch.Generator().manual_seed(1)
    counts_text = torch.zeros(4, 4)
    counts_image = torch.zeros(4, 4)
    big_sim, big_ids = sim.repeat(1, 1), ids
    for _ in range(draws // 100):
        batch_text = torch.stack([sample_hard_negatives(big_sim, big_ids, generator=gen)[0][:, 0] for _ in range(100)])
        batch_image = torch.stack([sample_hard_negatives(big_sim, big_ids, generator=gen)[1][:, 0] for _ in range(100)])
        counts_text += F.one_hot(batch_text, 4).sum(0).float()
        counts_image += F.one_hot(batch_image, 4).sum(0).float()
    invalid = ids[:, None] == ids[None, :]
    expected_text = sim.masked_fill(invalid, float("-inf")).softmax(dim=1)
    expected_image = sim.t().masked_fill(invalid, float("-inf")).softmax(dim=1)
    assert torch.allclose(counts_text / draws, expected_text, atol=0.015)
    assert torch.allclose(counts_image / draws, expected_image, atol=0.015)


@pytest.mark.parametrize("ids", [torch.tensor([5]), torch.tensor([3, 3, 3, 3])])
def test_sampler_rows_without_negatives_give_minus_one(ids):
    sim = torch.randn(len(ids), len(ids))
    neg_text, neg_image = sample_hard_negatives(sim, ids)
    assert neg_text.shape == neg_image.shape == (len(ids), 1)
    assert (neg_text == -1).all() and (neg_image == -1).all()


def test_sampler_survives_non_finite_similarities():
    sim = torch.tensor([[float("nan"), 1.0], [float("inf"), 0.0]])
    neg_text, neg_image = sample_hard_negatives(sim)
    assert neg_text.tolist() == [[1], [0]] and neg_image.tolist() == [[1], [0]]


def test_several_negatives_are_distinct_valid_and_padded_with_minus_one():
    gen = torch.Generator().manual_seed(0)
    ids = torch.tensor([0, 0, 1, 2, 3])  # rows 0 and 1 have 3 valid candidates, the others 4
    for _ in range(50):
        sim = torch.randn(5, 5, generator=gen) * 3
        neg_text, neg_image = sample_hard_negatives(sim, ids, generator=gen, num_negatives=4)
        for neg in (neg_text, neg_image):
            assert neg.shape == (5, 4)
            for row in range(5):
                drawn = neg[row][neg[row] >= 0]
                valid = (ids != ids[row]).sum().item()
                assert len(drawn) == valid and len(set(drawn.tolist())) == valid  # every valid one, once
                assert (ids[drawn] != ids[row]).all()
                assert (neg[row][valid:] == -1).all()  # the slots left over
    # More draws than the batch has columns.
    assert sample_hard_negatives(torch.zeros(2, 2), num_negatives=3)[0].tolist() == [[1, -1, -1], [0, -1, -1]]
    with pytest.raises(ValueError, match="num_negatives"):
        sample_hard_negatives(torch.zeros(2, 2), num_negatives=0)


def test_first_of_several_negatives_follows_the_softmax():
    # Gumbel top-k: the first draw of k is exactly a single softmax draw.
    sim = torch.tensor([[0.0, 2.0, 1.0, -1.0]]).repeat(4, 1).fill_diagonal_(0.0)
    sim[0] = torch.tensor([0.0, 2.0, 1.0, -1.0])
    gen = torch.Generator().manual_seed(3)
    firsts = torch.cat([sample_hard_negatives(sim, generator=gen, num_negatives=2)[0][:1, 0] for _ in range(20000)])
    expected = torch.tensor([2.0, 1.0, -1.0]).softmax(dim=0)
    observed = torch.bincount(firsts, minlength=4)[1:].float() / firsts.numel()
    assert torch.allclose(observed, expected, atol=0.015)
