import io

import numpy as np
import pytest
from PIL import Image, ImageOps

from fastimagic.config import size_for
from fastimagic.errors import InputError
from fastimagic.images import describe_fit, fit, load_reference


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def _gradient(w=128, h=96) -> Image.Image:
    x = np.linspace(0, 255, w, dtype=np.uint8)[None, :].repeat(h, 0)
    return Image.fromarray(np.stack([x, x[::-1], np.full_like(x, 90)], -1), "RGB")


def test_empty_file(tmp_path):
    with pytest.raises(InputError, match="ref.png: the file is empty"):
        load_reference(b"", "ref.png")


def test_text_file_named_png():
    with pytest.raises(InputError, match="notes.png: not an image"):
        load_reference(b"hello, this is text\n" * 10, "notes.png")


def test_truncated_jpeg():
    data = _encode(_gradient(256, 256), "JPEG")
    with pytest.raises(InputError, match="cut.jpg: image data is corrupt or truncated"):
        load_reference(data[: len(data) // 3], "cut.jpg")


def test_too_small():
    with pytest.raises(InputError, match="is 40x200; each side must be at least 64"):
        load_reference(_encode(Image.new("RGB", (40, 200)), "PNG"), "tiny.png")


def test_decompression_bomb_is_refused_from_the_header():
    # 8000 x 6000 = 48 MP of one colour compresses to a few kilobytes
    data = _encode(Image.new("L", (8000, 6000)), "PNG")
    assert len(data) < 200_000
    with pytest.raises(InputError, match="bomb.png: .*40,000,000"):
        load_reference(data, "bomb.png")


def test_png_that_is_really_a_jpeg_loads():
    img = load_reference(_encode(_gradient(), "JPEG"), "really-jpeg.png")
    assert img.mode == "RGB" and img.size == (128, 96)


def test_cmyk_jpeg_loads_as_rgb():
    img = load_reference(_encode(_gradient().convert("CMYK"), "JPEG"), "cmyk.jpg")
    assert img.mode == "RGB"


def test_16_bit_png_keeps_its_range():
    arr = (np.linspace(0, 65535, 128)[None, :].repeat(96, 0)).astype(np.uint16)
    img = load_reference(_encode(Image.fromarray(arr), "PNG"), "deep.png")
    px = np.asarray(img)
    assert img.mode == "RGB" and px[0, 0, 0] == 0 and px[0, -1, 0] == 255


def test_alpha_is_composited_on_white():
    rgba = Image.new("RGBA", (80, 80), (255, 0, 0, 0))
    img = load_reference(_encode(rgba, "PNG"), "alpha.png")
    assert img.getpixel((5, 5)) == (255, 255, 255)


def test_palette_image_with_transparency():
    p = Image.new("P", (80, 80), 0)
    p.putpalette([0, 0, 255] + [0, 0, 0] * 255)
    p.info["transparency"] = 0
    img = load_reference(_encode(p, "PNG", transparency=0), "pal.png")
    assert img.mode == "RGB" and img.getpixel((1, 1)) == (255, 255, 255)


def test_exif_orientation_is_applied():
    img = Image.new("RGB", (160, 80), (0, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    out = load_reference(_encode(img, "JPEG", exif=exif.tobytes()), "rotated.jpg")
    assert out.size == (80, 160)


def _photo(w: int, h: int) -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")


def test_crop_is_cover_and_centre_crop_as_before():
    img = _photo(320, 240)
    for size in [(64, 64), (128, 64), (64, 128), (72, 64)]:
        expected = ImageOps.fit(img, size, method=Image.Resampling.LANCZOS)
        assert np.array_equal(np.asarray(fit(img, *size)), np.asarray(expected))
    assert describe_fit((320, 240), 64, 64) == {
        "mode": "crop", "source_size": [320, 240], "size": [64, 64], "crop_box": [40.0, 0.0, 280.0, 240.0]
    }


def test_pad_letterboxes_on_mid_grey_and_keeps_everything():
    out = fit(_photo(320, 240), 64, 64, mode="pad")
    info = describe_fit((320, 240), 64, 64, "pad")
    assert out.size == (64, 64) and info["padding"] == [0, 8, 0, 8] and info["pad_colour"] == [128, 128, 128]
    arr = np.asarray(out)
    assert (arr[:8] == 128).all() and (arr[-8:] == 128).all() and not (arr[8:56] == 128).all()


def test_resize_stretches_as_the_released_code_does():
    img = _photo(320, 240)
    out = fit(img, 64, 64, mode="resize")
    assert np.array_equal(np.asarray(out), np.asarray(img.resize((64, 64))))  # PIL's default filter, bicubic
    assert describe_fit((320, 240), 64, 64, "resize") == {"mode": "resize", "source_size": [320, 240], "size": [64, 64]}
    with pytest.raises(InputError, match="fit: unknown mode 'squash'; allowed: crop, pad, resize"):
        fit(img, 64, 64, mode="squash")


@pytest.mark.parametrize(
    "image_size, short, expected",
    [
        ((320, 240), 512, (680, 512)),
        ((240, 320), 64, (64, 88)),
        ((512, 512), 512, (512, 512)),
        ((1000, 10), 8, (800, 8)),
    ],
)
def test_size_for_keeps_the_aspect_ratio_with_the_short_side_given(image_size, short, expected):
    assert size_for(image_size, short) == expected
    assert all(v % 8 == 0 for v in size_for(image_size, short))
