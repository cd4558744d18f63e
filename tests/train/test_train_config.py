"""The composed configs are typed and validated before any work; every message names the key to change."""

from __future__ import annotations

import pytest

from vlp.train.config import TrainConfig, load_config, model_config_from_dict, patch_size, to_plain_dict

EXPERIMENTS = ("demo", "pretrain_flickr8k", "pretrain_albef_4m")


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_composes_into_the_typed_schema(compose, tmp_path, experiment):
    cfg = load_config(compose([f"experiment={experiment}", f"paths.output_dir={tmp_path}"]))
    assert isinstance(cfg, TrainConfig)
    assert cfg.task_name == experiment
    # Interpolations across groups are resolved: the data pipeline matches the image tower.
    assert cfg.data.image_size == cfg.model.image_encoder.image_size
    assert cfg.data.max_length == cfg.model.text_encoder.max_length


def test_albef_recipe_values(compose, tmp_path):
    cfg = load_config(compose(["experiment=pretrain_albef_4m", f"paths.output_dir={tmp_path}"]))
    assert (cfg.optim.lr, cfg.optim.weight_decay, cfg.data.batch_size, cfg.trainer.devices) == (1e-4, 0.02, 64, 8)
    assert (cfg.model.queue_size, cfg.model.momentum_decay, cfg.model.alpha) == (65536, 0.995, 0.4)
    assert cfg.model.image_encoder.image_size == 256 and cfg.trainer.max_epochs == 30
    assert cfg.optim.warmup_steps > 0 and cfg.trainer.strategy == "ddp"


def test_flickr8k_points_at_offline_weights_and_shared_data(compose, tmp_path, monkeypatch):
    monkeypatch.setenv("VLP_DATA_ROOT", "/data/root")
    cfg = load_config(compose(["experiment=pretrain_flickr8k", f"paths.output_dir={tmp_path}"]))
    assert cfg.model.image_encoder.checkpoint.endswith("weights/tf_efficientnet_lite0.safetensors")
    assert cfg.model.text_encoder.name.endswith("weights/all-MiniLM-L6-v2")
    assert cfg.data.root == "/data/root/flickr8k"


def _error(compose, tmp_path, *overrides: str) -> str:
    with pytest.raises(ValueError) as info:
        load_config(compose([*overrides, f"paths.output_dir={tmp_path}"]))
    return str(info.value)


def test_unknown_key_is_named(compose, tmp_path):
    message = _error(compose, tmp_path, "+optim.learning_rate=0.1")
    assert "optim.learning_rate" in message


def test_unknown_nested_model_key_is_named(compose, tmp_path):
    message = _error(compose, tmp_path, "+model.image_encoder.img_size=64")
    assert "model.image_encoder.img_size" in message


def test_wrong_type_is_named(compose, tmp_path):
    message = _error(compose, tmp_path, "model.embed_dim=wide")
    assert "model.embed_dim" in message and "wide" in message


def test_patch_size_must_divide_image_size(compose, tmp_path):
    message = _error(compose, tmp_path, "model.image_encoder.image_size=60")
    assert "model.image_encoder.image_size=60" in message and "patch size 16" in message


def test_queue_without_momentum_is_rejected(compose, tmp_path):
    message = _error(compose, tmp_path, "model.momentum=false", "model.distill=false", "model.queue_size=128")
    assert "model.queue_size" in message and "model.momentum" in message


def test_fusion_heads_must_divide_the_text_width(compose, tmp_path):
    message = _error(compose, tmp_path, "model.fusion.num_heads=3")
    assert "model.fusion.num_heads=3" in message and "hidden_size=64" in message


def test_data_and_model_image_sizes_must_agree(compose, tmp_path):
    message = _error(compose, tmp_path, "data.image_size=128")
    assert "data.image_size=128" in message and "model.image_encoder.image_size=64" in message


def test_group_checks_name_their_keys(compose, tmp_path):
    assert "trainer.precision" in _error(compose, tmp_path, "trainer.precision=fp8")
    assert "callbacks.checkpoint.mode" in _error(compose, tmp_path, "callbacks.checkpoint.mode=best")
    assert "optim.layer_decay" in _error(compose, tmp_path, "optim.layer_decay=1.5")
    assert "data.batch_size" in _error(compose, tmp_path, "data.batch_size=0")
    assert "eval.k" in _error(compose, tmp_path, "eval.k=0")
    assert "trainer.accelerator=gpu" in _error(compose, tmp_path, "trainer=ddp_cpu", "trainer.strategy=fsdp")


def test_bad_config_fails_before_any_file_is_written(compose, tmp_path):
    from vlp.train.run import train

    out = tmp_path / "never"
    with pytest.raises(ValueError, match="model.embed_dim"):
        train(compose(["model.embed_dim=-3", f"paths.output_dir={out}"]))
    assert not out.exists()


def test_checkpoint_config_round_trip_rebuilds_the_model_config(compose, tmp_path):
    cfg = load_config(compose(["experiment=demo", f"paths.output_dir={tmp_path}"]))
    plain = to_plain_dict(cfg)
    assert isinstance(plain["model"]["image_encoder"]["timm_kwargs"], dict)
    assert model_config_from_dict(plain["model"]) == cfg.model


def test_patch_size_parsing():
    assert patch_size("vit_base_patch16_224", {}) == 16
    assert patch_size("vit_tiny_patch16_224", {"patch_size": 8}) == 8
    assert patch_size("tf_efficientnet_lite0", {}) is None
