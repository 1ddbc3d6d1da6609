"""Numeric precision: which dtypes the UNet computes in and its weights, text encoder and VAE are stored in.

The fine-tune changes each trained weight by about 4e-4 (at most ~2.5e-3). Whatever precision the UNet computes
in, its weights are rounded to it on the fly, so a cast that is coarse next to the change rounds the change away:
bfloat16 keeps 8 significant bits and loses 18-57% of each learned change (13-36% of them vanish), float16 keeps
11 and loses 2-7%. A weight that is being learned or that carries a learned change is therefore always float32
(the fine-tune trains float32 working copies, see :func:`float32_working`; an applied tuning and forgetting add the
change to the base weight in float32 and round the sum once, to the dtype the UNet computes that weight in, see
:func:`apply_deltas`), and only the compute is reduced:

=========  ================  ============================  ==================  =====  =======================
name       UNet compute      UNet weights stored           text encoder, VAE   TF32   fine-tune
=========  ================  ============================  ==================  =====  =======================
``fp32``   float32           float32                       float32             off    plain
``tf32``   float32, TF32 mm  float32                       float32             on     plain (CUDA only)
``fp16``   float16 autocast  float16 (conv, linear) [1]    float16             off    GradScaler (CUDA, MPS)
``bf16``   bf16 autocast     bfloat16 (conv, linear) [1]   bfloat16            off    plain (bfloat16 devices)
=========  ================  ============================  ==================  =====  =======================

[1] :func:`store_unet`: the convolution and linear weights and biases, which autocast would cast to the compute
dtype on every call anyway, are kept in it, so the frozen weights compute bit for bit as before in half the memory
(SDXL's UNet: 10.3 GB -> 5.1 GB); norm scales stay float32 (autocast runs norms in float32). The tensors a
fine-tune trains get float32 working copies while it runs; a tuning applied for rendering is added in float32 and
rounded once to the stored dtype (the rounding autocast would otherwise repeat on every UNet call), so sampling casts
no weight at all. Either way the stored tensors are put back afterwards, bit for bit. The base weights are thus the
model's
weights rounded to the compute dtype, as in any half-precision pipeline (and exactly the weights of a checkpoint
distributed in float16); ``benchmarks/fidelity.py`` (``<p>_stored_delta_error``) shows the learned change loses
no more than with float32 storage.

``auto`` picks, per device, the fastest of these whose learned-change error stays within :data:`AUTO_TOLERANCE`
of float32 (``benchmarks/fidelity.py`` measures it): ``fp16`` on CUDA, ``fp32`` on CPU (CPU autocast is slower
than float32 there, and float16 autocast on CPU is neither fast nor what a GPU does) and ``fp32`` on MPS (float16
autocast on MPS has not been measured against float32; ask for ``fp16`` explicitly to use it).

This module imports torch only when a dtype is asked for, so :data:`PRECISIONS` can be read without torch.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
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


def store_unet(unet: torch.nn.Module, precision: Precision) -> None:
    """Keep ``unet``'s convolution and linear weights and biases in ``precision``'s compute dtype (fp16, bf16).

    Autocast casts exactly these to the compute dtype on every call, so the UNet computes the same, bit for bit,
    in half the memory. Norms stay float32. A no-op for float32 compute (fp32, tf32).
    """
    import torch

    if not precision.autocast:
        return
    for module in unet.modules():
        if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
            module.to(dtype=precision.compute_dtype)


def float32_working(params: Mapping[str, torch.nn.Parameter], names: Iterable[str]) -> dict[str, torch.Tensor]:
    """Give each named parameter a float32 working copy of its value, to be trained or edited in place.

    Returns the stored tensors (float16, bfloat16 or float32: untouched, and still the base weights); hand them to
    :func:`put_back` to make the parameters exactly what they were. A weight stored in half precision cannot hold
    a learned change of ~4e-4 (see the module docstring); its float32 copy can.
    """
    import torch

    stored = {}
    for n in names:
        p = params[n]
        stored[n] = p.data
        p.data = p.data.to(torch.float32, copy=True)
    return stored


def learned_value(stored: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """A tuned tensor's learned value in float32, on ``stored``'s device: the stored base weight plus the tuning's
    delta, added in float32 (the one definition :func:`apply_deltas` and forgetting's blend both use)."""
    import torch

    return stored.float() + delta.to(device=stored.device, dtype=torch.float32)


def apply_deltas(params: Mapping[str, torch.nn.Parameter], deltas: Mapping[str, torch.Tensor]) -> dict:
    """Put a tuning into the parameters: each named one becomes :func:`learned_value`, rounded once to the dtype
    it is stored in (fp16/bf16 for the convolutions and linears of a half-precision UNet, else float32).

    Autocast rounds a float32 weight to the compute dtype on every call, round-to-nearest as this cast does, so a
    tuned UNet computes bit for bit what it computed from float32 working copies, without a weight cast per UNet
    call. Returns the stored tensors for :func:`put_back`.
    """
    stored = {}
    for n, delta in deltas.items():
        p = params[n]
        stored[n] = p.data
        p.data = learned_value(p.data, delta).to(p.dtype)
    return stored


def put_back(params: Mapping[str, torch.nn.Parameter], stored: Mapping[str, torch.Tensor]) -> None:
    """Undo :func:`float32_working`: each parameter is its stored tensor again (bit for bit, same dtype)."""
    for n, tensor in stored.items():
        params[n].data = tensor
