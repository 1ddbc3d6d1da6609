"""Fidelity benchmark: parity with the released implementation, and what each precision does to the fine-tune.

Prints ``name=value`` lines, all measured in this one run:

    parity_max_loss_diff         our fine-tune against the port of the released loop (tests/forgedit_reference.py):
    parity_max_embedding_diff    tiny model, float32 on CPU, the same random draws, largest difference of any loss,
    parity_max_delta_diff        of e_src, of any learned weight change; the worse of an unscaled (CPU) run and
                                 the published GPU run (loss x 2**16 in the released loop, Adam eps / 2**16 here)
    <p>_delta_error              mean relative error of the learned weight change as the UNet's compute sees it in
    <p>_delta_vanished           precision p: sum|(cast(w + d) - cast(w)) - d| / sum|d|, and the share of changes
                                 that round to nothing. SD 1.5 shapes of the trained tensors (``reference`` blocks),
                                 a sample of each in proportion to its size, random weights at trained-SD scales
                                 (std 0.03; norm scales near 1), changes d of mean size 4e-4 capped at 2.5e-3, as
                                 measured on real fine-tunes. fp16/bf16: IEEE casts (what autocast does to the
                                 weights). tf32: emulated, float32 rounded to a 10-bit mantissa (round to nearest,
                                 ties away, as cvt.rna.tf32 does for matmul inputs). Device-independent.
    <p>_stored_delta_error       the same with the base weights stored in p (fp16, bf16), as the loader keeps them:
    <p>_stored_delta_vanished    sum|(cast(cast(w) + d) - cast(w)) - d| / sum|d|
    keyframe_max_pixel_diff_<p>  a tiny-model tuning rendered in precision p against float32, largest 8-bit pixel
                                 difference, for every precision this machine offers (CPU: fp32, bf16)
    auto_tolerance               the delta error that ``precision: auto`` accepts (fastimagic.precision)

Run: ``python benchmarks/fidelity.py`` (about a minute on 2 CPU cores; on a GPU machine the keyframe figures cover
tf32 and fp16 too), ``--quick`` for a CI-sized run (fewer fine-tune steps and sampled weights).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import numpy as np  # noqa: E402
import torch  # noqa: E402

from fastimagic.config import BLOCK_PRESETS  # noqa: E402
from fastimagic.editor import Editor  # noqa: E402
from fastimagic.finetuning import FinetuneConfig, finetune  # noqa: E402
from fastimagic.images import load_reference  # noqa: E402
from fastimagic.models import load_base_model, unet_shapes  # noqa: E402
from fastimagic.precision import AUTO_TOLERANCE, PRECISIONS, resolve_precision  # noqa: E402

PROMPT = "a photo of a bird"
TARGET = "a photo of a bird flying"
DELTA_MEAN, DELTA_MAX = 4e-4, 2.5e-3


def photo():
    from conftest import reference_photo_bytes

    return load_reference(reference_photo_bytes(), "photo")


def parity(quick: bool) -> dict[str, float]:
    from forgedit_reference import RELEASED_LOSS_SCALE_ON_CUDA, released_finetune

    model = load_base_model("tiny", device="cpu", precision="fp32")
    image = photo()
    steps = 5 if quick else 40
    worst = {"loss": 0.0, "embedding": 0.0, "delta": 0.0}
    for eps, scale in ((1e-8, 1.0), (FinetuneConfig().adam_eps, RELEASED_LOSS_SCALE_ON_CUDA)):
        # Threshold 10: every loss is below it, so both loops stop at their first allowed step (36 updates).
        config = FinetuneConfig(steps=steps, loss_threshold=10.0, adam_eps=eps)
        ours = finetune(model, image, PROMPT, config, width=64, height=64, fit="resize")
        ref = released_finetune(
            model, image, PROMPT, width=64, height=64, generator=torch.Generator().manual_seed(config.seed),
            text_embedding_optimization_steps=steps * config.batch_size, loss_scale=scale, loss_threshold=10.0,
        )
        if len(ref["losses"]) != len(ours.losses):
            raise SystemExit(f"parity: {len(ours.losses)} steps here, {len(ref['losses'])} in the released loop")
        worst["loss"] = max(worst["loss"], max(abs(a - b) for a, b in zip(ours.losses, ref["losses"])))
        embedding = (ours.source_embedding - ref["source_embedding"]).abs().max().item()
        worst["embedding"] = max(worst["embedding"], embedding)
        worst["delta"] = max(
            worst["delta"], max((ours.deltas[n].float() - ref["deltas"][n]).abs().max().item() for n in ref["deltas"])
        )
    return worst


# Trained SD 1.x weights are far larger than a fresh init (torch's default gives the 1280x3x3 convolutions a std of
# 0.005); 0.03 is typical of trained linear and convolution weights. The error below grows in proportion to |w|/|d|.
WEIGHT_STD = 0.03


def sd15_trained_tensors(divisor: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Weights w and learned changes d for the SD 1.5 tensors the default preset trains, flattened.

    One element in ``divisor`` of every tensor (at least one), so each tensor weighs as much as its size: kernels,
    matrices and biases N(0, WEIGHT_STD), norm scales 1 + N(0, 0.1), norm shifts N(0, 0.05).
    """
    g = torch.Generator().manual_seed(seed)
    blocks = tuple(b + "." for b in BLOCK_PRESETS["reference"])
    ws, ds = [], []
    for name, shape in unet_shapes("sd15").items():
        if not name.startswith(blocks):
            continue
        n = max(1, int(np.prod(shape)) // divisor)
        if "norm" in name and name.endswith("weight") and len(shape) == 1:
            w = 1 + 0.1 * torch.randn(n, generator=g)
        elif "norm" in name and len(shape) == 1:
            w = 0.05 * torch.randn(n, generator=g)
        else:
            w = WEIGHT_STD * torch.randn(n, generator=g)
        ws.append(w)
        # |d| half-normal with mean DELTA_MEAN, capped at DELTA_MAX, random sign.
        d = torch.randn(n, generator=g) * DELTA_MEAN * float(np.sqrt(np.pi / 2))
        ds.append(d.clamp(-DELTA_MAX, DELTA_MAX))
    return torch.cat(ws), torch.cat(ds)


def tf32_round(x: torch.Tensor) -> torch.Tensor:
    """float32 rounded to TF32's 10-bit mantissa (nearest, ties away from zero); exponent range unchanged."""
    bits = x.contiguous().view(torch.int32)
    return ((bits + 0x1000) & ~0x1FFF).view(torch.float32)


def delta_errors(divisor: int) -> dict[str, tuple[float, float]]:
    w, d = sd15_trained_tensors(divisor)
    casts = {
        "fp16": lambda x: x.to(torch.float16).float(),
        "bf16": lambda x: x.to(torch.bfloat16).float(),
        "tf32": tf32_round,
    }
    out = {}
    for name, cast in casts.items():
        seen = cast(w + d) - cast(w)
        out[name] = _errors(seen, d)
        if name != "tf32":
            # Base weights stored in the compute dtype (fastimagic.precision.store_unet): the learned change is added
            # to the stored value in float32, and the compute casts the sum.
            out[f"{name}_stored"] = _errors(cast(cast(w) + d) - cast(w), d)
    return out


def _errors(seen: torch.Tensor, d: torch.Tensor) -> tuple[float, float]:
    error = float((seen - d).abs().sum() / d.abs().sum())
    vanished = float(((seen == 0) & (d != 0)).sum() / (d != 0).sum())
    return error, vanished


def offered(device: torch.device) -> list[str]:
    names = []
    for name in PRECISIONS[1:]:
        try:
            resolve_precision(name, device)
        except ValueError:
            continue
        names.append(name)
    return names


def keyframe_diffs(device: torch.device, quick: bool) -> dict[str, int]:
    base = load_base_model("tiny", device="cpu", precision="fp32")
    tuning = finetune(base, photo(), PROMPT, FinetuneConfig(steps=3 if quick else 20), width=64, height=64)
    edits = [{"mode": "subtract", "gamma": g} for g in (1.0, 1.2)]
    frames = {}
    for name in offered(device):
        model = load_base_model("tiny", device=str(device), precision=name)
        with Editor(model, tuning) as editor:
            keyframes = editor.render(TARGET, seeds=[0, 1], edits=edits, steps=4 if quick else 20, forget="none")
        frames[name] = [np.asarray(k.image, dtype=np.int16) for k in keyframes]
    return {n: int(max(np.abs(a - b).max() for a, b in zip(f, frames["fp32"]))) for n, f in frames.items()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="CI-sized: fewer steps and sampled weights")
    ap.add_argument("--device", default=None, help="for the keyframe figures; default cuda if present, else cpu")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))

    worst = parity(args.quick)
    print(f"parity_max_loss_diff={worst['loss']:.3g}")
    print(f"parity_max_embedding_diff={worst['embedding']:.3g}")
    print(f"parity_max_delta_diff={worst['delta']:.3g}")
    for name, (error, vanished) in delta_errors(4096 if args.quick else 64).items():
        print(f"{name}_delta_error={error:.4f}")
        print(f"{name}_delta_vanished={vanished:.4f}")
    for name, diff in keyframe_diffs(device, args.quick).items():
        print(f"keyframe_max_pixel_diff_{name}={diff}")
    print(f"auto_tolerance={AUTO_TOLERANCE}")
    print(f"keyframe_device={device.type}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
