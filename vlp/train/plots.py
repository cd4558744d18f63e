"""Training curves from a Lightning ``metrics.csv``: losses, temperature, and validation recall."""

from __future__ import annotations

import csv
from collections import defaultdict
from pathlib import Path

PANELS = (
    ("loss", ("train/loss", "train/itc_loss", "train/itm_loss", "train/mlm_loss")),
    ("temperature", ("train/temperature",)),
    ("validation recall (mean R@1/5/10)", ("val/itc_r_mean", "val/r_mean")),  # r_mean: re-ranked points only
)


def read_metrics(metrics_csv: str | Path) -> dict[str, list[tuple[int, float]]]:
    """Column -> [(step, value)] for every non-empty cell; Lightning writes one sparse row per logging call."""
    series: dict[str, list[tuple[int, float]]] = defaultdict(list)
    with open(metrics_csv, newline="") as f:
        for row in csv.DictReader(f):
            step = row.get("step")
            if not step:
                continue
            for key, value in row.items():
                if key not in ("step", "epoch") and value not in ("", None):
                    series[key].append((int(float(step)), float(value)))
    return dict(series)


def _only_reranked(series: dict[str, list[tuple[int, float]]]) -> dict[str, list[tuple[int, float]]]:
    """Keep ``val/r_mean`` only where it comes from the ITM re-rank (elsewhere it repeats the ITC value)."""
    reranked = {step for step, flag in series.get("val/reranked", []) if flag}
    if "val/r_mean" in series and "val/reranked" in series:
        series = dict(series, **{"val/r_mean": [(s, v) for s, v in series["val/r_mean"] if s in reranked]})
    return series


def plot_curves(metrics_csv: str | Path, out_png: str | Path) -> Path:
    """Draw one panel per entry of :data:`PANELS` (metrics that were never logged are left out) to ``out_png``."""
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt

    series = _only_reranked(read_metrics(metrics_csv))
    fig, axes = plt.subplots(1, len(PANELS), figsize=(5 * len(PANELS), 3.8))
    for ax, (title, keys) in zip(axes, PANELS):
        for key in keys:
            if key in series:
                steps, values = zip(*series[key])
                marker = "o" if key.startswith("val/") else None
                ax.plot(steps, values, label=key, marker=marker, linewidth=1.2)
        ax.set_title(title)
        ax.set_xlabel("optimizer step")
        if ax.lines:
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes)
    fig.tight_layout()
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png
