"""Robust image loading: mode repairs and skip reasons."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from vlp.data.errors import BadSample
from vlp.data.images import ImageLimits, load_image


def _save(tmp_path, img: Image.Image, name: str) -> str:
    path = tmp_path / name
    img.save(path)
    return str(path)


def test_rgb_jpeg_loads_unchanged(tmp_path, util):
    path = tmp_path / "a.jpg"
    path.write_bytes(util.jpeg_bytes((200, 30, 30), (40, 32)))
    img = load_image(str(path))
    assert img.mode == "RGB" and img.size == (40, 32)
    assert np.abs(np.asarray(img).mean(axis=(0, 1)) - (200, 30, 30)).max() < 4


def test_bytes_source_loads(util):
    img = load_image(util.jpeg_bytes((10, 200, 10)))
    assert img.mode == "RGB" and img.size == (40, 32)


def test_grey_and_cmyk_convert_to_rgb(tmp_path):
    grey = load_image(_save(tmp_path, Image.new("L", (16, 16), 90), "g.png"))
    assert grey.getpixel((3, 3)) == (90, 90, 90)
    cmyk = load_image(_save(tmp_path, Image.new("CMYK", (16, 16), (0, 255, 255, 0)), "c.jpg"))
    r, g, b = cmyk.getpixel((3, 3))
    assert r > 200 and g < 40 and b < 40  # pure red ink


def test_palette_with_transparency_composites_on_white(tmp_path):
    pal = Image.new("P", (16, 16), 0)
    pal.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    pal.putpixel((0, 0), 1)
    pal.info["transparency"] = 0  # palette entry 0 (black) is transparent
    img = load_image(_save(tmp_path, pal, "p.png"))
    assert img.getpixel((5, 5)) == (255, 255, 255)  # transparent -> white, not the stored black
    assert img.getpixel((0, 0)) == (255, 0, 0)


def test_rgba_half_transparent_blends_with_white(tmp_path):
    img = load_image(_save(tmp_path, Image.new("RGBA", (16, 16), (0, 0, 255, 128)), "a.png"))
    r, g, b = img.getpixel((1, 1))
    assert 120 <= r <= 135 and 120 <= g <= 135 and b == 255


def test_sixteen_bit_is_scaled_not_clipped(tmp_path):
    # 32768 of 65535 is mid-grey; PIL's own conversion would clip it to white.
    arr = np.full((16, 16), 32768, dtype=np.uint16)
    img = load_image(_save(tmp_path, Image.fromarray(arr), "i16.png"))
    assert Image.open(tmp_path / "i16.png").mode == "I;16"
    assert img.getpixel((2, 2)) == (128, 128, 128)


def test_oversized_image_is_shrunk_keeping_aspect(tmp_path):
    img = load_image(_save(tmp_path, Image.new("RGB", (1200, 300), (5, 5, 5)), "w.png"), ImageLimits(max_side=400))
    assert img.size == (400, 100)


@pytest.mark.parametrize(
    ("make", "kind"),
    [
        (lambda p: None, "missing file"),
        (lambda p: p.write_bytes(b""), "empty file"),
        (lambda p: p.write_bytes(b"this is not an image at all"), "unreadable image"),
        (lambda p: Image.new("RGB", (1, 1)).save(p, "PNG"), "image too small"),
        (lambda p: Image.new("RGB", (20000, 40)).save(p, "PNG"), "extreme aspect ratio"),
    ],
)
def test_bad_files_raise_bad_sample(tmp_path, make, kind):
    path = tmp_path / "bad.img"
    make(path)
    with pytest.raises(BadSample) as info:
        load_image(str(path))
    assert info.value.kind == kind


def test_truncated_jpeg_is_reported_as_truncated(tmp_path, util):
    data = util.jpeg_bytes((120, 10, 200), (64, 64))
    path = tmp_path / "t.jpg"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(BadSample) as info:
        load_image(str(path))
    assert info.value.kind == "truncated image"
