#!/usr/bin/env bash
# The one prepared call for a GPU machine: every benchmark once, on cuda with bf16 autocast, each training system
# through DistributedDataParallel on one device (the DDP strategy of configs/trainer/ddp.yaml; --ddp off to compare).
#
#   bash benchmarks/gpu.sh            # results under $OUT when set, else benchmarks/results
#   bash benchmarks/gpu.sh --profile  # extra arguments go to benchmarks/run.py
#
# --quick keeps bench_eval.py and bench_data.py (CPU-side scripts) short; on cuda the training rounds are
# still 3 warm-up + 10 timed per system. The whole call is bounded by GPU_BENCH_TIMEOUT seconds (default 540).
set -euo pipefail
cd "$(dirname "$0")/.."

PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
DEST="${OUT:-benchmarks/results}"
mkdir -p "$DEST"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # vlp from this checkout even when not pip-installed

# The machine has no network: torch, timm, transformers and vlp must already import (open_clip is optional,
# its row then says "not run").
if ! "$PY" -c "import torch, timm, transformers, vlp" 2>"$DEST/import_error.txt"; then
  echo "gpu.sh: $PY cannot import torch/timm/transformers/vlp (see $DEST/import_error.txt);" \
    "install with: pip install -e '.[bench]'" >&2
  exit 2
fi
rm -f "$DEST/import_error.txt"

# What the numbers were measured on, next to them.
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true; } > "$DEST/gpu.txt" 2>&1
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.is_available())" \
  >> "$DEST/gpu.txt" 2>&1 || true

timeout "${GPU_BENCH_TIMEOUT:-540}" "$PY" benchmarks/run.py --device cuda --quick --out "$DEST" "$@" 2>&1 \
  | tee "$DEST/run.log"
