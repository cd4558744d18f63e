"""Shared benchmark helpers: device and precision, timing, peak memory, matmul peak, FLOP counting, profiling.

Everything here is measured inside the process that calls it, so a benchmark that runs each system in its
own process gets that system's peak RSS and its own FLOP count. Times are only compared within one run:
on a shared machine absolute numbers drift, ratios measured side by side do not drift as much.
"""

from __future__ import annotations

import contextlib
import json
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import psutil
import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

RESULTS_DIR = Path(__file__).resolve().parent / "results"

# ----- device and precision ----------------------------------------------------------------------------------


def pick_device(name: str | None) -> torch.device:
    """``cuda`` when asked for or, with no choice given, when one is available; otherwise ``cpu``."""
    if name in (None, "auto"):
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda was given but torch sees no CUDA device")
    return torch.device(name)


def compute_dtype(device: torch.device) -> torch.dtype:
    """bf16 autocast on GPUs, plain fp32 on CPUs (where bf16 matmuls are emulated on most chips)."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """The mixed-precision context every system runs its forward pass in."""
    if compute_dtype(device) == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=compute_dtype(device))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ----- timing ------------------------------------------------------------------------------------------------


def timed(fn, device: torch.device) -> float:
    """Seconds taken by ``fn()``, waiting for queued GPU work before and after."""
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


# ----- memory ------------------------------------------------------------------------------------------------


def peak_rss_mb() -> float:
    """Peak resident set size of this process since it started (ru_maxrss: KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


def current_rss_mb() -> float:
    return psutil.Process().memory_info().rss / 2**20


def peak_device_mb(device: torch.device) -> float | None:
    """Peak memory the CUDA caching allocator handed out in this process; None on CPU."""
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None


# ----- matmul peak -------------------------------------------------------------------------------------------


def matmul_peak_flops(device: torch.device, dtype: torch.dtype, size: int = 2048, repeats: int = 10) -> float:
    """Best observed FLOP/s of a square matmul loop: the denominator of model FLOPs utilisation."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    inner = 1 if device.type == "cpu" else 20  # enough work per sample to hide launch overhead on a GPU
    flops = 2 * size**3 * inner

    def loop():
        for _ in range(inner):
            torch.mm(a, b)

    loop()  # warm-up: thread pool, allocator, cuBLAS heuristics
    return max(flops / timed(loop, device) for _ in range(repeats))


# ----- FLOP counting -----------------------------------------------------------------------------------------

# FlopCounterMode knows the CUDA attention kernels but not the CPU flash kernel that
# F.scaled_dot_product_attention picks on CPU; without these two formulas CPU attention counts as zero.


def _cpu_sdpa_forward(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _cpu_sdpa_backward(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


def _custom_flop_formulas() -> dict:
    aten = torch.ops.aten
    formulas = {}
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu"):
        formulas[aten._scaled_dot_product_flash_attention_for_cpu] = _cpu_sdpa_forward
        formulas[aten._scaled_dot_product_flash_attention_for_cpu_backward] = _cpu_sdpa_backward
    return formulas


def count_flops(fn) -> int:
    """Matmul, convolution and attention FLOPs of ``fn()`` (forward and backward if it runs both)."""
    with FlopCounterMode(display=False, custom_mapping=_custom_flop_formulas()) as counter:
        fn()
    return int(counter.get_total_flops())


# ----- profiling ---------------------------------------------------------------------------------------------


def top_ops(fn, device: torch.device, limit: int = 15) -> list[dict[str, Any]]:
    """The ops with the largest self CPU time (and self device time on GPUs) over one call of ``fn()``."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        fn()
        sync(device)
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events) or 1.0
    return [_op_row(event, total, device) for event in events[:limit]]


def _op_row(event, total_self_us: float, device: torch.device) -> dict[str, Any]:
    row = {
        "op": event.key,
        "calls": event.count,
        "self_cpu_ms": round(event.self_cpu_time_total / 1e3, 2),
        "self_cpu_share": round(event.self_cpu_time_total / total_self_us, 4),
    }
    if device.type == "cuda":
        row["self_device_ms"] = round(getattr(event, "self_device_time_total", 0.0) / 1e3, 2)
    return row


# ----- results -----------------------------------------------------------------------------------------------


def write_json(path: Path, payload: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, default=str) + "\n")


def machine_info(device: torch.device) -> dict[str, Any]:
    """What the numbers were measured on: the CPU count and threads, the GPU name, library versions."""
    info = {
        "device": str(device),
        "cpu_count": psutil.cpu_count(logical=True),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": sys.version.split()[0],
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info
