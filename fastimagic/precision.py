"""Numeric precision: which dtypes the UNet computes in and the frozen text encoder and VAE are stored in.

The fine-tune changes each trained weight by about 4e-4 (at most ~2.5e-3). Whatever precision the UNet computes
in, its weights are rounded to it on the fly, so a cast that is coarse next to the change rounds the change away:
bfloat16 keeps 8 significant bits and loses 18-57% of each learned change (13-36% of them vanish), float16 keeps
11 and loses 2-7%. The UNet's master weights therefore always stay float32 (fine-tuning updates them, forgetting
and applying a tuning edit them), and only the compute is reduced:

=========  ==================  ====================  =====  ==========================================
name       UNet compute        text encoder and VAE  TF32   fine-tune
=========  ==================  ====================  =====  ==========================================
``fp32``   float32             float32               off    plain
``tf32``   float32, TF32 mm    float32               on     plain (CUDA only)
``fp16``   float16 autocast    float16               off    loss scaling (GradScaler) (CUDA, MPS)
``bf16``   bfloat16 autocast   bfloat16              off    plain (devices with bfloat16)
=========  ==================  ====================  =====  ==========================================

``auto`` picks, per device, the fastest of these whose learned-change error stays within :data:`AUTO_TOLERANCE`
of float32 (``benchmarks/fidelity.py`` measures it): ``fp16`` on CUDA, ``fp32`` on CPU (CPU autocast is slower
than float32 there, and float16 autocast on CPU is neither fast nor what a GPU does) and ``fp32`` on MPS (float16
autocast on MPS has not been measured against float32; ask for ``fp16`` explicitly to use it).

This module imports torch only when a dtype is asked for, so :data:`PRECISIONS` can be read without torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from fastimagic.config import PRECISIONS
from fastimagic.errors import InputError

if TYPE_CHECKING:
    import torch


# Mean relative error of the learned weight change, as the UNet's compute sees it, that ``auto`` accepts: fp16
# (2-7% on SD 1.5 shapes) passes, bf16 (18-57%) does not. TF32 rounds matmul inputs to float16's mantissa (with
# float32's range) and so sits near fp16; it is not picked by ``auto`` because TF32 only speeds up matmuls while
# fp16 also halves memory traffic.
AUTO_TOLERANCE = 0.10

_SETTINGS = {
    # name: (UNet compute dtype, frozen text encoder / VAE dtype, TF32 matmul, GradScaler in fine-tuning)
    "fp32": ("float32", "float32", False, False),
    "tf32": ("float32", "float32", True, False),
    "fp16": ("float16", "float16", False, True),
    "bf16": ("bfloat16", "bfloat16", False, False),
}


@dataclass(frozen=True)
class Precision:
    """A resolved precision (never ``auto``). ``compute``/``frozen`` are torch dtype names, e.g. ``float16``."""

    name: str
    device_type: str
    compute: str  # UNet autocast dtype; float32 means no autocast
    frozen: str  # dtype the text encoder and VAE are stored and run in
    tf32: bool  # TF32 matmuls (CUDA): float32 tensors, float16's 10-bit mantissa inside the matmul
    grad_scaler: bool  # fine-tuning scales the loss so float16 gradients (~1e-6 and smaller) do not underflow

    @property
    def compute_dtype(self) -> torch.dtype:
        import torch

        return getattr(torch, self.compute)

    @property
    def frozen_dtype(self) -> torch.dtype:
        import torch

        return getattr(torch, self.frozen)

    @property
    def autocast(self) -> bool:
        return self.compute != "float32"


def _device_type(device) -> str:
    return str(device).split(":")[0]  # torch.device("cuda:1") and "cuda:1" alike


def _bf16_supported(device_type: str) -> bool:
    import torch

    if device_type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return device_type == "cpu"


def resolve_precision(name: str, device) -> Precision:
    """Resolve ``name`` (one of :data:`PRECISIONS`) for ``device`` (a torch.device or ``"cuda"``, ``"cpu"``, ...).

    Raises :class:`InputError` with one line for an unknown name, ``fp16`` on CPU, ``tf32`` off CUDA and ``bf16``
    on a device without bfloat16.
    """
    kind = _device_type(device)
    if name not in PRECISIONS:
        raise InputError(f"precision: unknown precision {name!r}; allowed: {', '.join(PRECISIONS)}")
    if name == "auto":
        name = "fp16" if kind == "cuda" else "fp32"
    if name == "tf32" and kind != "cuda":
        raise InputError(f"precision: tf32 is a CUDA matmul mode and this device is {kind}; use fp32")
    if name == "fp16" and kind == "cpu":
        raise InputError("precision: fp16 is not offered on CPU (slow there, and unlike a GPU's); use fp32 or bf16")
    if name == "bf16" and not _bf16_supported(kind):
        raise InputError(f"precision: bf16 is not supported on this {kind} device; use fp16 or fp32")
    compute, frozen, tf32, scaler = _SETTINGS[name]
    return Precision(name=name, device_type=kind, compute=compute, frozen=frozen, tf32=tf32, grad_scaler=scaler)


def precision_for_dtype(dtype) -> str:
    """The precision name for a legacy ``dtype=`` override (``float32``, ``float16``, ``bfloat16`` or a dtype)."""
    names = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16", "half": "fp16", "float": "fp32"}
    key = str(dtype).removeprefix("torch.")
    if key not in names:
        raise InputError(f"unknown dtype '{key}'; allowed: float32, float16, bfloat16")
    return names[key]
