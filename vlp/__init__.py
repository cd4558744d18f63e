"""vlp: vision-language pretraining in the ALBEF/BLIP family."""

from vlp.checkpoint import export_model as export
from vlp.model import ModelConfig, VLPModel

__version__ = "0.1.0"
__all__ = ["ModelConfig", "VLPModel", "__version__", "export"]
