"""Run every benchmark and print one markdown table.

    python benchmarks/run.py [--quick] [--device auto|cpu|cuda] [--out DIR]

The training and ITM benchmarks (bench_train.py) run first, then bench_eval.py and bench_data.py as
subprocesses (with --quick / --device when their --help offers them); a script that is absent or fails
becomes a "not run" row. Writes train.json, summary.json and summary.md under --out (default
benchmarks/results, or $OUT when set) and copies eval.json and data.json there when they were written
elsewhere. Targets are reported, never asserted.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import bench_train  # noqa: E402
import common  # noqa: E402

PEER_SCRIPTS = {"eval": "bench_eval.py", "data": "bench_data.py"}
RERANK_TARGET = 3.0  # batched re-rank over the per-query loop, issue #8
HEADER = ("benchmark", "system", "throughput", "median", "peak RSS MB", "GFLOP/step", "MFU", "ours/peer", "verdict")

# ----- peer scripts ------------------------------------------------------------------------------------------


def script_flags(path: Path) -> str:
    """The script's --help text ('' when it has none), to pass only the flags it understands."""
    done = subprocess.run([sys.executable, str(path), "--help"], capture_output=True, text=True, timeout=120)
    return done.stdout if done.returncode == 0 else ""


def run_script(key: str, args: argparse.Namespace, device: str) -> dict[str, Any]:
    """Run benchmarks/bench_<key>.py; return its status and the JSON it wrote (results/<key>.json)."""
    path = HERE / PEER_SCRIPTS[key]
    if not path.exists():
        return {"status": "not run", "reason": f"benchmarks/{path.name} is absent"}
    flags = script_flags(path)
    cmd = [sys.executable, str(path)]
    cmd += ["--quick"] if args.quick and "--quick" in flags else []
    cmd += ["--device", device] if "--device" in flags else []
    written = common.RESULTS_DIR / f"{key}.json"
    previous = written.read_bytes() if written.exists() else None
    started = time.time()
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=args.script_timeout)
    except subprocess.TimeoutExpired:
        return {"status": "failed", "reason": f"timed out after {args.script_timeout} s", "command": cmd}
    result = script_result(written, cmd, done, started, args.out)
    if args.quick and previous is not None and result.get("raw") is not None:
        restore(written, previous, result["raw"])
    return result


def script_result(written: Path, cmd: list[str], done, started: float, out: Path) -> dict[str, Any]:
    result = {"command": cmd, "seconds": round(time.time() - started, 1), "returncode": done.returncode}
    if done.returncode != 0:
        return {**result, "status": "failed", "reason": done.stderr[-2000:]}
    if not written.exists() or written.stat().st_mtime < started:
        return {**result, "status": "failed", "reason": f"{written} was not written by this run"}
    raw = written.read_bytes()
    if out.resolve() != common.RESULTS_DIR:
        (out / written.name).write_bytes(raw)
    return {**result, "status": "ok", "json": json.loads(raw), "raw": raw}


def restore(written: Path, previous: bytes, ours: bytes) -> None:
    """After a quick run, put the owner's results back, unless someone rewrote the file meanwhile."""
    if written.read_bytes() == ours:
        written.write_bytes(previous)


# ----- table rows --------------------------------------------------------------------------------------------


def fmt(value: Any, spec: str = ".2f", suffix: str = "") -> str:
    return "-" if value is None else f"{format(value, spec)}{suffix}"


def row(*cells: Any) -> list[str]:
    cells = [str(cell) for cell in cells]
    return cells + [""] * (len(HEADER) - len(cells))


def train_rows(train: dict[str, Any]) -> list[list[str]]:
    """One row per training system, then one per comparison with its target."""
    labels = {"vlp_a": "(a) ITC", "vlp_b": "(b) ITC+ITM", "vlp_c": "(c) +momentum/queue/distill"}
    labels.update(open_clip="(a) peer", blip_forward="(b) peer", blip_reuse="(b) peer")
    rows = []
    for name, res in train["systems"].items():
        rows.append(
            row(
                f"train {labels.get(name, '')}",
                name,
                fmt(res["pairs_per_s"], ".2f", " pairs/s"),
                f"{res['median_step_s'] * 1e3:.0f} ms (best {res['best_step_s'] * 1e3:.0f})",
                fmt(res.get("peak_rss_mb"), ".0f"),
                fmt(res.get("flops_per_step") and res["flops_per_step"] / 1e9, ".1f"),
                fmt(res.get("mfu") and 100 * res["mfu"], ".1f", "%"),
            )
        )
    for name, error in train["errors"].items():
        if name in bench_train.TRAIN_SYSTEMS:  # failed to build, to train, or died
            rows.append(row("train", name, "not run", "", "", "", "", "", short(error)))
    return rows + [comparison_row(c) for c in train["comparisons"]]


def comparison_row(comp: dict[str, Any]) -> list[str]:
    name = f"{comp['ours']} vs {comp['peer']}"
    if comp["status"] == "not run":
        return row("train target", name, "not run", "", "", "", "", "", f"not run (target >= {comp['target']}x)")
    ratio = comp["ratio"]
    spread = f"{ratio['median']:.2f}x [{ratio['min']:.2f}-{ratio['max']:.2f}], best {comp['ratio_of_best']:.2f}x"
    return row("train target", name, "", "", "", "", "", spread, f"{comp['status']} (target >= {comp['target']}x)")


def itm_rows(itm: dict[str, Any], errors: dict[str, str]) -> list[list[str]]:
    rows = [
        row(
            "ITM scoring",
            mode,
            fmt(res["pairs_per_s"], ".0f", " pairs/s"),
            fmt(common.median(res["call_s"]) * 1e3, ".0f", " ms"),
        )
        for mode, res in itm["modes"].items()
    ]
    for name, error in errors.items():
        if " itm " in name:
            rows.append(row("ITM scoring", name.split(" itm ")[1], "not run", "", "", "", "", "", short(error)))
    for name, ratio in itm["ratios"].items():
        if ratio:
            ours, peer = (min(itm["modes"][mode]["call_s"]) for mode in name.split("/"))
            spread = f"{ratio['median']:.2f}x [{ratio['min']:.2f}-{ratio['max']:.2f}], best {peer / ours:.2f}x"
            rows.append(row("ITM scoring", name, "", "", "", "", "", spread, "reported (no target)"))
    return rows


def verdict(ratio: float, target: float) -> str:
    return f"{'met' if ratio >= target else 'MISSED'} (target >= {target:g}x)"


def eval_rows(result: dict[str, Any]) -> list[list[str]]:
    """bench_eval.py: one row per (N, k) with the re-rank speed-up over the per-query loop."""
    if result["status"] != "ok":
        return [row("eval re-rank", "bench_eval.py", result["status"], "", "", "", "", "", short(result["reason"]))]
    rows = []
    for item in result["json"].get("rows", []):
        speedup = item.get("speedup_rerank")
        ours = item.get("ours", {})
        rows.append(
            row(
                "eval re-rank",
                f"N={item.get('n_images')} k={item.get('k')}",
                fmt(ours.get("pairs_scored"), "d", " pairs"),
                fmt(ours.get("rerank_seconds"), ".2f", " s"),
                fmt(item.get("ours_peak_mb"), ".0f"),
                "",
                "",
                fmt(speedup, ".1f", "x vs ALBEF loop") if speedup else "loop not run",
                verdict(speedup, RERANK_TARGET) if speedup else "",
            )
        )
    return rows or [row("eval re-rank", "bench_eval.py", "ran", "", "", "", "", "", "no 'rows' in eval.json")]


def short(text: str) -> str:
    lines = [line for line in str(text).strip().splitlines() if line.strip()]
    return (lines[-1] if lines else "")[:100].replace("|", "/")


# ----- data loader rows --------------------------------------------------------------------------------------


def default_num_workers() -> int | None:
    """``data.num_workers``'s default in vlp's data config, read without constructing the config."""
    try:
        from vlp.data.config import DataConfig
    except ImportError:
        return None
    for item in dataclasses.fields(DataConfig):
        if item.name == "num_workers" and isinstance(item.default, int):
            return item.default
    return None


def data_rows(result: dict[str, Any], train: dict[str, Any]) -> tuple[list[list[str]], dict[str, Any]]:
    """bench_data.py's throughput, and the check that the default loader outpaces the fastest training step."""
    if result["status"] != "ok":
        reason = short(result["reason"])
        rows = [row("loader", "bench_data.py", result["status"], "", "", "", "", "", reason)]
        return rows + [row("loader vs train", "default workers", "not run", "", "", "", "", "", reason)], {}
    entries = [e for e in result["json"].get("throughput", []) if isinstance(e, dict) and "images_per_s" in e]
    rows = [loader_row(entry) for entry in entries]
    supply = default_supply(entries, result["json"])
    return rows + [bottleneck_row(supply, train)], supply


def loader_row(entry: dict[str, Any]) -> list[str]:
    name = f"{entry.get('dataset', '?')}, {entry.get('workers', '?')} workers"
    per_worker = fmt(entry.get("images_per_s_per_worker"), ".0f", " /worker")
    return row("loader", name, fmt(entry["images_per_s"], ".0f", " images/s"), per_worker)


def default_supply(entries: list[dict[str, Any]], data: dict[str, Any]) -> dict[str, Any]:
    """Images/s of the slowest dataset at the default worker count (measured there, else per-worker x workers)."""
    workers = default_num_workers() or data.get("default_num_workers")
    by_dataset: dict[str, float] = {}
    for entry in entries:
        dataset = str(entry.get("dataset"))
        if entry.get("workers") == workers:
            by_dataset[dataset] = entry["images_per_s"]
        elif dataset not in by_dataset and entry.get("images_per_s_per_worker") and workers:
            by_dataset.setdefault(f"{dataset} (scaled)", entry["images_per_s_per_worker"] * workers)
    if not by_dataset:
        return {"workers": workers}
    dataset = min(by_dataset, key=by_dataset.get)
    return {"workers": workers, "dataset": dataset, "images_per_s": by_dataset[dataset]}


def bottleneck_row(supply: dict[str, Any], train: dict[str, Any]) -> list[str]:
    """'The loader is never the bottleneck with the default worker count' against the fastest vlp step."""
    fastest = max((s["pairs_per_s"] for n, s in train["systems"].items() if n.startswith("vlp")), default=None)
    name = f"{supply.get('workers')} default workers vs fastest vlp step"
    if "images_per_s" not in supply or fastest is None:
        return row("loader vs train", name, "not run", "", "", "", "", "", "no loader or training throughput")
    ratio = supply["images_per_s"] / fastest
    verdict = "loader is not the bottleneck" if ratio >= 1 else "LOADER IS THE BOTTLENECK"
    throughput = f"{supply['images_per_s']:.0f} vs {fastest:.1f} /s"
    return row("loader vs train", f"{name} ({supply['dataset']})", throughput, "", "", "", "", f"{ratio:.1f}x", verdict)


# ----- summary -----------------------------------------------------------------------------------------------


def markdown(rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    return "\n".join(lines + ["| " + " | ".join(cells) + " |" for cells in rows])


def notes(train: dict[str, Any]) -> list[str]:
    peak = train["matmul_peak"]
    return [
        f"device {train['machine']['device']}, precision {train['precision']}, threads {train['machine']['torch_threads']}; "
        f"{train['rounds']['warmup']} warm-up + {train['rounds']['timed']} timed rounds, systems interleaved",
        f"MFU = counted FLOPs per step / median step time / measured {peak['size']}x{peak['size']} {peak['dtype']} "
        f"matmul peak ({peak['flops_per_s'] / 1e9:.1f} GFLOP/s)",
        "ours/peer = median over rounds of the peer's step time over ours (same round), [min-max] over rounds; "
        "best = the peer's fastest step over ours (least disturbed by other work); verdicts use the median",
        f"1-minute load average before each timed round: {train['rounds'].get('load_average_1min')} "
        f"on {train['machine']['cpu_count']} CPUs",
        f"sizes: {train['sizes']['vlp_split']}; BLIP text: {train['sizes']['blip_text']}",
    ]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds, and quick modes of the other scripts")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--profile", action="store_true", help="profile every comparison, not only missed ones")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or common.RESULTS_DIR))
    parser.add_argument("--ddp", choices=bench_train.DDP_CHOICES, default="auto", help="auto: on for cuda only")
    parser.add_argument("--skip", nargs="*", default=[], choices=("train", "eval", "data"))
    parser.add_argument("--script-timeout", type=int, default=1800, help="seconds allowed to each other script")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    device = str(common.pick_device(args.device))
    skipped = {"status": "not run", "reason": "skipped with --skip"}

    # Training and ITM first: the numbers the targets are about.
    train = bench_train.run(args.quick, device, args.profile, ddp=args.ddp) if "train" not in args.skip else None
    if train is not None:
        common.write_json(args.out / "train.json", train)
    scripts = {key: skipped if key in args.skip else run_script(key, args, device) for key in PEER_SCRIPTS}
    for result in scripts.values():
        result.pop("raw", None)

    rows, loader = [], {}
    if train is not None:
        rows += train_rows(train) + itm_rows(train["itm_scoring"], train["errors"])
    rows += eval_rows(scripts["eval"])
    data, loader = data_rows(scripts["data"], train or {"systems": {}})
    rows += data
    table = markdown(rows)
    text = table + "\n\n" + "\n".join(f"- {line}" for line in (notes(train) if train else []))
    print(text)
    (args.out / "summary.md").write_text(text + "\n")
    summary = {"table": table, "rows": rows, "train": train, "scripts": scripts, "loader": loader}
    common.write_json(args.out / "summary.json", summary)
    return summary


if __name__ == "__main__":
    main()
