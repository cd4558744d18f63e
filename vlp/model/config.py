"""Typed model configuration, validated before any weights are built."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class ImageEncoderConfig:
    name: str = "vit_tiny_patch16_224"  # any timm model name
    pretrained: bool = False  # download the timm weights for `name` from the hub
    checkpoint: str | None = None  # local weight file (safetensors or torch state dict), loaded by timm
    image_size: int = 224
    timm_kwargs: dict[str, Any] = field(default_factory=dict)  # e.g. {depth: 4, embed_dim: 192, num_heads: 3}
    freeze: bool = False
    freeze_layers: int = 0  # freeze the stem and this many lower block groups
    grad_checkpointing: bool = False
    cache_outputs: bool = False  # memoise a frozen tower's outputs (needs freeze=true, no random augmentation)
    pos_embed_init: str = "timm"  # "timm" or "sincos": a random ViT's position embeddings start as 2-D sin-cos (MAE)


@dataclass
class TextEncoderConfig:
    name: str | None = None  # hub name or local directory; None builds a random BERT from `config`
    config: dict[str, Any] = field(default_factory=dict)  # transformers config overrides for random init
    tokenizer: str | None = None  # hub name or directory; None: same as `name`, or the built-in vocabulary
    max_length: int = 32
    num_layers: int | None = None  # keep this many lower layers; the top ones can initialise the fusion
    pooling: str = "cls"  # "cls" or "mean": how the ITC text embedding is pooled
    freeze: bool = False
    freeze_layers: int = 0
    grad_checkpointing: bool = False
    cache_outputs: bool = False  # memoise a frozen tower's outputs per caption (needs freeze=true)


@dataclass
class FusionConfig:
    num_layers: int = 2
    num_heads: int | None = None  # None: the text encoder's head count
    mlp_ratio: float | None = None  # None: the text encoder's intermediate size over its width
    dropout: float = 0.0
    init_from_text: bool = True  # ALBEF: initialise self-attention and MLP from the text encoder's top layers


@dataclass
class ModelConfig:
    image_encoder: ImageEncoderConfig = field(default_factory=ImageEncoderConfig)
    text_encoder: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    fusion: FusionConfig = field(default_factory=FusionConfig)
    embed_dim: int = 256
    temperature: float = 0.07
    temperature_min: float = 0.001
    temperature_max: float = 0.5
    itm: bool = True
    itm_negatives: str = "local"  # "local" (this rank's batch) or "world" (all ranks, gradient to the producer)
    itm_hard_negatives: int = 1  # hard negatives drawn per image and per caption (ALBEF, BLIP: 1)
    mlm: bool = False  # image-conditioned masked language modelling through the fusion encoder (ALBEF)
    mlm_probability: float = 0.15  # chance that a word token is chosen for MLM (BERT, ALBEF: 0.15)
    momentum: bool = True
    momentum_decay: float = 0.995
    queue_size: int = 65536  # 0: no queue
    distill: bool = True
    alpha: float = 0.4

    def validate(self) -> None:
        """Reject impossible combinations, naming the key to change."""
        checks = [
            (self.embed_dim > 0, "model.embed_dim must be positive"),
            (
                0 < self.temperature_min <= self.temperature <= self.temperature_max,
                "model.temperature must lie in [model.temperature_min, model.temperature_max]",
            ),
            (self.itm_negatives in ("local", "world"), "model.itm_negatives must be 'local' or 'world'"),
            (self.itm_hard_negatives >= 1, "model.itm_hard_negatives must be >= 1"),
            (self.queue_size >= 0, "model.queue_size must be >= 0 (0 disables the queue)"),
            (self.momentum or self.queue_size == 0, "model.queue_size > 0 needs model.momentum=true (or queue_size=0)"),
            (self.momentum or not self.distill, "model.distill=true needs model.momentum=true"),
            (0.0 <= self.alpha <= 1.0, "model.alpha must lie in [0, 1]"),
            (0.0 <= self.momentum_decay < 1.0, "model.momentum_decay must lie in [0, 1)"),
            (self.fusion.num_layers >= 1 or not self.itm, "model.fusion.num_layers must be >= 1 when model.itm=true"),
            (self.fusion.num_layers >= 1 or not self.mlm, "model.fusion.num_layers must be >= 1 when model.mlm=true"),
            (0.0 < self.mlm_probability < 1.0, "model.mlm_probability must lie in (0, 1)"),
            (
                not (self.mlm and self.text_encoder.cache_outputs),
                "model.mlm=true re-encodes masked captions: set model.text_encoder.cache_outputs=false",
            ),
            (self.text_encoder.pooling in ("cls", "mean"), "model.text_encoder.pooling must be 'cls' or 'mean'"),
            (self.image_encoder.image_size > 0, "model.image_encoder.image_size must be positive"),
            (
                self.image_encoder.pos_embed_init in ("timm", "sincos"),
                "model.image_encoder.pos_embed_init must be 'timm' or 'sincos'",
            ),
            (
                self.image_encoder.pos_embed_init == "timm"
                or not (self.image_encoder.pretrained or self.image_encoder.checkpoint),
                "model.image_encoder.pos_embed_init=sincos would overwrite pretrained weights: use it with "
                "pretrained=false and checkpoint=null",
            ),
            (
                self.image_encoder.freeze or not self.image_encoder.cache_outputs,
                "model.image_encoder.cache_outputs=true needs model.image_encoder.freeze=true",
            ),
            (
                self.text_encoder.freeze or not self.text_encoder.cache_outputs,
                "model.text_encoder.cache_outputs=true needs model.text_encoder.freeze=true",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
