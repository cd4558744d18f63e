"""Model: timm image tower, Hugging Face text tower, fusion encoder, projections, momentum copies and queue."""

from vlp.model.config import FusionConfig, ImageEncoderConfig, ModelConfig, TextEncoderConfig
from vlp.model.vlp_model import VLPModel

__all__ = ["FusionConfig", "ImageEncoderConfig", "ModelConfig", "TextEncoderConfig", "VLPModel"]
