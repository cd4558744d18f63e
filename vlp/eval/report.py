"""``metrics.json`` and a self-contained ``report.html`` (thumbnails embedded as base64 JPEG, opens offline)."""

from __future__ import annotations

import base64
import html
import io
import json
import logging
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from vlp.eval.metrics import METRIC_KEYS
from vlp.eval.retrieval import RetrievalResult

TOP = 5
THUMBNAIL = 160

STYLE = """
body { font-family: sans-serif; margin: 2em; color: #222; }
table.metrics td, table.metrics th { padding: 2px 10px; text-align: right; }
.query { border-top: 1px solid #ccc; padding: 1em 0; }
.hit { background: #d8f5d0; }
.results { display: flex; gap: 12px; flex-wrap: wrap; }
.result { width: 170px; font-size: 85%; }
.result img { border: 4px solid transparent; }
.result.hit img { border-color: #2a2; }
ol li { margin: 2px 0; padding: 2px 4px; }
"""


def metrics_record(metrics: dict[str, float]) -> dict[str, float]:
    """Exactly the re-ranked keys then the ``itc_`` keys, in their documented order."""
    keys = [*METRIC_KEYS, *(f"itc_{k}" for k in METRIC_KEYS)]
    missing = [k for k in keys if k not in metrics]
    if missing:
        raise KeyError(f"metrics lack {missing}")
    return {k: float(metrics[k]) for k in keys}


def write_metrics(path: str | Path, metrics: dict[str, float]) -> Path:
    path = Path(path)
    path.write_text(json.dumps(metrics_record(metrics), indent=2) + "\n")
    return path


def sample_queries(n: int, count: int) -> list[int]:
    """``count`` query indices spread evenly over ``[0, n)`` (deterministic)."""
    if n == 0 or count == 0:
        return []
    return sorted(set(np.linspace(0, n - 1, min(count, n)).round().astype(int).tolist()))


log = logging.getLogger(__name__)


class _Thumbnails:
    """Base64 JPEG data URIs of images, made once each; a grey placeholder when no loader is given."""

    def __init__(self, load_image: Callable[[int], Image.Image] | None):
        self.load_image, self.cache = load_image, {}

    def __call__(self, index: int) -> str:
        if index not in self.cache:
            # Scaled to fit the box, up or down: tiny evaluation images stay visible.
            image = ImageOps.contain(self._load(index).convert("RGB"), (THUMBNAIL, THUMBNAIL))
            buffer = io.BytesIO()
            image.save(buffer, format="JPEG", quality=85)
            self.cache[index] = "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")
        return self.cache[index]

    def _load(self, index: int) -> Image.Image:
        # An unreadable image must not cost the metrics: the report shows a placeholder instead.
        if self.load_image is not None:
            try:
                return self.load_image(index)
            except Exception as err:  # any loader failure (missing file, BadSample, decoder error)
                log.warning("report: image %d could not be loaded (%s); showing a placeholder", index, err)
        return Image.new("RGB", (THUMBNAIL, THUMBNAIL), "#bbb")


def _metrics_table(metrics: dict[str, float]) -> str:
    rows = "".join(
        f"<tr><th>{html.escape(k)}</th><td>{metrics[k]:.2f}</td><td>{metrics['itc_' + k]:.2f}</td></tr>"
        for k in METRIC_KEYS
    )
    return f"<table class='metrics'><tr><th></th><th>final</th><th>ITC only</th></tr>{rows}</table>"


def _image_query(result: RetrievalResult, q: int, texts: Sequence[str], img2txt, thumb: _Thumbnails) -> str:
    truth = set(np.asarray(img2txt[q]).reshape(-1).tolist())
    items = []
    for c, score in zip(result.i2t.indices[q][:TOP], result.i2t.scores[q][:TOP]):
        mark = " class='hit'" if int(c) in truth else ""
        items.append(f"<li{mark}>{html.escape(texts[int(c)])} <small>({score:.4f}, #{int(c)})</small></li>")
    ranks = f"ground-truth rank {result.tr_ranks[q]} (ITC {result.itc_tr_ranks[q]})"
    return (
        f"<div class='query'><b>image {q}</b> &middot; {ranks}<br><img src='{thumb(q)}' alt='image {q}'>"
        f"<ol>{''.join(items)}</ol></div>"
    )


def _text_query(result: RetrievalResult, q: int, texts: Sequence[str], txt2img, thumb: _Thumbnails) -> str:
    truth = int(np.asarray(txt2img)[q])
    items = []
    for i, score in zip(result.t2i.indices[q][:TOP], result.t2i.scores[q][:TOP]):
        mark = " hit" if int(i) == truth else ""
        items.append(
            f"<div class='result{mark}'><img src='{thumb(int(i))}' alt='image {int(i)}'><br>"
            f"image {int(i)} &middot; {score:.4f}{' &#10003;' if mark else ''}</div>"
        )
    ranks = f"ground-truth image {truth} at rank {result.ir_ranks[q]} (ITC {result.itc_ir_ranks[q]})"
    return (
        f"<div class='query'><b>caption {q}</b>: {html.escape(texts[q])}<br>{ranks}"
        f"<div class='results'>{''.join(items)}</div></div>"
    )


def write_report(
    path: str | Path,
    result: RetrievalResult,
    texts: Sequence[str],
    txt2img: Sequence[int] | np.ndarray,
    img2txt: Sequence[Sequence[int]],
    load_image: Callable[[int], Image.Image] | None = None,
    samples: int = 8,
    title: str = "Retrieval report",
    info: dict[str, object] | None = None,
) -> Path:
    """Metrics and, for ``samples`` queries per direction, the top-5 results with scores; ground truth marked."""
    thumb = _Thumbnails(load_image)
    image_queries = sample_queries(len(img2txt), samples)
    text_queries = sample_queries(len(texts), samples)
    scoring = "re-ranked with ITM" if result.reranked else "ITC only"
    details = "".join(f"<li>{html.escape(str(k))}: {html.escape(str(v))}</li>" for k, v in (info or {}).items())
    body = [
        f"<h1>{html.escape(title)}</h1><ul>{details}<li>final scores: {scoring}</li></ul>",
        _metrics_table(result.metrics),
        f"<h2>Image &rarr; text (top {TOP}, ground truth highlighted)</h2>",
        *(_image_query(result, q, texts, img2txt, thumb) for q in image_queries),
        f"<h2>Text &rarr; image (top {TOP}, ground truth framed)</h2>",
        *(_text_query(result, q, texts, txt2img, thumb) for q in text_queries),
    ]
    page = (
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{STYLE}</style></head><body>{''.join(body)}</body></html>\n"
    )
    path = Path(path)
    path.write_text(page, encoding="utf-8")
    return path
