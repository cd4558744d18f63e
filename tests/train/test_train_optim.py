"""Parameter groups (weight decay, layer-wise decay, new-module multiplier) and the warmup-cosine schedule."""

from __future__ import annotations

import math

import pytest
import torch

from vlp.model import VLPModel
from vlp.train.config import OptimConfig, load_config
from vlp.train.optim import build_optimizer, group_specs
from vlp.train.schedule import WarmupCosine, warmup_cosine


@pytest.fixture(scope="module")
def model(request):
    from helpers import TINY_MODEL, compose_train

    cfg = load_config(compose_train([*TINY_MODEL, "data.image_size=32", "paths.output_dir=unused"]))
    return VLPModel(cfg.model)


def _lr_and_decay(optimizer: torch.optim.Optimizer, model: torch.nn.Module) -> dict[str, tuple[float, float]]:
    by_id = {id(p): name for name, p in model.named_parameters()}
    return {by_id[id(p)]: (g["lr"], g["weight_decay"]) for g in optimizer.param_groups for p in g["params"]}


def test_every_trainable_parameter_is_in_exactly_one_group_and_momentum_copies_in_none(model):
    optimizer = build_optimizer(model, OptimConfig())
    grouped = [id(p) for g in optimizer.param_groups for p in g["params"]]
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert len(grouped) == len(set(grouped)) and set(grouped) == trainable
    momentum = {id(p) for name, p in model.named_parameters() if name.split(".")[0].endswith("_m")}
    assert momentum and not momentum & set(grouped)


def test_no_weight_decay_on_biases_norms_temperature_and_position_embeddings(model):
    settings = _lr_and_decay(build_optimizer(model, OptimConfig(weight_decay=0.05)), model)
    no_decay = [
        "temp",
        "visual_encoder.model.pos_embed",
        "visual_encoder.model.cls_token",
        "visual_encoder.model.fc_norm.weight",  # the tiny ViT average-pools, so its final norm is fc_norm
        "text_encoder.model.embeddings.position_embeddings.weight",
        "text_encoder.model.embeddings.LayerNorm.weight",
        "fusion.blocks.0.cross_attn.query.bias",
        "itm_head.bias",
    ]
    for name in no_decay:
        assert settings[name][1] == 0.0, name
    for name in ("visual_encoder.model.blocks.0.attn.qkv.weight", "itm_head.weight", "text_proj.weight"):
        assert settings[name][1] == 0.05, name


def test_layer_decay_scales_each_tower_from_its_top_group(model):
    cfg = OptimConfig(lr=1e-3, layer_decay=0.5)
    settings = _lr_and_decay(build_optimizer(model, cfg), model)
    vis_groups = model.visual_encoder.block_groups()
    # stem, block 0, block 1, and the pooled-feature norm (fc_norm) that timm groups as the head.
    assert len(vis_groups) == 4
    # Each group sits one decay step below the next; the top group keeps lr.
    assert settings["visual_encoder.model.patch_embed.proj.weight"][0] == pytest.approx(1e-3 * 0.5**3)
    assert settings["visual_encoder.model.cls_token"][0] == pytest.approx(1e-3 * 0.5**3)
    assert settings["visual_encoder.model.blocks.0.mlp.fc1.weight"][0] == pytest.approx(1e-3 * 0.5**2)
    assert settings["visual_encoder.model.blocks.1.mlp.fc1.weight"][0] == pytest.approx(1e-3 * 0.5)
    assert settings["visual_encoder.model.fc_norm.weight"][0] == pytest.approx(1e-3)
    # Text tower: embeddings, then 2 layers; its top layer keeps lr.
    assert settings["text_encoder.model.embeddings.word_embeddings.weight"][0] == pytest.approx(1e-3 * 0.25)
    assert settings["text_encoder.model.encoder.layer.1.output.dense.weight"][0] == pytest.approx(1e-3)
    # Outside the towers: no decay of the lr.
    assert settings["fusion.blocks.0.self_attn.query.weight"][0] == pytest.approx(1e-3)


def test_new_modules_train_at_the_multiplied_lr(model):
    cfg = OptimConfig(lr=1e-4, new_module_lr_mult=10.0)
    settings = _lr_and_decay(build_optimizer(model, cfg), model)
    for name in ("fusion.blocks.1.cross_attn.key.weight", "vision_proj.weight", "text_proj.bias", "itm_head.weight"):
        assert settings[name][0] == pytest.approx(1e-3), name
    # Self-attention of the fusion blocks starts from the text tower's top layers: not new.
    assert settings["fusion.blocks.1.self_attn.key.weight"][0] == pytest.approx(1e-4)


def test_frozen_layers_are_left_out(model):
    frozen = {id(p) for p in model.visual_encoder.block_groups()[0]}
    for group in model.visual_encoder.block_groups()[:1]:
        for p in group:
            p.requires_grad_(False)
    try:
        specs = group_specs(model, OptimConfig())
        assert not frozen & {id(p) for s in specs for p in s.params}
    finally:
        for p in model.visual_encoder.block_groups()[0]:
            p.requires_grad_(True)


def test_warmup_then_cosine_hand_computed():
    schedule = WarmupCosine(warmup_steps=4, total_steps=14, min_ratio=0.1)
    assert [schedule(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert schedule(4) == pytest.approx(1.0)
    # Halfway through the 10 decay steps the cosine is at the mean of 1 and 0.1.
    assert schedule(9) == pytest.approx(0.55)
    assert schedule(4 + 10 * 0.25) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.25)))
    assert schedule(14) == pytest.approx(0.1) and schedule(100) == pytest.approx(0.1)


def test_scheduler_multiplies_every_groups_own_lr():
    p1, p2 = torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.AdamW([{"params": [p1], "lr": 1.0}, {"params": [p2], "lr": 0.1}])
    scheduler = warmup_cosine(optimizer, warmup_steps=2, total_steps=10, min_ratio=0.0)
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([0.5, 0.05])
    optimizer.step()
    scheduler.step()
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([1.0, 0.1])
