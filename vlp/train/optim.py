"""AdamW parameter groups: weight decay only where it helps, layer-wise lr decay, a multiplier for new modules.

Every trainable parameter gets an lr scale and a weight decay; parameters sharing both share a group.
The scale is ``layer_decay ** depth`` inside a tower (depth counted from its top block group downwards, via
``block_groups()``), times ``new_module_lr_mult`` for modules matched by ``optim.new_modules``. Momentum
copies (``*_m``) and frozen layers have ``requires_grad=False`` and never reach the optimizer.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from fnmatch import fnmatchcase

import torch
import torch.nn as nn

from vlp.train.config import OptimConfig

log = logging.getLogger(__name__)

TOWERS = ("visual_encoder", "text_encoder")


@dataclass
class GroupSpec:
    """One optimizer group before it is handed to torch: its parameters and how they are treated."""

    label: str
    lr_scale: float
    weight_decay: float
    params: list[nn.Parameter] = field(default_factory=list)
    names: list[str] = field(default_factory=list)


def layer_scales(model: nn.Module, layer_decay: float) -> dict[str, tuple[float, str]]:
    """Parameter name -> (lr scale, depth label) for the towers' block groups; top group scale 1."""
    scales: dict[str, tuple[float, str]] = {}
    if layer_decay == 1.0:
        return scales
    names_by_id = {id(p): name for name, p in model.named_parameters()}
    for tower in TOWERS:
        groups = getattr(model, tower).block_groups()
        for depth, group in enumerate(groups):
            # The stem is depth 0; the top group keeps the full lr.
            scale = layer_decay ** (len(groups) - 1 - depth)
            for param in group:
                scales[names_by_id[id(param)]] = (scale, f"{tower}.{depth}")
    return scales


def is_no_decay(name: str, param: nn.Parameter, patterns: list[str]) -> bool:
    """Biases, norm weights and the temperature (rank <= 1) and named embeddings are not decayed."""
    return param.ndim <= 1 or any(fnmatchcase(name, pattern) for pattern in patterns)


def group_specs(model: nn.Module, cfg: OptimConfig) -> list[GroupSpec]:
    """Trainable parameters grouped by (lr scale, weight decay), in a stable order."""
    scales = layer_scales(model, cfg.layer_decay)
    specs: dict[tuple[str, float, bool], GroupSpec] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        scale, depth = scales.get(name, (1.0, name.split(".")[0] if name.split(".")[0] in TOWERS else "head"))
        new = any(fnmatchcase(name, pattern) for pattern in cfg.new_modules)
        if new:
            scale, depth = scale * cfg.new_module_lr_mult, "new"
        decay = 0.0 if is_no_decay(name, param, cfg.no_decay) else cfg.weight_decay

        # Grouping by label keeps the printed table readable; the label fixes scale and decay.
        label = f"{depth}/{'decay' if decay else 'no_decay'}"
        spec = specs.setdefault((label, scale, bool(decay)), GroupSpec(label, scale, decay))
        spec.params.append(param)
        spec.names.append(name)
    return list(specs.values())


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.AdamW:
    """AdamW over :func:`group_specs`; every group remembers its ``lr_scale`` for logging."""
    groups = [
        {"params": s.params, "lr": cfg.lr * s.lr_scale, "weight_decay": s.weight_decay, "lr_scale": s.lr_scale}
        for s in group_specs(model, cfg)
    ]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps)


def describe_groups(specs: list[GroupSpec], base_lr: float) -> str:
    """A table of the optimizer groups: label, tensors, parameters, lr, weight decay, first parameter name."""
    lines = [f"{'group':<28} {'tensors':>7} {'params':>11} {'lr':>10} {'wd':>6}  example"]
    for s in specs:
        count = sum(p.numel() for p in s.params)
        lr = base_lr * s.lr_scale
        lines.append(f"{s.label:<28} {len(s.params):>7} {count:>11,} {lr:>10.3g} {s.weight_decay:>6.3g}  {s.names[0]}")
    return "\n".join(lines)
