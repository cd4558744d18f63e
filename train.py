"""Train a vision-language model: ``python train.py experiment=demo`` (Hydra; configs/ holds the groups).

Examples::

    python train.py experiment=demo                                   # tiny model on synthetic data, CPU
    python train.py experiment=demo trainer.max_steps=50 model.queue_size=1024
    python train.py experiment=pretrain_flickr8k trainer=gpu          # offline pretrained towers, Flickr8k
    python train.py experiment=pretrain_albef_4m trainer=ddp data.shards='/data/cc3m/{00000..00331}.tar'
    python train.py -m experiment=demo optim.lr=1e-4,3e-4,1e-3        # a Hydra sweep
    python train.py experiment=demo debug=fast_dev_run                # one batch through everything
    python train.py experiment=demo ckpt=PATH                         # continue from a checkpoint
    python train.py experiment=demo resume=true hydra.run.dir=DIR     # continue DIR's last.ckpt if any

Every key is typed and checked before anything is built (``vlp.train.config``); the resolved config and the
git commit are written to the run directory together with checkpoints, metrics.csv and curves.png.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import hydra
from omegaconf import DictConfig

log = logging.getLogger("train")

# paths.root_dir defaults to this checkout (configs/paths/default.yaml reads it from the environment).
os.environ.setdefault("VLP_ROOT_DIR", str(Path(__file__).resolve().parent))


@hydra.main(version_base="1.3", config_path="configs", config_name="train")
def main(cfg: DictConfig) -> float | None:
    """Run one training; return the metric named by ``optimized_metric`` for Hydra sweepers."""
    from vlp.train.run import train  # after Hydra has set up logging and the run directory

    metrics = train(cfg)
    metric_name = cfg.get("optimized_metric")
    if metric_name and metric_name not in metrics:
        log.warning("optimized_metric=%s was not logged (validation off?); logged: %s", metric_name, sorted(metrics))
    return metrics.get(metric_name) if metric_name else None


if __name__ == "__main__":
    main()
