"""Reference images: decode safely, normalise any PNG/JPEG/WebP/TIFF to RGB, and turn them into tensors."""

from __future__ import annotations

import io
import warnings

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from fastimagic.errors import InputError

MIN_SIDE = 64
MAX_PIXELS = 40_000_000


def load_reference(data: bytes, name: str = "reference") -> Image.Image:
    """Decode image bytes into an upright RGB image, refusing what cannot or should not be decoded.

    The header is read first, so a decompression bomb (over :data:`MAX_PIXELS`) is refused before any pixel is
    decoded. EXIF orientation is applied; alpha and palette transparency are composited on white; CMYK and 16-bit
    images are converted. ``name`` is used in messages (a path or URI).
    """
    if not data:
        raise InputError(f"{name}: the file is empty (0 bytes); expected a PNG, JPEG or WebP image")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise InputError(f"{name}: not an image PIL can read (expected PNG, JPEG, WebP, TIFF or BMP)") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise InputError(f"{name}: image is too large to decode safely (over {MAX_PIXELS:,} pixels)") from None
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


def fit(img: Image.Image, width: int, height: int) -> Image.Image:
    """Resize to cover ``width`` x ``height`` and centre-crop, keeping the aspect ratio."""
    return ImageOps.fit(img, (width, height), method=Image.Resampling.LANCZOS)


def to_tensor(img: Image.Image) -> torch.Tensor:
    """An RGB image as a ``[1, 3, H, W]`` float tensor in [-1, 1]."""
    arr = np.asarray(img.convert("RGB"), dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(2, 0, 1).unsqueeze(0).contiguous()


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """``[B, 3, H, W]`` tensors in [-1, 1] as 8-bit RGB images (rounded, not truncated)."""
    arr = ((images.float().clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8)
    return [Image.fromarray(a.permute(1, 2, 0).cpu().numpy(), "RGB") for a in arr]


def check_size(width: int, height: int) -> None:
    """Width and height must be positive multiples of 8 (the VAE downsamples by 8)."""
    for label, v in (("width", width), ("height", height)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 8 or v % 8:
            raise InputError(f"{label} must be a positive multiple of 8, got {v!r}")
