"""eval.py's run_eval on a tiny checkpoint and synthetic data: metrics.json, report.html, safe loading."""

from __future__ import annotations

import base64
import dataclasses
import io
import json
import re

import pytest
import torch
from eval_fixtures import TinyRetrievalSet, tiny_model
from PIL import Image

from vlp.checkpoint import CheckpointError
from vlp.eval import METRIC_KEYS, RetrievalConfig, run_retrieval
from vlp.eval.loading import load_model_for_eval
from vlp.eval.report import write_report
from vlp.eval.run import build_eval_data, run_eval

ALL_KEYS = [*METRIC_KEYS, *(f"itc_{k}" for k in METRIC_KEYS)]
DATA = dict(name="synthetic", synthetic_eval_size=12, synthetic_image_size=32, image_size=32, num_workers=0)


def save_lightning_checkpoint(model, path, hparams=None) -> None:
    """The layout of the training module: weights under ``model.``, the plain config under hyper_parameters."""
    state = {f"model.{k}": v for k, v in model.state_dict().items()}
    hparams = hparams if hparams is not None else {"cfg": {"model": dataclasses.asdict(model.cfg), "seed": 1}}
    torch.save({"state_dict": state, "hyper_parameters": hparams, "epoch": 3}, path)


@torch.no_grad()
def outputs(model) -> tuple[torch.Tensor, ...]:
    torch.manual_seed(5)
    image = torch.randn(2, 3, 32, 32)
    tok = model.tokenizer(["a red circle", "two blue stars"], padding=True, return_tensors="pt")
    image_embeds, image_feat = model.encode_image(image)
    text_embeds, text_feat = model.encode_text(tok.input_ids, tok.attention_mask)
    return image_feat, text_feat, model.itm_logits(text_embeds, tok.attention_mask, image_embeds=image_embeds)


def test_checkpoint_and_export_load_the_same_model(tmp_path):
    model = tiny_model(seed=2)
    save_lightning_checkpoint(model, tmp_path / "last.ckpt")
    model.save_pretrained(tmp_path / "export")
    expected = outputs(model)
    for path in (tmp_path / "last.ckpt", tmp_path / "export"):
        loaded = load_model_for_eval(path)
        assert not loaded.training
        for got, want in zip(outputs(loaded), expected):
            torch.testing.assert_close(got, want)


class Payload:
    def __reduce__(self):
        return (print, ("payload ran",))


def test_unsafe_or_incomplete_checkpoints_are_refused(tmp_path, capsys):
    model = tiny_model()
    save_lightning_checkpoint(model, tmp_path / "evil.ckpt", hparams={"cfg": Payload()})
    with pytest.raises(CheckpointError, match="refusing to load"):
        load_model_for_eval(tmp_path / "evil.ckpt")
    assert "payload ran" not in capsys.readouterr().out
    save_lightning_checkpoint(model, tmp_path / "nomodel.ckpt", hparams={"cfg": {"seed": 1}})
    with pytest.raises(CheckpointError, match="no 'model' section"):
        load_model_for_eval(tmp_path / "nomodel.ckpt")
    bad_cfg = {"model": {**dataclasses.asdict(model.cfg), "fusion": {"num_layers": 2, "depth": 3}}}
    save_lightning_checkpoint(model, tmp_path / "badkey.ckpt", hparams=bad_cfg)
    with pytest.raises(CheckpointError, match="unknown config key model.fusion.depth"):
        load_model_for_eval(tmp_path / "badkey.ckpt")
    with pytest.raises(FileNotFoundError, match="pass ckpt=PATH"):
        load_model_for_eval(tmp_path / "missing.ckpt")


def test_run_eval_writes_metrics_json_and_report(tmp_path):
    model = tiny_model(seed=1)
    save_lightning_checkpoint(model, tmp_path / "last.ckpt")
    cfg = {
        "ckpt": str(tmp_path / "last.ckpt"),
        "split": "test",
        "output_dir": str(tmp_path / "out"),
        "data": DATA,
        "eval": {"k": 8, "report_samples": 3, "rerank_batch_size": 50},
    }
    metrics = run_eval(cfg)

    # metrics.json: exactly the documented keys, the values returned, and those of a direct evaluation.
    written = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert list(written) == ALL_KEYS
    assert written == pytest.approx(metrics)
    loaded = load_model_for_eval(tmp_path / "last.ckpt")
    dataset, loader = build_eval_data(dict_config(cfg), loaded)
    assert len(dataset) == 12 and len(dataset.texts) == 12 * 5
    direct = run_retrieval(
        loaded, loader, dataset.texts, dataset.txt2img, dataset.img2txt, RetrievalConfig(k=8, rerank_batch_size=50)
    )
    assert direct.metrics == pytest.approx(written)

    # report.html: 3 queries per direction, every thumbnail an embedded JPEG that decodes.
    page = (tmp_path / "out" / "report.html").read_text()
    assert page.count("<b>image ") == 3 and page.count("<b>caption ") == 3
    thumbnails = re.findall(r"src='data:image/jpeg;base64,([A-Za-z0-9+/=]+)'", page)
    assert len(thumbnails) == 3 + 3 * 5
    assert Image.open(io.BytesIO(base64.b64decode(thumbnails[0]))).format == "JPEG"
    assert "http" not in page  # nothing to fetch: opens offline


def dict_config(cfg):
    from omegaconf import OmegaConf

    return OmegaConf.create(cfg)


def test_report_marks_ground_truth(tmp_path):
    model, ds = tiny_model(), TinyRetrievalSet(6, 2, seed=0)
    ds.texts[0] = "<b>a dog & a cat</b>"  # escaped, not markup
    loader = torch.utils.data.DataLoader(ds, batch_size=6)
    result = run_retrieval(model, loader, ds.texts, ds.txt2img, ds.img2txt, RetrievalConfig(k=6))
    write_report(tmp_path / "r.html", result, ds.texts, ds.txt2img, ds.img2txt, ds.load_image_pil, samples=6)
    page = (tmp_path / "r.html").read_text()
    assert "&lt;b&gt;a dog &amp; a cat&lt;/b&gt;" in page
    # Highlighted captions: one per ground-truth caption in a sampled image's top 5 (all 6 images sampled).
    expected_hits = sum(int(c) in set(ds.img2txt[q].tolist()) for q in range(6) for c in result.i2t.indices[q][:5])
    assert page.count("<li class='hit'>") == expected_hits
    # Framed images: one per sampled caption whose image is in its top 5.
    text_queries = [0, 2, 4, 7, 9, 11]  # 6 evenly spaced of 12 captions
    framed = sum(int(ds.txt2img[q]) in result.t2i.indices[q][:5].tolist() for q in text_queries)
    assert page.count("class='result hit'") == framed


def test_bad_run_config():
    with pytest.raises(ValueError, match="ckpt must name"):
        run_eval({"ckpt": "???"})
    with pytest.raises(ValueError, match="split must be one of val, test"):
        run_eval({"ckpt": "x", "split": "train"})
    with pytest.raises(ValueError, match="unknown key eval.kk"):
        run_eval({"ckpt": "x", "eval": {"kk": 3}})


def test_eval_yaml_composes_and_runs(tmp_path):
    # The root config with its data and paths groups, overridden on the command line as eval.py would be.
    from pathlib import Path

    from hydra import compose, initialize_config_dir

    model = tiny_model(seed=1)
    save_lightning_checkpoint(model, tmp_path / "last.ckpt")
    overrides = [
        f"ckpt={tmp_path / 'last.ckpt'}",
        f"output_dir={tmp_path / 'out'}",
        "data.synthetic_eval_size=6",
        "data.num_workers=0",
        "eval.k=4",
        "eval.report_samples=2",
        "rerank=false",
    ]
    configs = Path(__file__).resolve().parents[2] / "configs"
    with initialize_config_dir(config_dir=str(configs), version_base="1.3"):
        cfg = compose("eval", overrides=overrides)
    assert cfg.data.name == "synthetic" and cfg.split == "test"
    metrics = run_eval(cfg)
    assert all(metrics[k] == metrics[f"itc_{k}"] for k in METRIC_KEYS)  # rerank=false
    assert list(json.loads((tmp_path / "out" / "metrics.json").read_text())) == ALL_KEYS
