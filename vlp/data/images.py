"""Robust image opening: every failure becomes a :class:`BadSample` with a reason, never a crash.

Repairs (the sample is kept):
  * any mode other than RGB is converted: L/1/CMYK/YCbCr directly, P/LA/RGBA through RGBA composited on white
    (transparent pixels would otherwise show whatever colour they happen to store), 16/32-bit integer and float
    images are scaled to 8 bit first (PIL would clip them to white);
  * images larger than ``max_side`` are shrunk (keeping the aspect ratio) so a 20k-pixel photo costs no more
    than a normal one downstream.

Skips (the sample is dropped and counted): missing or empty file, undecodable or truncated data, a side shorter
than ``min_side`` (1x1 tracking pixels), an aspect ratio above ``max_aspect`` (banners), or more pixels than PIL's
decompression-bomb guard allows.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass

import numpy as np
from PIL import Image, UnidentifiedImageError

from vlp.data.errors import BadSample

_ALPHA_MODES = ("P", "PA", "LA", "RGBA", "La", "RGBa")
_WIDE_INT_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N", "F")


@dataclass(frozen=True)
class ImageLimits:
    """Bounds that decide between keeping, shrinking and skipping an image."""

    min_side: int = 8
    max_side: int = 4096
    max_aspect: float = 20.0


def load_image(source: str | bytes | os.PathLike, limits: ImageLimits = ImageLimits()) -> Image.Image:
    """Open a path or encoded bytes as an RGB PIL image, or raise BadSample saying why not."""
    # Cheap checks first: a missing or empty file needs no decoder.
    fp = _open_source(source)
    try:
        with Image.open(fp) as img:
            # The header is parsed but no pixel decoded yet, so the size checks cost nothing.
            _check_size(img.size, limits)
            if max(img.size) > 2 * limits.max_side:
                # JPEG can decode at 1/2, 1/4, 1/8 scale directly; far cheaper for huge photos.
                img.draft("RGB", (limits.max_side, limits.max_side))
            img.load()
            rgb = to_rgb(img)
    except BadSample:
        raise
    except Image.DecompressionBombError as exc:
        raise BadSample("too many pixels", str(exc)) from exc
    except UnidentifiedImageError as exc:
        raise BadSample("unreadable image", "not a recognised image format") from exc
    except (OSError, SyntaxError, ValueError) as exc:
        # PIL reports truncated and corrupt streams as OSError (sometimes SyntaxError/ValueError from plugins).
        kind = "truncated image" if "truncat" in str(exc).lower() else "unreadable image"
        raise BadSample(kind, str(exc)) from exc
    finally:
        if isinstance(fp, io.IOBase):
            fp.close()

    # Shrink oversized images after decoding (draft only gets within a factor of two).
    if max(rgb.size) > limits.max_side:
        rgb.thumbnail((limits.max_side, limits.max_side), Image.Resampling.BICUBIC)
    return rgb


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL mode to RGB (always returns a new image, safe to use after the file closes)."""
    # Wide integer / float images: scale to 8 bit instead of letting PIL clip at 255.
    if img.mode in _WIDE_INT_MODES:
        arr = np.asarray(img, dtype=np.float64)
        high = 65535.0 if img.mode.startswith("I;16") else max(float(arr.max()), 1.0)
        low = 0.0 if img.mode.startswith("I;16") else min(float(arr.min()), 0.0)
        arr = np.clip((arr - low) / max(high - low, 1e-12) * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(arr, mode="L").convert("RGB")

    # Transparent images: composite on white so transparent areas do not show arbitrary stored colours.
    if img.mode in _ALPHA_MODES:
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def _open_source(source: str | bytes | os.PathLike) -> io.IOBase:
    """Open bytes or a path for PIL, raising BadSample for missing or empty input."""
    # Encoded bytes (webdataset members, parquet cells).
    if isinstance(source, bytes | bytearray | memoryview):
        if len(source) == 0:
            raise BadSample("empty file", "0 bytes")
        return io.BytesIO(source)

    # A file path.
    try:
        if os.path.getsize(source) == 0:
            raise BadSample("empty file", f"0 bytes: {os.fspath(source)}")
        return open(source, "rb")  # noqa: SIM115 - closed by load_image
    except FileNotFoundError as exc:
        raise BadSample("missing file", os.fspath(source)) from exc
    except IsADirectoryError as exc:
        raise BadSample("missing file", f"is a directory: {os.fspath(source)}") from exc


def _check_size(size: tuple[int, int], limits: ImageLimits) -> None:
    """Skip degenerate shapes before decoding them."""
    width, height = size
    if min(width, height) < limits.min_side:
        raise BadSample("image too small", f"{width}x{height}, data.min_image_side={limits.min_side}")
    if max(width, height) / min(width, height) > limits.max_aspect:
        raise BadSample("extreme aspect ratio", f"{width}x{height}, data.max_aspect_ratio={limits.max_aspect}")
