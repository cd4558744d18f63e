"""Unimodal towers: any timm image model and any Hugging Face text encoder, imported rather than forked."""

from __future__ import annotations

import logging

import timm
import torch
import torch.nn as nn
from timm.layers import build_sincos2d_pos_embed
from transformers import AutoConfig, AutoModel, BertConfig

from vlp.model.cache import TowerCache, digest
from vlp.model.config import ImageEncoderConfig, TextEncoderConfig

log = logging.getLogger(__name__)


def _freeze_lower(groups: list[list[nn.Parameter]], num_groups: int) -> None:
    for group in groups[:num_groups]:
        for param in group:
            param.requires_grad_(False)


class Tower(nn.Module):
    """What both towers share: a fully frozen tower stays in eval mode, runs without autograd and may memoise."""

    def _setup_frozen(self, freeze: bool, cache_outputs: bool) -> None:
        self.frozen = freeze
        self.cache = TowerCache() if cache_outputs else None

    def train(self, mode: bool = True) -> Tower:
        # Dropout and batch-norm statistics must not move in a frozen tower, or it is not frozen.
        return super().train(mode and not self.frozen)

    def _run(self, keys_from, compute, *inputs) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.frozen:
            return compute(*inputs)
        with torch.no_grad():
            if self.cache is None:
                return compute(*inputs)
            keys = keys_from(*inputs)
            return self.cache(keys, lambda rows: compute(*(x[rows] for x in inputs)), inputs[0].device)


class ImageEncoder(Tower):
    """A timm model returning its token sequence (B, N, C) and its pooled embedding (B, C).

    CNN feature maps (B, C, H, W) are flattened to H*W tokens so that the fusion encoder sees one layout.
    """

    def __init__(self, cfg: ImageEncoderConfig, load_weights: bool = True):
        super().__init__()
        self.cfg = cfg
        self.model = self._create(cfg, load_weights)
        self.width = self.model.num_features
        self.pretrained_cfg = dict(self.model.pretrained_cfg)
        self._check_patch_size(cfg)
        if cfg.pos_embed_init == "sincos":
            self._init_sincos_pos_embed()
        if cfg.grad_checkpointing:
            self.model.set_grad_checkpointing(True)
        self._apply_freeze(cfg)
        self._setup_frozen(cfg.freeze, cfg.cache_outputs)

    @staticmethod
    def _create(cfg: ImageEncoderConfig, load_weights: bool) -> nn.Module:
        # A local file is loaded by timm itself, which also resamples ViT position embeddings to image_size.
        kwargs = dict(cfg.timm_kwargs, num_classes=0)
        pretrained = load_weights and (cfg.pretrained or cfg.checkpoint is not None)
        if pretrained and cfg.checkpoint is not None:
            kwargs["pretrained_cfg_overlay"] = dict(file=cfg.checkpoint)
        try:
            return timm.create_model(cfg.name, pretrained=pretrained, img_size=cfg.image_size, **kwargs)
        except TypeError:  # CNNs take any input size and have no img_size argument
            return timm.create_model(cfg.name, pretrained=pretrained, **kwargs)

    def _check_patch_size(self, cfg: ImageEncoderConfig) -> None:
        patch_embed = getattr(self.model, "patch_embed", None)
        patch = getattr(patch_embed, "patch_size", None)
        if patch is not None and cfg.image_size % patch[0] != 0:
            raise ValueError(
                f"model.image_encoder.image_size={cfg.image_size} is not divisible by the patch size {patch[0]} "
                f"of {cfg.name}; choose a multiple of {patch[0]}"
            )

    @torch.no_grad()
    def _init_sincos_pos_embed(self) -> None:
        """Start the patch positions from fixed 2-D sin-cos codes (prefix tokens at zero), as MAE does.

        A random ViT's learned position embeddings start near zero (std 0.02), so from scratch its tokens say
        little about where they are; sin-cos codes make the layout visible from the first step (still trained).
        """
        pos_embed = getattr(self.model, "pos_embed", None)
        grid = getattr(getattr(self.model, "patch_embed", None), "grid_size", None)
        if not isinstance(pos_embed, nn.Parameter) or grid is None:
            raise ValueError(
                f"model.image_encoder.pos_embed_init=sincos needs a ViT with learned position embeddings; "
                f"{self.cfg.name} has none (use pos_embed_init=timm)"
            )
        num_patches, width = grid[0] * grid[1], pos_embed.shape[-1]
        codes = build_sincos2d_pos_embed(list(grid), dim=width).to(pos_embed.dtype)  # (H*W, C)
        pos_embed.zero_()
        pos_embed[0, pos_embed.shape[1] - num_patches :] = codes  # prefix tokens (class) come first

    def block_groups(self) -> list[list[nn.Parameter]]:
        """Parameters from the stem upwards, one list per timm block group (used for freezing and lr decay)."""
        matcher = self.model.group_matcher(coarse=True)
        grouping = timm.models.group_parameters(self.model, matcher, reverse=False)
        params = dict(self.model.named_parameters())
        return [[params[name] for name in names] for names in grouping.values()]

    def _apply_freeze(self, cfg: ImageEncoderConfig) -> None:
        groups = self.block_groups()
        _freeze_lower(groups, len(groups) if cfg.freeze else cfg.freeze_layers)

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Image tokens (B, N, C) and the pooled embedding (B, C)."""
        return self._run(lambda x: [digest(row) for row in x], self._forward, image)

    def _forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.model.forward_features(image)
        pooled = self.model.forward_head(features, pre_logits=True)  # (B, C)
        if features.dim() == 4:
            features = features.flatten(2).transpose(1, 2)  # (B, C, H, W) -> (B, H*W, C)
        return features, pooled


def _encoder_layers(model: nn.Module) -> nn.ModuleList:
    """The list of Transformer layers of a BERT-like encoder (``encoder.layer``) or similar."""
    for path in ("encoder.layer", "encoder.layers", "transformer.layer", "layers"):
        module = model
        for attr in path.split("."):
            module = getattr(module, attr, None)
        if isinstance(module, nn.ModuleList):
            return module
    raise ValueError(
        f"cannot find the Transformer layers of {type(model).__name__}; set model.text_encoder.num_layers=null"
    )


class TextEncoder(Tower):
    """A Hugging Face encoder (``AutoModel``) by hub name or local directory, or a random BERT from a config.

    With ``num_layers`` set, only the lower layers are kept; the removed top layers are returned by
    :meth:`pop_top_layers` so that the fusion encoder can start from them, as ALBEF does.
    """

    def __init__(self, cfg: TextEncoderConfig, vocab_size: int, load_weights: bool = True):
        super().__init__()
        self.cfg = cfg
        self.model = self._create(cfg, vocab_size, load_weights)
        self.model.pooler = None  # unused: ITC pools itself; an unused module would stall DDP
        self.width = self.model.config.hidden_size
        self.num_heads = self.model.config.num_attention_heads
        self.mlp_ratio = getattr(self.model.config, "intermediate_size", 4 * self.width) / self.width
        self.top_layers = self._truncate(cfg.num_layers)
        if cfg.grad_checkpointing:
            self.model.gradient_checkpointing_enable()
        _freeze_lower(self.block_groups(), len(self.block_groups()) if cfg.freeze else cfg.freeze_layers)
        self._setup_frozen(cfg.freeze, cfg.cache_outputs)

    @staticmethod
    def _create(cfg: TextEncoderConfig, vocab_size: int, load_weights: bool) -> nn.Module:
        # Without load_weights only the architecture is built (the weights come from a vlp checkpoint).
        if cfg.name is not None and load_weights:
            return AutoModel.from_pretrained(cfg.name)
        if cfg.name is not None:
            return AutoModel.from_config(AutoConfig.from_pretrained(cfg.name))
        config = BertConfig(vocab_size=vocab_size, **cfg.config)
        return AutoModel.from_config(config)

    def _truncate(self, num_layers: int | None) -> list[nn.Module]:
        if num_layers is None:
            return []
        layers = _encoder_layers(self.model)
        if not 0 < num_layers <= len(layers):
            raise ValueError(f"model.text_encoder.num_layers={num_layers} must lie in [1, {len(layers)}]")
        top = list(layers[num_layers:])
        del layers[num_layers:]
        self.model.config.num_hidden_layers = num_layers
        return top

    def top_layer_copies(self, count: int) -> list[nn.Module]:
        """The weights of the top ``count`` layers (the text tower keeps all of its layers)."""
        layers = _encoder_layers(self.model)
        return list(layers[max(0, len(layers) - count) :])

    def pop_top_layers(self) -> list[nn.Module]:
        top, self.top_layers = self.top_layers, []
        return top

    def block_groups(self) -> list[list[nn.Parameter]]:
        """Embeddings first, then one group per layer (used for freezing and layer-wise lr decay)."""
        layers = _encoder_layers(self.model)
        layer_params = {id(p) for layer in layers for p in layer.parameters()}
        stem = [p for p in self.model.parameters() if id(p) not in layer_params]
        return [stem] + [list(layer.parameters()) for layer in layers]

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Text tokens (B, L, D) and the pooled embedding (B, D); cached rows are keyed by their unpadded ids."""
        keys = lambda ids, mask: [digest(row[m.bool()]) for row, m in zip(ids, mask)]  # noqa: E731
        text_embeds, pooled = self._run(keys, self._forward, input_ids, attention_mask)
        return text_embeds[:, : input_ids.shape[1]], pooled

    def _forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        text_embeds = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (B, L, D)
        if self.cfg.pooling == "mean":
            weights = attention_mask.unsqueeze(-1).to(text_embeds.dtype)  # (B, L, 1)
            pooled = (text_embeds * weights).sum(1) / weights.sum(1).clamp_min(1.0)
        else:
            pooled = text_embeds[:, 0]
        return text_embeds, pooled
