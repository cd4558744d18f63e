"""The full model at tiny sizes: forward/backward, temperature clamp, degenerate batches, momentum and queue."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import tiny_model_config

from vlp.model import ImageEncoderConfig, VLPModel
from vlp.model.queue import FeatureQueue

CAPTIONS = ["a small red circle left of a blue square", "two green stars", "a big dog", "one yellow ring"]


def make_batch(model, ids=(0, 1, 2, 3), size=32):
    gen = torch.Generator().manual_seed(0)
    captions = [CAPTIONS[i % len(CAPTIONS)] for i in range(len(ids))]
    tokens = model.tokenizer(captions, padding=True, return_tensors="pt")
    return dict(
        image=torch.randn(len(ids), 3, size, size, generator=gen),
        input_ids=tokens.input_ids,
        attention_mask=tokens.attention_mask,
        image_id=torch.tensor(ids),
    )


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return VLPModel(tiny_model_config())


def test_forward_backward_reaches_every_trainable_parameter(model):
    model.train()
    out = model(make_batch(model))
    out["loss"].backward()
    assert torch.isfinite(out["loss"]) and out["itm_invalid_rows"] == 0
    assert out["loss"].item() == pytest.approx((out["itc_loss"] + out["itm_loss"]).item())
    missing = [n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.any())]
    assert missing == []
    assert not any(p.requires_grad for n, p in model.named_parameters() if n.split(".")[0].endswith("_m"))
    model.zero_grad()
    model.drop_pending()


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("value, clamped", [(5.0, 0.5), (1e-6, 0.001)])
def test_temperature_is_clamped_in_every_mode(model, mode, value, clamped):
    getattr(model, mode)()
    model.temp.data.fill_(value)
    with torch.no_grad():
        out = model(make_batch(model))
    assert out["temperature"].item() == pytest.approx(clamped)
    assert model.temp.item() == pytest.approx(clamped)
    model.temp.data.fill_(0.07)
    model.drop_pending()


@pytest.mark.parametrize("ids", [(5,), (3, 3, 3, 3)])
def test_batches_without_negatives_are_finite_and_counted(model, ids):
    model.train()
    out = model(make_batch(model, ids))
    out["loss"].backward()
    assert all(torch.isfinite(v).all() for v in out.values())
    assert out["itm_invalid_rows"].item() == 2 * len(ids)
    model.zero_grad()
    model.drop_pending()


def test_several_hard_negatives_per_row_score_one_positive_and_k_negatives_each_way():
    cfg = tiny_model_config()
    cfg.itm_hard_negatives = 2
    torch.manual_seed(0)
    model = VLPModel(cfg).train()
    batch = make_batch(model, ids=(0, 1, 2, 3, 0))  # rows 0 and 4 share an image: 3 valid negatives each

    # Record the pairs scored: B positives, then 2 negative captions per image and 2 negative images per caption.
    pairs = []
    original = model._itm_pair_logits
    model._itm_pair_logits = lambda *args: (pairs.append(args[3:]), original(*args))[1]
    out = model(batch)
    image_index, text_index = pairs[0]
    assert len(image_index) == 5 + 2 * 5 + 2 * 5 and out["itm_invalid_rows"] == 0
    ids = batch["image_id"]
    assert torch.equal(image_index[:5], torch.arange(5)) and torch.equal(text_index[:5], torch.arange(5))
    assert (ids[image_index[5:]] != ids[text_index[5:]]).all()  # every negative pairs two different images
    out["loss"].backward()
    assert torch.isfinite(out["loss"])


def test_fusion_starts_from_the_text_encoders_top_layers():
    torch.manual_seed(0)
    reference = VLPModel(tiny_model_config(itm=True))
    layers = reference.text_encoder.model.encoder.layer
    assert len(layers) == 2  # 3 BERT layers: 2 kept for text, the top one moved into fusion block 0
    torch.manual_seed(0)
    config = tiny_model_config()
    config.text_encoder.num_layers = None
    full = VLPModel(config)
    top = full.text_encoder.model.encoder.layer[2]
    assert torch.equal(reference.fusion.blocks[0].self_attn.query.weight, top.attention.self.query.weight)
    assert torch.equal(reference.fusion.blocks[0].mlp[2].weight, top.output.dense.weight)


def test_cnn_feature_maps_become_tokens():
    torch.manual_seed(0)
    model = VLPModel(tiny_model_config(image_encoder=ImageEncoderConfig(name="resnet18", image_size=64)))
    image_embeds, image_feat = model.encode_image(torch.randn(2, 3, 64, 64))
    assert image_embeds.shape == (2, 4, 512)  # a 2x2 map of 512 channels
    assert torch.allclose(image_feat.norm(dim=-1), torch.ones(2))
    out = model(make_batch(model, (0, 1), size=64))
    assert torch.isfinite(out["loss"])


def test_patch_size_must_divide_image_size():
    config = tiny_model_config()
    config.image_encoder.image_size = 30
    with pytest.raises(ValueError, match="model.image_encoder.image_size=30"):
        VLPModel(config)


def test_queue_without_momentum_is_rejected():
    with pytest.raises(ValueError, match="model.queue_size"):
        VLPModel(tiny_model_config(momentum=False, distill=False))


def test_accumulated_micro_batches_update_momentum_and_queue_once(model):
    model.train()
    before_m = model.vision_proj_m.weight.clone()
    online = model.vision_proj.weight.clone()
    count = int(model.queue.count)
    for ids in [(0, 1), (2, 3, 4)]:
        model(make_batch(model, ids))["loss"].backward()
    assert int(model.queue.count) == count  # nothing enqueued between micro-batches
    model.after_optimizer_step()
    decay = model.cfg.momentum_decay
    assert torch.allclose(model.vision_proj_m.weight, decay * before_m + (1 - decay) * online, atol=1e-7)
    assert int(model.queue.count) == count + 5
    model.zero_grad()


def test_queue_wraps_around_for_any_batch_size():
    queue = FeatureQueue(size=5, dim=2)
    rows = torch.arange(22.0).view(11, 2)  # (11, 2): row i holds [2i, 2i + 1]
    ids = torch.arange(11)
    queue.enqueue(rows[:3], -rows[:3], ids[:3])
    assert int(queue.count) == 3 and torch.equal(queue.keys()[2], ids[:3])
    queue.enqueue(rows[3:7], -rows[3:7], ids[3:7])  # wraps: slots 3, 4, 0, 1
    assert torch.equal(queue.id_queue, torch.tensor([5, 6, 2, 3, 4])) and int(queue.ptr) == 2
    queue.enqueue(rows[7:], -rows[7:], ids[7:])  # 4 rows from slot 2: 2, 3, 4, 0
    assert torch.equal(queue.id_queue, torch.tensor([10, 6, 7, 8, 9]))
    assert torch.equal(queue.text_queue[0], -rows[10]) and int(queue.count) == 5


def test_queue_resumes_from_a_checkpoint_under_another_batch_size():
    # Two ranks of 3 rows enqueue the same 6 gathered rows as one process would; a resumed queue continues
    # from its saved pointer whatever the new world size or batch size.
    first, resumed = FeatureQueue(8, 2), FeatureQueue(8, 2)
    rows = torch.randn(13, 2)
    first.enqueue(rows[:6], rows[:6], torch.arange(6))
    resumed.load_state_dict(first.state_dict())
    first.enqueue(rows[6:13], rows[6:13], torch.arange(6, 13))
    for start in range(6, 13, 2):  # a new batch size of 2 with a short last batch of 1
        resumed.enqueue(rows[start : start + 2], rows[start : start + 2], torch.arange(start, min(start + 2, 13)))
    for key, value in first.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[key]), key


def test_frozen_towers_stay_in_eval_mode_and_their_cached_outputs_are_exact():
    torch.manual_seed(0)
    config = tiny_model_config()
    config.image_encoder.freeze = config.text_encoder.freeze = True
    config.image_encoder.cache_outputs = config.text_encoder.cache_outputs = True
    cached = VLPModel(config).train()
    assert not cached.visual_encoder.training and not cached.text_encoder.training and cached.fusion.training
    plain = VLPModel(tiny_model_config()).eval()
    plain.load_state_dict(cached.state_dict())

    # Two batches sharing captions and images but padded to different lengths.
    first, second = make_batch(cached, (0, 1, 2, 3)), make_batch(cached, (0, 1))
    for batch in (first, second, first):
        for a, b in zip(cached.encode_image(batch["image"]), plain.encode_image(batch["image"])):
            assert torch.allclose(a, b, atol=1e-6)
        args = (batch["input_ids"], batch["attention_mask"])
        (tokens_a, feat_a), (tokens_b, feat_b) = cached.encode_text(*args), plain.encode_text(*args)
        mask = batch["attention_mask"].bool()
        assert torch.allclose(tokens_a[mask], tokens_b[mask], atol=1e-5) and torch.allclose(feat_a, feat_b, atol=1e-6)
    assert cached.visual_encoder.cache.misses == 4 and cached.visual_encoder.cache.hits == 6
    assert cached.text_encoder.cache.misses == 4

    # The momentum path of a frozen tower reuses the online tower: no new misses, and the loss is finite.
    out = cached(first)
    out["loss"].backward()
    assert cached.visual_encoder.cache.misses == 4 and torch.isfinite(out["loss"])
    assert all(p.grad is None for p in cached.visual_encoder.parameters())


def test_cache_without_freeze_is_rejected():
    config = tiny_model_config()
    config.text_encoder.cache_outputs = True
    with pytest.raises(ValueError, match="model.text_encoder.cache_outputs=true needs model.text_encoder.freeze"):
        VLPModel(config)


def test_first_token_only_fusion_is_exact(model):
    model.eval()
    batch = make_batch(model)
    with torch.no_grad():
        text_embeds, _ = model.encode_text(batch["input_ids"], batch["attention_mask"])
        image_embeds, _ = model.encode_image(batch["image"])
        full = model.fusion(text_embeds, batch["attention_mask"], image_embeds)  # (B, L, D)
        first = model.fusion(text_embeds, batch["attention_mask"], image_embeds, first_token_only=True)
    assert first.shape == (4, 1, full.shape[-1])
    assert torch.allclose(first[:, 0], full[:, 0], atol=1e-5)


def test_grouped_keys_values_and_cached_text_attention_match_per_pair_fusion(model):
    from vlp.model.fusion import group_kv

    # Pairs sorted by image with uneven counts (3, 1, 1, 2): runs of equal counts attend in one call.
    model.eval()
    batch = make_batch(model)
    counts = torch.tensor([3, 1, 1, 2])
    pair_image = torch.repeat_interleave(torch.arange(4), counts)  # (7,)
    pair_text = torch.tensor([0, 2, 3, 1, 0, 3, 2])
    with torch.no_grad():
        text_embeds, _ = model.encode_text(batch["input_ids"], batch["attention_mask"])
        image_embeds, _ = model.encode_image(batch["image"])
        mask = batch["attention_mask"]
        naive = model.itm_logits(text_embeds[pair_text], mask[pair_text], image_embeds=image_embeds[pair_image])
        attended = model.fusion.attend_text(text_embeds, mask)[pair_text]  # (7, L, D)
        image_kv = group_kv(model.fusion.image_kv(image_embeds), counts)
        grouped = model.itm_logits(attended, mask[pair_text], image_kv=image_kv, text_attended=True)
    assert [run[:2] for run in image_kv[0].runs] == [(0, 3), (3, 5), (5, 7)]
    assert torch.allclose(grouped, naive, atol=1e-5)
    with pytest.raises(ValueError, match="cover 7 rows, the batch has 6"):
        model.itm_logits(attended[:6], mask[pair_text][:6], image_kv=image_kv, text_attended=True)


def test_training_itm_pairs_match_per_pair_fusion_and_gradients(model):
    # The training path (distinct captions attended once, pairs regrouped by image) against a plain gather.
    model.train()
    batch = make_batch(model)
    image_index, text_index = torch.tensor([0, 1, 2, 3, 0, 2, 2, 1]), torch.tensor([0, 1, 2, 3, 3, 0, 1, 1])
    text_embeds, _ = model.encode_text(batch["input_ids"], batch["attention_mask"])
    image_embeds, _ = model.encode_image(batch["image"])
    mask = batch["attention_mask"]
    fast = model._itm_pair_logits(image_embeds, text_embeds, mask, image_index, text_index)
    naive = model.itm_logits(text_embeds[text_index], mask[text_index], image_embeds=image_embeds[image_index])
    assert torch.allclose(fast, naive, atol=1e-5)
    grad_fast = torch.autograd.grad(fast.square().sum(), model.fusion.blocks[0].cross_attn.key.weight)[0]
    text_embeds, _ = model.encode_text(batch["input_ids"], batch["attention_mask"])
    image_embeds, _ = model.encode_image(batch["image"])
    naive = model.itm_logits(text_embeds[text_index], mask[text_index], image_embeds=image_embeds[image_index])
    grad_naive = torch.autograd.grad(naive.square().sum(), model.fusion.blocks[0].cross_attn.key.weight)[0]
    assert torch.allclose(grad_fast, grad_naive, atol=1e-5)


def _reference_fusion(fusion, text, mask, image):
    """The fusion encoder written plainly on padded (B, L, D) tensors: the oracle for the packed implementation."""

    def attention(attn, x, context, key_mask):
        heads = attn.num_heads
        split = lambda t: t.view(t.shape[0], t.shape[1], heads, -1).transpose(1, 2)  # noqa: E731
        q, k, v = split(attn.query(x)), split(attn.key(context)), split(attn.value(context))
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=key_mask)
        return attn.out(out.transpose(1, 2).flatten(2))

    key_mask = mask.bool()[:, None, None, :]
    for block in fusion.blocks:
        text = block.norm1(text + attention(block.self_attn, text, text, key_mask))
        text = block.norm2(text + attention(block.cross_attn, text, image, None))
        text = block.norm3(text + block.mlp(text))
    return text


def test_packed_fusion_matches_a_plain_padded_reference(model):
    # Captions of different lengths, so packing drops padding; compared at the real tokens only.
    model.eval()
    batch = make_batch(model)
    mask = batch["attention_mask"]
    assert not mask.bool().all()
    with torch.no_grad():
        text_embeds, _ = model.encode_text(batch["input_ids"], mask)
        image_embeds, _ = model.encode_image(batch["image"])
        packed = model.fusion(text_embeds, mask, image_embeds)  # (B, L, D)
        reference = _reference_fusion(model.fusion, text_embeds, mask, image_embeds)
    valid = mask.bool()
    assert torch.allclose(packed[valid], reference[valid], atol=1e-5)
    assert packed[~valid].abs().max() == 0


def test_sincos_position_embeddings_start_from_2d_codes_and_still_train():
    config = tiny_model_config()
    config.image_encoder.pos_embed_init = "sincos"
    encoder = VLPModel(config).visual_encoder
    pos_embed = encoder.model.pos_embed[0]  # (1 + 4*4, 32): the class token, then a 4 x 4 patch grid
    width = pos_embed.shape[1]
    assert pos_embed.requires_grad and pos_embed[0].abs().max() == 0
    # Patch (0, 0) sits at coordinate 0 on both axes: every sine is 0 and every cosine 1.
    assert sorted(pos_embed[1].tolist()) == [0.0] * (width // 2) + [1.0] * (width // 2)
    # Each axis has width/4 frequencies 10000^(-i / (width/4)); the fastest is 1, so one step changes by sin(1).
    assert torch.isclose(pos_embed[2], torch.tensor(math.sin(1.0))).any()
    assert torch.isclose(pos_embed[1 + 4], torch.tensor(math.sin(1.0))).any()
    assert not torch.equal(pos_embed[2], pos_embed[1 + 4])  # one patch right and one patch down differ
    assert len({tuple(row.tolist()) for row in pos_embed[1:]}) == 16  # every patch has its own code


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(name="resnet18", timm_kwargs={}), "needs a ViT with learned position embeddings"),
        (dict(pretrained=True), "would overwrite pretrained weights"),
    ],
)
def test_sincos_position_embeddings_are_refused_where_they_cannot_apply(overrides, message):
    config = tiny_model_config()
    config.image_encoder = ImageEncoderConfig(
        **{**config.image_encoder.__dict__, "pos_embed_init": "sincos", **overrides}
    )
    with pytest.raises(ValueError, match=message):
        VLPModel(config)
