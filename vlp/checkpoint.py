"""Reading checkpoints safely, remapping old key layouts, resizing position embeddings, exporting models.

Nothing here unpickles arbitrary objects: safetensors files are plain tensors, and torch files are read
with ``weights_only=True``, which refuses any pickled code.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import pickle
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from timm.layers import resample_abs_pos_embed

from vlp.model.config import FusionConfig, ImageEncoderConfig, ModelConfig, TextEncoderConfig

log = logging.getLogger(__name__)

WEIGHTS_NAME, CONFIG_NAME, TEXT_CONFIG_DIR = "model.safetensors", "vlp_config.json", "text_config"
# Prefixes added by the project's own wrappers over time: the Lightning module, DDP, torch.compile, FSDP.
WRAPPER_PREFIXES = ("model.", "module.", "_orig_mod.", "_fsdp_wrapped_module.")


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit the model; the message names the file or key."""


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """The raw checkpoint object: a safetensors dict, a torch file read with ``weights_only=True``, or a directory."""
    path = Path(path)
    if path.is_dir():
        path = path / WEIGHTS_NAME
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        return {"state_dict": load_file(str(path))}
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise CheckpointError(
            f"refusing to load {path}: it holds pickled objects that are not plain tensors and could run code "
            f"({str(err).splitlines()[0]})"
        ) from err


def model_state_dict(checkpoint: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The model's weights from a Lightning checkpoint, a plain state dict or a safetensors file, remapped."""
    state = checkpoint.get("state_dict", checkpoint)
    return remap_keys({key: value for key, value in state.items() if isinstance(value, torch.Tensor)})


def remap_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Strip wrapper prefixes so that keys match :class:`~vlp.model.VLPModel`'s own names."""
    remapped = {}
    for key, value in state.items():
        stripped = True
        while stripped:
            stripped = False
            for prefix in WRAPPER_PREFIXES:
                if key.startswith(prefix):
                    key, stripped = key[len(prefix) :], True
        remapped[key] = value
    return remapped


def _resize_pos_embed(key: str, source: torch.Tensor, target: torch.Tensor, model: torch.nn.Module) -> torch.Tensor:
    """Resample a ViT position embedding to the target grid with timm's own resampling."""
    encoder = model.get_submodule(key.rsplit(".", 1)[0])  # the timm ViT owning this pos_embed
    prefix = 0 if getattr(encoder, "no_embed_class", False) else encoder.num_prefix_tokens
    old_grid = int(math.isqrt(source.shape[1] - prefix))
    new_grid = list(encoder.patch_embed.grid_size)
    return resample_abs_pos_embed(source, new_grid, [old_grid, old_grid], num_prefix_tokens=prefix)


def load_state_into(
    model: torch.nn.Module, state: dict[str, torch.Tensor], allow_shape_mismatch: bool = False, strict: bool = False
) -> dict[str, list[str]]:
    """Load ``state`` into ``model``; position embeddings are resized, other shape changes fail or are dropped.

    Prints one summary of missing, unexpected, resized and dropped keys and returns it.
    """
    target = model.state_dict()
    report: dict[str, list[str]] = {"resized": [], "dropped": []}
    state = dict(state)
    for key in [k for k in state if k in target and state[k].shape != target[k].shape]:
        if key.endswith("pos_embed"):
            state[key] = _resize_pos_embed(key, state[key], target[key], model)
            report["resized"].append(f"{key}: {tuple(target[key].shape)}")
        elif allow_shape_mismatch:
            report["dropped"].append(f"{key}: {tuple(state.pop(key).shape)} vs {tuple(target[key].shape)}")
        else:
            raise CheckpointError(
                f"shape mismatch for {key}: checkpoint {tuple(state[key].shape)}, model {tuple(target[key].shape)}; "
                "set allow_shape_mismatch=true (ckpt_allow_shape_mismatch) to drop such keys"
            )
    result = model.load_state_dict(state, strict=strict)
    report["missing"], report["unexpected"] = list(result.missing_keys), list(result.unexpected_keys)
    log.info("checkpoint loaded: %s", "; ".join(f"{k} {len(v)}: {', '.join(v[:8])}" for k, v in report.items()))
    return report


# ----- export ---------------------------------------------------------------------------------------------------


def config_to_dict(cfg: ModelConfig) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def config_from_dict(data: dict[str, Any]) -> ModelConfig:
    """Rebuild a :class:`ModelConfig` from a plain dict (a Lightning ``hyper_parameters`` section or an export)."""
    data = dict(data)
    sections = {"image_encoder": ImageEncoderConfig, "text_encoder": TextEncoderConfig, "fusion": FusionConfig}
    for name, cls in sections.items():
        data[name] = cls(**dict(data.get(name) or {}))
    return ModelConfig(**data)


def export_model(model: torch.nn.Module, out_dir: str | Path) -> Path:
    """Write a self-contained directory: safetensors weights, the model config, the tokenizer, the text config.

    Only the online model is kept: momentum copies and the queue are training state.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    training_only = ("_m.", "queue.")
    weights = {
        key: value.detach().contiguous()
        for key, value in model.state_dict().items()
        if not any(part in key for part in training_only)
    }
    save_file(weights, str(out_dir / WEIGHTS_NAME))
    (out_dir / CONFIG_NAME).write_text(json.dumps(config_to_dict(model.cfg), indent=2))
    model.tokenizer.save_pretrained(out_dir)
    model.text_encoder.model.config.save_pretrained(out_dir / TEXT_CONFIG_DIR)
    return out_dir


def inference_config(cfg: ModelConfig, export_dir: Path) -> ModelConfig:
    """The architecture of an export, built without downloads and without training state."""
    cfg = dataclasses.replace(cfg, momentum=False, queue_size=0, distill=False)
    cfg.image_encoder = dataclasses.replace(cfg.image_encoder, pretrained=False, checkpoint=None, freeze=False)
    cfg.text_encoder = dataclasses.replace(
        cfg.text_encoder, name=str(export_dir / TEXT_CONFIG_DIR), tokenizer=str(export_dir), num_layers=None
    )
    cfg.fusion = dataclasses.replace(cfg.fusion, init_from_text=False)
    return cfg


def load_exported(export_dir: str | Path):
    """Load a directory written by :func:`export_model` into a :class:`~vlp.model.VLPModel` in eval mode."""
    from vlp.model.vlp_model import VLPModel

    export_dir = Path(export_dir)
    if not (export_dir / CONFIG_NAME).exists():
        raise CheckpointError(f"{export_dir} is not a vlp export: {CONFIG_NAME} is missing")
    cfg = inference_config(config_from_dict(json.loads((export_dir / CONFIG_NAME).read_text())), export_dir)
    model = VLPModel(cfg, load_weights=False)
    load_state_into(model, load_file(str(export_dir / WEIGHTS_NAME)), strict=True)
    return model.eval()
