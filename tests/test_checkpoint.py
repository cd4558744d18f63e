"""Safe loading, resolution change, shape-mismatch messages, export round trip."""

from __future__ import annotations

import pickle

import pytest
import torch
from helpers import tiny_model_config
from test_model import make_batch

import vlp
from vlp.checkpoint import CheckpointError, load_state_into, model_state_dict, read_checkpoint
from vlp.model import VLPModel


def build(image_size=32, **overrides):
    torch.manual_seed(0)
    cfg = tiny_model_config(**overrides)
    cfg.image_encoder.image_size = image_size
    return VLPModel(cfg)


class Payload:
    def __reduce__(self):
        return (print, ("pickle payload executed",))


def test_tampered_checkpoint_with_a_pickle_payload_is_refused(tmp_path, capsys):
    path = tmp_path / "evil.ckpt"
    with open(path, "wb") as f:
        pickle.dump({"state_dict": {}, "hook": Payload()}, f)
    torch.save({"state_dict": build().state_dict(), "hook": Payload()}, tmp_path / "evil2.ckpt")
    for bad in (path, tmp_path / "evil2.ckpt"):
        with pytest.raises(CheckpointError, match="refusing to load"):
            read_checkpoint(bad)
    assert "pickle payload executed" not in capsys.readouterr().out


def test_lightning_layout_is_remapped(tmp_path):
    model = build()
    torch.save({"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()}}, tmp_path / "a.ckpt")
    state = model_state_dict(read_checkpoint(tmp_path / "a.ckpt"))
    assert set(state) == set(model.state_dict())


def test_shape_mismatch_names_the_key_and_both_shapes():
    model, other = build(), build(embed_dim=24)
    with pytest.raises(CheckpointError, match=r"vision_proj.weight: checkpoint \(24, 32\), model \(16, 32\)"):
        load_state_into(model, other.state_dict())
    report = load_state_into(model, other.state_dict(), allow_shape_mismatch=True)
    assert any(entry.startswith("vision_proj.weight") for entry in report["dropped"])


def test_resolution_change_resizes_position_embeddings_in_online_and_momentum_encoders():
    small, large = build(32), build(64)  # 4x4 grid of 8-pixel patches -> 8x8 grid
    # A smooth (low-frequency) grid, as trained position embeddings are, so interpolation is meaningful.
    rows, cols = torch.meshgrid(torch.arange(4.0), torch.arange(4.0), indexing="ij")
    freqs = torch.linspace(0.1, 0.6, 32)
    smooth = torch.sin(rows[..., None] * freqs) + torch.cos(cols[..., None] * freqs)  # (4, 4, C)
    with torch.no_grad():
        for encoder in (small.visual_encoder, small.visual_encoder_m):
            encoder.model.pos_embed[0, 1:] = smooth.view(16, 32)  # (4, 4, C) -> (16, C)
    report = load_state_into(large, small.state_dict())
    assert sorted(report["resized"]) == [
        "visual_encoder.model.pos_embed: (1, 65, 32)",
        "visual_encoder_m.model.pos_embed: (1, 65, 32)",
    ]
    # The class token's embedding is untouched; each old patch centre lies between 2x2 new positions whose
    # mean recovers the old embedding.
    old, new = small.visual_encoder.model.pos_embed, large.visual_encoder.model.pos_embed
    assert torch.equal(old[:, 0], new[:, 0])
    old_grid = old[0, 1:].view(4, 4, 32)  # (16, C) -> (4, 4, C)
    new_grid = new[0, 1:].view(8, 8, 32)  # (64, C) -> (8, 8, C)
    # Average-pooling the new 8x8 grid by 2 recovers the old 4x4 grid closely.
    pooled = torch.nn.functional.avg_pool2d(new_grid.permute(2, 0, 1), 2).permute(1, 2, 0)  # (4, 4, C)
    assert (pooled - old_grid).abs().max() < 0.05 * old_grid.abs().max()
    assert torch.equal(large.visual_encoder.model.pos_embed, large.visual_encoder_m.model.pos_embed)
    # The model's outputs on an image stay close: the same picture at twice the size gives similar features.
    small.eval(), large.eval()
    image = torch.rand(1, 3, 32, 32)
    big_image = torch.nn.functional.interpolate(image, scale_factor=2, mode="nearest")
    with torch.no_grad():
        cos = (small.encode_image(image)[1] * large.encode_image(big_image)[1]).sum()
    assert cos > 0.9


@pytest.mark.parametrize("overrides", [{}, {"mlm": True}], ids=["itc_itm", "with_mlm"])
def test_export_round_trip_gives_identical_embeddings_and_itm_scores(tmp_path, overrides):
    model = build(**overrides).eval()
    vlp.export(model, tmp_path / "export")
    loaded = vlp.VLPModel.from_pretrained(tmp_path / "export")
    assert not hasattr(loaded, "visual_encoder_m") and loaded.queue is None
    batch = make_batch(model)
    with torch.no_grad():
        for a, b in zip(model.encode_image(batch["image"]), loaded.encode_image(batch["image"])):
            assert torch.equal(a, b)
        args = (batch["input_ids"], batch["attention_mask"])
        for a, b in zip(model.encode_text(*args), loaded.encode_text(*args)):
            assert torch.equal(a, b)
        assert torch.equal(model.itm_score(batch["image"], *args), loaded.itm_score(batch["image"], *args))
    assert loaded.tokenizer("a red circle").input_ids == model.tokenizer("a red circle").input_ids
    if overrides.get("mlm"):
        assert torch.equal(loaded.mlm_head.decoder.weight, model.mlm_head.decoder.weight)
