"""Reference images: decode safely, normalise any PNG/JPEG/WebP/TIFF to RGB, fit them, turn them into tensors.

torch is imported only by the tensor conversions, so :data:`FIT_MODES` and :func:`size_for` load without it.
"""

from __future__ import annotations

import io
import warnings
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from fastimagic.config import FIT_MODES, MIN_SIDE
from fastimagic.errors import InputError

if TYPE_CHECKING:
    import torch

MAX_PIXELS = 40_000_000

# The formats a reference may have: plain raster images. Anything else Pillow could open (EPS hands the file to
# Ghostscript, PSD, ICO, DDS...) is refused by name. (JPEG also opens the multi-picture JPEGs many cameras write.)
RASTER_FORMATS = ("PNG", "JPEG", "WEBP", "TIFF", "BMP", "GIF")
ACCEPTED = "a PNG, JPEG, WebP, TIFF or BMP image (or the first frame of a GIF)"


def _format_of(data: bytes) -> str | None:
    """The format name Pillow gives ``data`` when it is not an accepted one, read from the header only (no
    plugin decodes anything here), or None when Pillow does not know it."""
    try:
        with Image.open(io.BytesIO(data)) as other:
            return other.format
    except Exception:  # noqa: BLE001 - only a name for the message
        return None

# How a reference is fitted to the fine-tune's width x height (fastimagic.config.FIT_MODES): "crop" scales it to
# cover and centre-crops (nothing is distorted, the edges are lost), "pad" scales it to fit inside and letterboxes it
# on PAD_COLOUR (nothing is lost, bars are added), "resize" stretches it to the size, as the released code does.
# Mid grey: in the VAE's [-1, 1] input it is 0.004, next to the zero that carries no signal either way.
PAD_COLOUR = (128, 128, 128)


def load_reference(data: bytes, name: str = "reference") -> Image.Image:
    """Decode image bytes into an upright RGB image, refusing what cannot or should not be decoded.

    The header is read first, so a decompression bomb (over :data:`MAX_PIXELS`) is refused before any pixel is
    decoded. EXIF orientation is applied; alpha and palette transparency are composited on white; CMYK and 16-bit
    images are converted. ``name`` is used in messages (a path or URI).
    """
    if not data:
        raise InputError(f"{name}: the file is empty (0 bytes); expected {ACCEPTED}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            Image.init()  # register every plugin, so that each accepted format is known by name
            img = Image.open(io.BytesIO(data), formats=RASTER_FORMATS)
    except UnidentifiedImageError:
        other = _format_of(data)
        if other:
            raise InputError(f"{name}: {other} images are not accepted as references; use {ACCEPTED}") from None
        raise InputError(f"{name}: not an image PIL can read (expected {ACCEPTED})") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise InputError(f"{name}: image is too large to decode safely (over {MAX_PIXELS:,} pixels)") from None
    except (OSError, SyntaxError, ValueError) as e:  # e.g. a PNG text or ICC chunk that inflates without bound
        raise InputError(f"{name}: image header is corrupt or too large to read safely ({e})") from None
    if getattr(img, "n_frames", 1) > 1:
        img.seek(0)  # an animated GIF or WebP: the first frame
    w, h = img.size
    if w * h > MAX_PIXELS:
        raise InputError(f"{name}: image is {w}x{h}, over the {MAX_PIXELS:,}-pixel limit")
    if min(w, h) < MIN_SIDE:
        raise InputError(f"{name}: image is {w}x{h}; each side must be at least {MIN_SIDE} px")
    try:
        img.load()
        img = ImageOps.exif_transpose(img)
    except (OSError, SyntaxError, ValueError) as e:
        raise InputError(f"{name}: image data is corrupt or truncated ({e})") from None
    return to_rgb(img)


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB; transparency is composited on white."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        img = Image.fromarray(np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    return img.convert("RGB")


def fit(img: Image.Image, width: int, height: int, mode: str = "crop") -> Image.Image:
    """``img`` fitted to ``width`` x ``height`` by ``mode`` (one of :data:`FIT_MODES`, see there); LANCZOS
    resampling, except ``resize``, which uses bicubic as the released implementation's ``Image.resize`` does."""
    info = describe_fit(img.size, width, height, mode)
    if mode == "resize":
        return img.resize((width, height), Image.Resampling.BICUBIC)
    if mode == "crop":
        return img.resize((width, height), Image.Resampling.LANCZOS, box=tuple(info["crop_box"]))
    left, top, right, bottom = info["padding"]
    inner = img.resize((width - left - right, height - top - bottom), Image.Resampling.LANCZOS)
    canvas = Image.new("RGB", (width, height), PAD_COLOUR)
    canvas.paste(inner, (left, top))
    return canvas


def describe_fit(source_size: tuple[int, int], width: int, height: int, mode: str = "crop") -> dict:
    """What :func:`fit` does to an image of ``source_size`` (w, h), for manifests: ``{"mode", "source_size",
    "size"}`` plus ``crop_box`` (left, top, right, bottom in source pixels, fractional) for ``crop`` or ``padding``
    (left, top, right, bottom in output pixels) and ``pad_colour`` for ``pad``.
    """
    if mode not in FIT_MODES:
        raise InputError(f"fit: unknown mode {mode!r}; allowed: {', '.join(FIT_MODES)}")
    sw, sh = source_size
    info: dict = {"mode": mode, "source_size": [sw, sh], "size": [width, height]}
    if mode == "crop":
        # The box ImageOps.fit cuts (centred, no bleed), so "crop" stays what fit() always did.
        out_ratio = width / height
        cw, ch = (out_ratio * sh, sh) if sw / sh >= out_ratio else (sw, sw / out_ratio)
        left, top = (sw - cw) / 2, (sh - ch) / 2
        info["crop_box"] = [left, top, left + cw, top + ch]
    elif mode == "pad":
        scale = min(width / sw, height / sh)
        iw, ih = max(1, min(width, round(sw * scale))), max(1, min(height, round(sh * scale)))
        left, top = (width - iw) // 2, (height - ih) // 2
        info["padding"] = [left, top, width - iw - left, height - ih - top]
        info["pad_colour"] = list(PAD_COLOUR)
    return info


def to_tensor(img: Image.Image) -> torch.Tensor:
    """An RGB image as a ``[1, 3, H, W]`` float tensor in [-1, 1]."""
    import torch

    arr = np.asarray(img.convert("RGB"), dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(2, 0, 1).unsqueeze(0).contiguous()


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """``[B, 3, H, W]`` tensors in [-1, 1] as 8-bit RGB images (rounded, not truncated)."""
    import torch

    arr = ((images.float().clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8)
    return [Image.fromarray(a.permute(1, 2, 0).cpu().numpy(), "RGB") for a in arr]


def check_size(width: int, height: int) -> None:
    """Width and height must be positive multiples of 8 (the VAE downsamples by 8)."""
    for label, v in (("width", width), ("height", height)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 8 or v % 8:
            raise InputError(f"{label} must be a positive multiple of 8, got {v!r}")
