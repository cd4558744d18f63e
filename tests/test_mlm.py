"""Image-conditioned masked language modelling: BERT's corruption, the masked-token loss, and its model wiring."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import tiny_model_config

from vlp.eval.retrieval import RetrievalEvaluator
from vlp.losses import IGNORE_INDEX, mask_tokens, mlm_loss
from vlp.model import VLPModel
from vlp.model.config import TextEncoderConfig

CAPTIONS = ["two small red circles left of a large blue square", "a green triangle above three purple diamonds"]


def make_batch(model, size=32):
    gen = torch.Generator().manual_seed(0)
    tokens = model.tokenizer(CAPTIONS, padding=True, return_tensors="pt")
    return dict(
        image=torch.randn(len(CAPTIONS), 3, size, size, generator=gen),
        input_ids=tokens.input_ids,
        attention_mask=tokens.attention_mask,
        image_id=torch.arange(len(CAPTIONS)),
    )


# ----- corruption ----------------------------------------------------------------------------------------------


def test_corruption_touches_only_maskable_tokens_and_labels_the_chosen_ones():
    gen = torch.Generator().manual_seed(0)
    input_ids = torch.randint(5, 100, (64, 20), generator=gen)
    maskable = torch.rand(64, 20, generator=gen) < 0.5
    masked_ids, labels = mask_tokens(input_ids, maskable, 4, 100, probability=0.5, generator=gen)

    chosen = labels != IGNORE_INDEX
    assert chosen.any() and not (chosen & ~maskable).any()
    assert torch.equal(labels[chosen], input_ids[chosen])
    assert torch.equal(masked_ids[~chosen], input_ids[~chosen])


def test_corruption_follows_berts_15_80_10_10_split():
    # 400k maskable tokens: every proportion below is within 4 standard deviations.
    gen = torch.Generator().manual_seed(1)
    input_ids = torch.randint(5, 1000, (1000, 400), generator=gen)
    masked_ids, labels = mask_tokens(input_ids, torch.ones_like(input_ids, dtype=torch.bool), 4, 1000, 0.15, gen)

    chosen = labels != IGNORE_INDEX
    n = chosen.sum().item()
    assert n / input_ids.numel() == pytest.approx(0.15, abs=4 * math.sqrt(0.15 * 0.85 / input_ids.numel()))
    shown = masked_ids[chosen]
    as_mask = (shown == 4).float().mean().item()
    kept = (shown == input_ids[chosen]).float().mean().item()
    # A random replacement equals the original with chance 1/1000, so "kept" is 0.1 + 0.1 / 1000.
    assert as_mask == pytest.approx(0.8, abs=4 * math.sqrt(0.8 * 0.2 / n))
    assert kept == pytest.approx(0.1001, abs=4 * math.sqrt(0.1 * 0.9 / n))


@pytest.mark.parametrize("probability", [0.0, 1.0, -0.1])
def test_corruption_rejects_a_probability_outside_the_open_unit_interval(probability):
    ids = torch.zeros(2, 3, dtype=torch.long)
    with pytest.raises(ValueError, match="masking probability"):
        mask_tokens(ids, ids.bool(), 4, 10, probability)


# ----- loss ----------------------------------------------------------------------------------------------------


def test_masked_token_loss_is_the_mean_cross_entropy_of_the_labelled_rows():
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [5.0, 5.0, 5.0]])
    labels = torch.tensor([0, 2, IGNORE_INDEX])
    # Row 0: -log(e^2 / (e^2 + 2)); row 1: -log(1 / (2 + e)); row 2 is not predicted.
    expected = (-math.log(math.exp(2) / (math.exp(2) + 2)) - math.log(1 / (2 + math.e))) / 2
    assert mlm_loss(logits, labels).item() == pytest.approx(expected, rel=1e-6)


def test_masked_token_loss_without_labels_is_zero_with_a_gradient():
    logits = torch.randn(3, 5, requires_grad=True)
    loss = mlm_loss(logits, torch.full((3,), IGNORE_INDEX))
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(logits.grad, torch.zeros(3, 5))
    empty = torch.zeros(0, 5, requires_grad=True)
    assert mlm_loss(empty, torch.zeros(0, dtype=torch.long)).item() == 0.0


# ----- model ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return VLPModel(tiny_model_config(mlm=True, mlm_probability=0.5))


def test_mlm_adds_its_loss_and_trains_the_towers_fusion_and_head(model):
    model.train()
    out = model(make_batch(model))
    out["loss"].backward()
    assert out["loss"].item() == pytest.approx((out["itc_loss"] + out["itm_loss"] + out["mlm_loss"]).item())
    # A random head over the vocabulary starts near log(V).
    assert out["mlm_loss"].item() == pytest.approx(math.log(len(model.tokenizer)), abs=1.0)
    missing = [n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.any())]
    assert missing == []
    model.zero_grad()
    model.drop_pending()


def test_mlm_loss_equals_the_loss_recomputed_from_the_same_corruption():
    torch.manual_seed(0)
    model = VLPModel(
        tiny_model_config(mlm=True, mlm_probability=0.5, itm=False, momentum=False, distill=False, queue_size=0)
    )
    batch = make_batch(model)
    torch.manual_seed(3)
    out = model(batch)

    # The same draws by hand: ITC draws nothing random, so the corruption is the first draw after the seed.
    torch.manual_seed(3)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    maskable = mask.bool() & ~torch.isin(ids, torch.tensor(model.tokenizer.all_special_ids))
    masked_ids, labels = mask_tokens(ids, maskable, model.tokenizer.mask_token_id, len(model.tokenizer), 0.5)
    image_embeds, _ = model.visual_encoder(batch["image"])
    fused = model.fusion(model.text_encoder(masked_ids, mask)[0], mask, image_embeds)
    chosen = labels != IGNORE_INDEX
    expected = F.cross_entropy(model.mlm_head(fused[chosen]), labels[chosen])
    assert chosen.any() and out["mlm_loss"].item() == pytest.approx(expected.item(), rel=1e-5)


def test_special_tokens_and_padding_are_never_predicted(monkeypatch):
    # Nearly every maskable token is chosen: the labels the model draws must cover the words and nothing else.
    import vlp.model.vlp_model as vlp_model

    torch.manual_seed(0)
    model = VLPModel(tiny_model_config(mlm=True, mlm_probability=0.99))
    drawn = []

    def recording_mask_tokens(*args, **kwargs):
        drawn.append(mask_tokens(*args, **kwargs))
        return drawn[-1]

    monkeypatch.setattr(vlp_model, "mask_tokens", recording_mask_tokens)
    batch = make_batch(model)
    model(batch)
    ids, mask = batch["input_ids"], batch["attention_mask"].bool()
    special = torch.isin(ids, torch.tensor(model.tokenizer.all_special_ids))
    assert (ids == model.tokenizer.pad_token_id).any()  # the shorter caption is padded
    chosen = drawn[0][1] != IGNORE_INDEX
    assert not (chosen & (special | ~mask)).any()
    assert chosen.sum() >= 0.9 * (mask & ~special).sum()


def test_mlm_alone_learns_to_fill_in_words_from_the_image():
    # One fixed batch, MLM only: 40 steps must take the loss well below its start (log V ~ 5.4).
    torch.manual_seed(0)
    model = VLPModel(
        tiny_model_config(mlm=True, mlm_probability=0.5, itm=False, momentum=False, distill=False, queue_size=0)
    )
    batch = make_batch(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(40):
        loss = model(batch)["mlm_loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[0] > 4.5 and sum(losses[-5:]) / 5 < 0.5 * losses[0]


def test_mlm_without_itm_builds_the_fusion_but_cannot_rerank():
    model = VLPModel(tiny_model_config(mlm=True, itm=False))
    assert hasattr(model, "fusion") and not hasattr(model, "itm_head")
    with pytest.raises(ValueError, match="re-ranking needs the ITM head"):
        RetrievalEvaluator(model)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(mlm_probability=1.0), "model.mlm_probability"),
        (
            dict(text_encoder=TextEncoderConfig(freeze=True, cache_outputs=True)),
            "model.text_encoder.cache_outputs=false",
        ),
    ],
)
def test_impossible_mlm_settings_are_rejected_by_name(overrides, message):
    cfg = tiny_model_config(mlm=True, **overrides)
    with pytest.raises(ValueError, match=message):
        cfg.validate()
