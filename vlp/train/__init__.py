"""Training: typed run config, the LightningModule, optimizer/schedule, callbacks, and the ``train(cfg)`` entry."""

from vlp.train.config import TrainConfig, load_config, model_config_from_dict
from vlp.train.module import VLPLightningModule

__all__ = ["TrainConfig", "VLPLightningModule", "load_config", "model_config_from_dict", "train"]


def train(cfg):
    """Fit a model from a composed Hydra config; see :func:`vlp.train.run.train` (imported lazily)."""
    from vlp.train.run import train as _train

    return _train(cfg)
