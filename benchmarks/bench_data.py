"""Data-layer benchmark (not a test): loader throughput and annotation memory.

1. Throughput: images/s through the real DataLoader (decode or draw, train transform, tokenize, collate) for
   0, 1 and 2 workers, on the synthetic default data and on JPEG files (Flickr8k when present, else generated).
2. Memory: process RSS growth (and peak, relative to the post-import baseline) against annotation count (1k ... 1M ALBEF-JSON entries), for the numpy-backed table and,
   for reference, the naive list of dicts; plus the private memory (USS) of two DataLoader workers after two
   epochs, which stays flat when workers do not copy the annotation storage.

Each memory point runs in a fresh interpreter so measurements do not mix. Results go to
benchmarks/results/data.json and a markdown table is printed.

    .venv/bin/python benchmarks/bench_data.py            # full run (a few minutes on 2 cores)
    .venv/bin/python benchmarks/bench_data.py --quick    # smaller sizes, for a smoke run
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import Dataset

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

WORDS = "a man woman dog cat red blue green small large runs jumps sits on in the grass snow water street ball".split()


# ---------------------------------------------------------------------------------------------------------------
# Throughput


def make_tokenizer(folder: Path):
    """A WordPiece tokenizer from a vocab file (offline; cost comparable to BERT's on short captions)."""
    from transformers import BertTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    return BertTokenizerFast.from_pretrained(str(folder))


def jpeg_dataset(tmp: Path, data_root: Path) -> dict:
    """Config overrides for a JPEG dataset: Flickr8k mini when present, else 512 generated 224x224 JPEGs."""
    flickr = data_root / "flickr8k"
    if (flickr / "ann" / "flickr8k_mini_train.json").is_file():
        return {"name": "json", "root": str(flickr), "train_file": "ann/flickr8k_mini_train.json", "label": "flickr8k"}
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    (tmp / "jpegs").mkdir(exist_ok=True)
    entries = []
    for i in range(512):
        Image.fromarray(rng.integers(0, 255, (224, 224, 3), dtype=np.uint8)).save(tmp / "jpegs" / f"{i}.jpg")
        entries.append({"image": f"jpegs/{i}.jpg", "caption": " ".join(rng.choice(WORDS, 10))})
    (tmp / "train.json").write_text(json.dumps(entries))
    return {"name": "json", "root": str(tmp), "train_file": "train.json", "label": "generated-jpeg"}


def measure_throughput(overrides: dict, tokenizer, workers: int, batches: int, batch_size: int) -> dict:
    """images/s over ``batches`` batches after two warm-up batches (worker start-up excluded)."""
    from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

    from vlp.data import DataConfig, VLPDataModule

    settings = {k: v for k, v in overrides.items() if k != "label"}
    cfg = DataConfig(**settings, num_workers=workers, batch_size=batch_size, persistent_workers=False)
    dm = VLPDataModule(cfg, tokenizer, IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)
    # One thread in the main process too, as in a worker: "per worker" then means per core for every row.
    torch.set_num_threads(1)
    dm.setup("fit")
    iterator = iter(dm.train_dataloader())
    for _ in range(2):
        next(iterator)

    # Timed part.
    start, images = time.perf_counter(), 0
    for _ in range(batches):
        images += len(next(iterator)["index"])
    seconds = time.perf_counter() - start
    del iterator
    total = images / seconds
    return {
        "dataset": overrides["label"],
        "workers": workers,
        "images": images,
        "seconds": round(seconds, 2),
        "images_per_s": round(total, 1),
        "images_per_s_per_worker": round(total / max(1, workers), 1),
        "image_size": cfg.image_size,
        "randaugment": cfg.randaugment,
    }


def throughput_section(args, tmp: Path) -> list[dict]:
    tokenizer = make_tokenizer(tmp / "tok")
    datasets = [
        {
            "name": "synthetic",
            "synthetic_train_size": 100000,
            "hflip": False,
            "randaugment": False,
            "crop_scale": (0.85, 1.0),
            "label": "synthetic-64px",
        },  # fmt: skip
        {**jpeg_dataset(tmp, Path(args.data_root)), "crop_scale": (0.5, 1.0)},
    ]
    rows = []
    for overrides in datasets:
        for workers in args.workers:
            row = measure_throughput(overrides, tokenizer, workers, args.batches, args.batch_size)
            print(f"  throughput {row['dataset']} workers={workers}: {row['images_per_s']} img/s", flush=True)
            rows.append(row)
    return rows


# ---------------------------------------------------------------------------------------------------------------
# Memory (each point in a fresh interpreter via --memory-point)


def write_annotations(path: Path, n: int) -> None:
    """ALBEF-style training JSON, COCO-like: 5 captions per image, ~55-character captions."""
    import numpy as np

    rng = np.random.default_rng(0)
    words = np.array(WORDS)
    with open(path, "w") as f:
        f.write("[")
        for i in range(n):
            caption = " ".join(words[rng.integers(0, len(words), 10)])
            entry = {
                "image": f"train2014/COCO_train2014_{i // 5:012d}.jpg",
                "caption": caption,
                "image_id": str(i // 5),
            }
            f.write(("," if i else "") + json.dumps(entry))
        f.write("]")


def rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def peak_rss_mb() -> float:
    """Peak RSS of this process image (VmHWM; unlike ru_maxrss it does not inherit the parent's peak over exec)."""
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith("VmHWM:"))
    return int(line.split()[1]) / 1024  # kB -> MB


def memory_point(path: str, mode: str, epoch_samples: int) -> dict:
    """Load ``path`` as ``mode`` ("table" or "naive") and report memory; runs inside a fresh interpreter."""
    import numpy as np
    import torch

    from vlp.data.annotations import load_albef_json

    # Baseline after imports.
    gc.collect()
    base = rss_mb()
    start = time.perf_counter()
    if mode == "table":
        ann = load_albef_json(path, "bench")
        n = len(ann)
    else:
        with open(path) as f:
            ann = json.load(f)
        n = len(ann)
    load_s = time.perf_counter() - start
    gc.collect()
    loaded = rss_mb()
    peak = peak_rss_mb()

    # Two workers read random entries for two epochs; their private memory shows any copy-on-access growth.
    dataset = _CaptionReader(ann, mode)
    sampler = torch.utils.data.RandomSampler(range(n), num_samples=min(n, epoch_samples))
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=256, sampler=sampler, num_workers=2, persistent_workers=True, collate_fn=len
    )
    uss = []
    for _ in range(2):
        for _ in loader:
            pass
        uss.append(_worker_uss_mb())
    return {
        "mode": mode,
        "entries": n,
        "load_s": round(load_s, 2),
        "rss_after_load_mb": round(loaded - base, 1),
        "peak_rss_mb": round(peak - base, 1),
        "bytes_per_entry": round((loaded - base) * 2**20 / max(n, 1), 1),
        "table_nbytes_mb": round(ann.nbytes / 2**20, 1) if mode == "table" else None,
        "worker_uss_epoch1_mb": uss[0],
        "worker_uss_epoch2_mb": uss[1],
        "worker_samples_per_epoch": int(min(n, epoch_samples)),
        "numpy": np.__version__,
    }


class _CaptionReader(Dataset):
    """Reads what a training item reads from the annotation storage (captions and image path), no pixels."""

    def __init__(self, ann, mode: str) -> None:
        self.ann, self.mode = ann, mode

    def __len__(self) -> int:
        return len(self.ann)

    def __getitem__(self, i: int) -> int:
        if self.mode == "table":
            return len(self.ann.entry_captions(i)[0]) + len(self.ann.images[int(self.ann.entry_image[i])])
        entry = self.ann[i]
        return len(entry["caption"]) + len(entry["image"])


def _worker_uss_mb() -> list[float]:
    import psutil

    children = psutil.Process().children(recursive=True)
    return sorted(round(c.memory_full_info().uss / 2**20, 1) for c in children)


def memory_section(args, tmp: Path) -> list[dict]:
    rows = []
    for n in args.sizes:
        path = tmp / f"ann_{n}.json"
        write_annotations(path, n)
        for mode in ("table", "naive"):
            cmd = [sys.executable, __file__, "--memory-point", str(path), mode, str(args.epoch_samples)]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            row = json.loads(out.strip().splitlines()[-1])
            print(f"  memory {mode} n={n}: +{row['rss_after_load_mb']} MB", flush=True)
            rows.append(row)
        path.unlink()
    return rows


# ---------------------------------------------------------------------------------------------------------------
# Report


def markdown(results: dict) -> str:
    lines = ["### Loader throughput", "", "| dataset | workers | images/s | images/s per worker |", "|---|---|---|---|"]
    for r in results["throughput"]:
        lines.append(f"| {r['dataset']} | {r['workers']} | {r['images_per_s']} | {r['images_per_s_per_worker']} |")
    lines += [
        "",
        "### Annotation memory (RSS growth after loading; worker USS after epoch 1 / 2)",
        "",
        "| entries | storage | load s | table MB | RSS MB | peak RSS MB | RSS bytes/entry | worker USS MB ep1 | ep2 |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results["memory"]:
        table = "-" if r["table_nbytes_mb"] is None else r["table_nbytes_mb"]
        lines.append(
            f"| {r['entries']:,} | {r['mode']} | {r['load_s']} | {table} | {r['rss_after_load_mb']} | "
            f"{r['peak_rss_mb']} | {r['bytes_per_entry']} | {r['worker_uss_epoch1_mb']} | {r['worker_uss_epoch2_mb']} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes for a smoke run")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1_000, 10_000, 100_000, 1_000_000])
    parser.add_argument("--epoch-samples", type=int, default=100_000, help="entries each worker epoch reads")
    parser.add_argument("--data-root", default=os.environ.get("VLP_DATA_ROOT", str(REPO.parent / "shared" / "data")))
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "data.json"))
    parser.add_argument("--memory-point", nargs=3, metavar=("PATH", "MODE", "EPOCH_SAMPLES"), help=argparse.SUPPRESS)
    args = parser.parse_args()

    # Child mode: one memory measurement, printed as JSON.
    if args.memory_point:
        path, mode, samples = args.memory_point
        print(json.dumps(memory_point(path, mode, int(samples))))
        return
    if args.quick:
        args.batches, args.sizes, args.epoch_samples = 5, [1_000, 10_000], 5_000

    with tempfile.TemporaryDirectory() as tmp:
        print("throughput:", flush=True)
        throughput = throughput_section(args, Path(tmp))
        print("memory:", flush=True)
        memory = memory_section(args, Path(tmp))
    results = {
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "loadavg": os.getloadavg()},
        "throughput": throughput,
        "memory": memory,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(markdown(results))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
