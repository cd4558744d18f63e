"""Evaluate image-text retrieval: ``python eval.py ckpt=PATH`` (Hydra; the root config is configs/eval.yaml).

Examples::

    python eval.py ckpt=logs/train/runs/DATE/checkpoints/last.ckpt             # synthetic test split
    python eval.py ckpt=EXPORT_DIR data=flickr8k split=test eval.k=128          # an exported model directory
    python eval.py ckpt=PATH eval.score=itm_plus_itc output_dir=/tmp/eval      # BLIP-style final score
    torchrun --nproc_per_node=8 eval.py ckpt=PATH data=coco eval.k=256          # each process takes a shard

Writes metrics.json (re-ranked and ``itc_`` metrics) and report.html (sample queries with thumbnails) to the
Hydra run directory, or to ``output_dir=``.
"""

from __future__ import annotations

import os
from pathlib import Path

import hydra
from omegaconf import DictConfig

# paths.root_dir defaults to this checkout (configs/paths/default.yaml reads it from the environment).
os.environ.setdefault("VLP_ROOT_DIR", str(Path(__file__).resolve().parent))


@hydra.main(version_base="1.3", config_path="configs", config_name="eval")
def main(cfg: DictConfig) -> dict[str, float]:
    from vlp.eval.run import run_eval  # after Hydra has set up logging and the run directory

    return run_eval(cfg)


if __name__ == "__main__":
    main()
