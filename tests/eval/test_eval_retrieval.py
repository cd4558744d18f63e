"""The ITC + ITM retrieval evaluator against naive full scoring of every pair with ``model.itm_logits``."""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
import pytest
import torch
from eval_fixtures import TinyRetrievalSet, tiny_config, tiny_model
from test_eval_metrics import naive_ranks

from vlp.eval import METRIC_KEYS, RetrievalConfig, RetrievalEvaluator, recall_at_k, run_retrieval
from vlp.model import VLPModel


def loader(ds, batch_size=5):
    return torch.utils.data.DataLoader(ds, batch_size=batch_size)


@lru_cache(maxsize=4)
def setup(n_images: int = 12, captions: int = 3):
    return tiny_model(seed=0), TinyRetrievalSet(n_images, captions, seed=1)


@torch.no_grad()
def naive_scores(model: VLPModel, ds: TinyRetrievalSet, score: str) -> dict[str, np.ndarray]:
    """Dense (N_img, N_txt) ITC similarities and final scores, every pair scored directly, image by image."""
    tok = model.tokenizer(ds.texts, padding="longest", truncation=True, max_length=16, return_tensors="pt")
    image_embeds, image_feat = model.encode_image(ds.images)
    text_embeds, text_feat = model.encode_text(tok.input_ids, tok.attention_mask)
    n_txt = len(ds.texts)
    logits = torch.stack(
        [
            model.itm_logits(
                text_embeds, tok.attention_mask, image_embeds=image_embeds[i : i + 1].expand(n_txt, -1, -1)
            )
            for i in range(image_embeds.shape[0])
        ]
    ).double()  # (N_img, N_txt, 2)
    itc = (image_feat @ text_feat.t()).double()  # (N_img, N_txt)
    final = {
        "itm": logits[..., 1],
        "itm_prob": logits.softmax(-1)[..., 1],
        "itm_plus_itc": logits[..., 1] + itc,
        "itm_logp_plus_itc_logit": logits.log_softmax(-1)[..., 1] + itc / float(model.temperature()),
    }[score]
    return {"itc": itc.numpy(), "final": final.numpy()}


@pytest.mark.parametrize("score", ["itm", "itm_plus_itc", "itm_prob", "itm_logp_plus_itc_logit"])
def test_k_equal_n_matches_naive_full_itm(score):
    model, ds = setup()
    cfg = RetrievalConfig(k=10_000, score=score, rerank_batch_size=32, chunk_size=5)
    result = run_retrieval(model, loader(ds), ds.texts, ds.txt2img, ds.img2txt, cfg)
    naive = naive_scores(model, ds, score)

    # Complete lists: the same scores for every pair, and the same metrics as dense naive scoring.
    assert result.i2t.indices.shape == (12, 36) and result.t2i.indices.shape == (36, 12)
    np.testing.assert_allclose(result.i2t.scores, np.take_along_axis(naive["final"], result.i2t.indices, 1), atol=1e-5)
    np.testing.assert_allclose(
        result.t2i.scores, np.take_along_axis(naive["final"].T, result.t2i.indices, 1), atol=1e-5
    )
    assert {k: result.metrics[k] for k in METRIC_KEYS} == recall_at_k(naive["final"], None, ds.img2txt, ds.txt2img)
    itc = recall_at_k(naive["itc"], None, ds.img2txt, ds.txt2img, prefix="itc_")
    assert {k: result.metrics[k] for k in itc} == pytest.approx(itc)
    # Each distinct pair scored once, each image's keys/values computed once.
    assert result.stats == {"pairs_scored": 12 * 36, "kv_images": 12, "captions_reencoded": 36}


def test_top_k_candidates_and_fallback_ranks():
    model, ds = setup()
    k = 4
    result = run_retrieval(model, loader(ds), ds.texts, ds.txt2img, ds.img2txt, RetrievalConfig(k=k, chunk_size=7))
    naive = naive_scores(model, ds, "itm")

    # ITC candidates: the top k of the dense similarities under (-score, index), best first.
    itc_order = np.array([sorted(range(36), key=lambda j: (-row[j], j))[:k] for row in naive["itc"]])
    np.testing.assert_array_equal(result.itc_i2t.indices, itc_order)

    # Final ranks: re-ranked order inside the list; a ground truth outside it keeps its ITC rank.
    itc_tr = naive_ranks(naive["itc"], ds.img2txt)
    expected_tr = []
    for q, candidates in enumerate(itc_order):
        order = sorted(candidates, key=lambda c: (-naive["final"][q, c], c))
        hits = [pos + 1 for pos, c in enumerate(order) if c in set(ds.img2txt[q].tolist())]
        expected_tr.append(hits[0] if hits else itc_tr[q])
    assert result.tr_ranks.tolist() == expected_tr
    assert result.itc_tr_ranks.tolist() == itc_tr
    assert any(r > k for r in expected_tr)  # the fallback is exercised

    # Distinct pairs of both directions, scored once each.
    pairs = {(q, int(c)) for q, row in enumerate(result.itc_i2t.indices) for c in row}
    pairs |= {(int(i), t) for t, row in enumerate(result.itc_t2i.indices) for i in row}
    assert result.stats["pairs_scored"] == len(pairs) < 12 * 36
    assert result.stats["kv_images"] == 12
    assert result.stats["captions_reencoded"] == len({t for _, t in pairs})


def test_batch_sizes_do_not_change_results():
    model, ds = setup()
    small = RetrievalConfig(k=6, batch_size=1, rerank_batch_size=1, chunk_size=1)
    large = RetrievalConfig(k=6, batch_size=64, rerank_batch_size=4096, chunk_size=4096)
    a = run_retrieval(model, loader(ds, 1), ds.texts, ds.txt2img, ds.img2txt, small)
    b = run_retrieval(model, loader(ds, 12), ds.texts, ds.txt2img, ds.img2txt, large)
    assert a.metrics == pytest.approx(b.metrics)
    np.testing.assert_array_equal(a.i2t.indices, b.i2t.indices)
    np.testing.assert_allclose(a.t2i.scores, b.t2i.scores, atol=1e-5)


def test_itc_only_copies_itc_keys():
    model, ds = setup()
    result = run_retrieval(model, loader(ds), ds.texts, ds.txt2img, ds.img2txt, RetrievalConfig(k=4), rerank=False)
    assert sorted(result.metrics) == sorted([*METRIC_KEYS, *("itc_" + k for k in METRIC_KEYS)])
    assert all(result.metrics[k] == result.metrics["itc_" + k] for k in METRIC_KEYS)
    assert result.stats == {} and not result.reranked


def test_repeated_images_are_ignored():
    # A padding DistributedSampler repeats images: the first occurrence counts, repeats change nothing.
    model, ds = setup()
    cfg = RetrievalConfig(k=5)
    plain = run_retrieval(model, loader(ds), ds.texts, ds.txt2img, ds.img2txt, cfg)
    repeated = [{"image": ds.images[[3, 0, 3]], "index": torch.tensor([3, 0, 3])}, *loader(ds)]
    again = run_retrieval(model, repeated, ds.texts, ds.txt2img, ds.img2txt, cfg)
    assert again.metrics == plain.metrics
    assert again.stats == plain.stats


def test_evaluator_errors():
    model, ds = setup()
    evaluator = RetrievalEvaluator(model, RetrievalConfig(k=4))
    evaluator.add_images(ds.images[:5], torch.arange(5))
    with pytest.raises(ValueError, match=r"7 of 12 images were never added, e.g. index \[5, 6, 7, 8, 9\]"):
        evaluator.compute(ds.texts, ds.txt2img, ds.img2txt)
    evaluator.add_images(ds.images[:1], torch.tensor([12]))
    with pytest.raises(ValueError, match=r"indices outside \[0, 12\)"):
        evaluator.compute(ds.texts, ds.txt2img, ds.img2txt)
    with pytest.raises(ValueError, match="needs RetrievalEvaluator"):
        RetrievalEvaluator(model, rerank=False).compute(ds.texts, ds.txt2img, ds.img2txt, rerank=True)
    with pytest.raises(ValueError, match="'image' and 'index'"):
        run_retrieval(model, [{"image": ds.images}], ds.texts, ds.txt2img, ds.img2txt)
    with pytest.raises(ValueError, match="eval.score must be one of"):
        RetrievalEvaluator(model, RetrievalConfig(score="itc"))
    with pytest.raises(ValueError, match="unknown key eval.topk"):
        RetrievalConfig.from_dict({"topk": 3})
    no_itm = tiny_config()
    no_itm.itm = False
    with pytest.raises(ValueError, match="model.itm=false"):
        RetrievalEvaluator(VLPModel(no_itm))


def chance_tr(n_txt: int, captions: int, at: int) -> float:
    """P(the best of ``captions`` ground truths, placed uniformly among ``n_txt``, ranks <= at)."""
    return 1 - math.comb(n_txt - captions, at) / math.comb(n_txt, at)


def chance_tr_rank(n_txt: int, captions: int) -> tuple[float, float]:
    """Mean and standard deviation of the best rank of ``captions`` uniform positions among ``n_txt``."""
    ranks = np.arange(1, n_txt + 1)
    survive = np.array([math.comb(n_txt - r + 1, captions) for r in ranks], dtype=np.float64) / math.comb(
        n_txt, captions
    )  # P(best rank >= r)
    prob = survive - np.append(survive[1:], 0.0)
    mean = float((ranks * prob).sum())
    return mean, float(np.sqrt(((ranks - mean) ** 2 * prob).sum()))


def test_random_model_is_near_chance():
    # 100 random images, 5 random captions each: ground truth is independent of a random model, so every
    # recall is chance in expectation. The band is 4 binomial standard deviations over the 100 images (captions
    # of one image may move together, so 100 rather than 500 independent queries).
    n_img, captions = 100, 5
    model, ds = tiny_model(seed=3), TinyRetrievalSet(n_img, captions, seed=4)
    result = run_retrieval(model, loader(ds, 50), ds.texts, ds.txt2img, ds.img2txt, RetrievalConfig(k=16))
    n_txt = n_img * captions
    for prefix in ("", "itc_"):
        for at in (1, 5, 10):
            for direction, p in (("tr", chance_tr(n_txt, captions, at)), ("ir", at / n_img)):
                band = 4 * 100 * math.sqrt(p * (1 - p) / n_img)
                assert abs(result.metrics[f"{prefix}{direction}@{at}"] - 100 * p) <= band, (prefix, direction, at)
        mean, std = chance_tr_rank(n_txt, captions)
        assert abs(result.metrics[f"{prefix}tr_mean_rank"] - mean) <= 4 * std / math.sqrt(n_img)
        ir_std = math.sqrt((n_img**2 - 1) / 12)  # uniform rank on 1..n_img
        assert abs(result.metrics[f"{prefix}ir_mean_rank"] - (n_img + 1) / 2) <= 4 * ir_std / math.sqrt(n_img)


def test_nan_itm_logits_raise():
    # A broken fusion encoder must not yield silently arbitrary rankings.
    model, ds = tiny_model(seed=0), TinyRetrievalSet(4, 2, seed=1)
    with torch.no_grad():
        model.itm_head.bias.fill_(float("nan"))
    with pytest.raises(FloatingPointError, match="ITM logits contain NaN"):
        run_retrieval(model, loader(ds), ds.texts, ds.txt2img, ds.img2txt, RetrievalConfig(k=2))


def test_product_of_heads_score_is_the_itm_log_probability_plus_the_itc_logit():
    # ITM logits (0, ln 3): match probability 3/4, log 0.75 = -0.2876821; cosine 0.5 at temperature 0.1: logit 5.
    model, _ = setup()
    original = model.temp.item()
    model.temp.data.fill_(0.1)
    evaluator = RetrievalEvaluator(model, RetrievalConfig(score="itm_logp_plus_itc_logit"))
    logits = torch.tensor([[[0.0, math.log(3.0)], [2.0, 2.0]]])  # (Q=1, k=2, 2)
    scores = evaluator._final_scores(logits, torch.tensor([[0.5, 0.2]]))
    assert scores[0, 0].item() == pytest.approx(5.0 - 0.2876821, abs=1e-6)
    assert scores[0, 1].item() == pytest.approx(2.0 + math.log(0.5), abs=1e-6)
    model.temp.data.fill_(original)
