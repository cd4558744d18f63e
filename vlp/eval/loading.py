"""Load a model for evaluation from a Lightning checkpoint file or an exported directory.

Files are read by :func:`vlp.checkpoint.read_checkpoint`: ``torch.load(path, map_location="cpu",
weights_only=True)`` (tensors and plain containers only, never pickled code) or a safetensors file. The
layout expected from the training module:

* ``state_dict``: the LightningModule's weights, the model's under the ``model.`` prefix;
* ``hyper_parameters``: the resolved run configuration as plain dicts, with a ``model`` section matching
  :class:`vlp.model.config.ModelConfig`, at the top level or one level down (``{"cfg": {"model": ...}}``).

Directories are exports, loaded with ``VLPModel.from_pretrained``.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from vlp.checkpoint import CheckpointError, load_state_into, model_state_dict, read_checkpoint
from vlp.model import ModelConfig, VLPModel

PREFIX = "model."


def config_from_dict(cls: type, values: Mapping[str, Any], where: str = "model"):
    """Build the (nested) dataclass ``cls`` from plain mappings, rejecting unknown keys by their full name."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise CheckpointError(f"unknown config key {where}.{unknown[0]} in the checkpoint for {cls.__name__}")
    kwargs = {}
    for name, value in values.items():
        field_type = hints[name]
        if dataclasses.is_dataclass(field_type) and isinstance(value, Mapping):
            value = config_from_dict(field_type, value, f"{where}.{name}")
        kwargs[name] = value
    return cls(**kwargs)


def model_section(hparams: Any) -> Mapping[str, Any]:
    """The ``model`` section of a checkpoint's hyper_parameters: at the top level or in one nested mapping."""
    if isinstance(hparams, Mapping):
        if isinstance(hparams.get("model"), Mapping):
            return hparams["model"]
        for value in hparams.values():
            if isinstance(value, Mapping) and isinstance(value.get("model"), Mapping):
                return value["model"]
    raise CheckpointError("checkpoint hyper_parameters have no 'model' section (a plain dict like ModelConfig)")


def _model_weights(ckpt: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    # A LightningModule may hold more than the model: keep the ``model.`` entries when there are any.
    state = ckpt.get("state_dict", ckpt)
    if any(key.startswith(PREFIX) for key in state):
        state = {key: value for key, value in state.items() if key.startswith(PREFIX)}
    return model_state_dict({"state_dict": state})


def load_model_for_eval(path: str | Path, device: str | torch.device = "cpu") -> VLPModel:
    """A :class:`VLPModel` in eval mode on ``device``, from a checkpoint file or an exported directory."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist (pass ckpt=PATH)")
    if path.is_dir():
        model = VLPModel.from_pretrained(path)
    else:
        ckpt = read_checkpoint(path)
        if not isinstance(ckpt, Mapping) or "hyper_parameters" not in ckpt:
            raise CheckpointError(f"{path} has no hyper_parameters: the model config is unknown (export it instead)")
        cfg = config_from_dict(ModelConfig, model_section(ckpt["hyper_parameters"]))
        # The checkpoint holds every weight: build the architecture only, without the towers' pretrained files.
        model = VLPModel(cfg, load_weights=False)
        load_state_into(model, _model_weights(ckpt), strict=True)
    return model.to(device).eval()
