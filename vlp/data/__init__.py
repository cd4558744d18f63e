"""Data layer: every format (synthetic, ALBEF/BLIP JSON, COCO, Karpathy, Hugging Face, webdataset) loads into one
sample schema through :class:`VLPDataModule`. See ``data/README.md`` for formats and preparation."""

from vlp.data.annotations import Annotations, check_image_root, load_albef_json, load_coco_captions, load_karpathy
from vlp.data.captions import clean_caption
from vlp.data.collate import EvalImageCollator, ImageTextCollator, tokenize_texts
from vlp.data.config import DataConfig
from vlp.data.datamodule import DataProgressCallback, VLPDataModule
from vlp.data.datasets import ImageTextDataset, RetrievalDataset
from vlp.data.errors import BadSample, DataSetupError
from vlp.data.images import ImageLimits, load_image
from vlp.data.sampler import ShardedSampler, eval_shard_indices
from vlp.data.skips import SkipCounter
from vlp.data.synthetic import Scene, SyntheticScenes
from vlp.data.transforms import build_transform

__all__ = [
    "Annotations",
    "BadSample",
    "DataConfig",
    "DataProgressCallback",
    "DataSetupError",
    "EvalImageCollator",
    "ImageLimits",
    "ImageTextCollator",
    "ImageTextDataset",
    "RetrievalDataset",
    "Scene",
    "ShardedSampler",
    "SkipCounter",
    "SyntheticScenes",
    "VLPDataModule",
    "build_transform",
    "check_image_root",
    "clean_caption",
    "eval_shard_indices",
    "load_albef_json",
    "load_coco_captions",
    "load_image",
    "load_karpathy",
    "tokenize_texts",
]
