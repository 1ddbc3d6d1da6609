"""Method benchmark on the tiny model (CPU): batched sampling, in-place forgetting, fine-tune step time.

Prints ``name=value`` lines, each ratio measured side by side in this one run:

    batched_vs_per_image_speedup       16 keyframes (2 seeds x 8 gamma) batched, against one at a time with a
                                       deep copy of the UNet per image, as the reference implementation edits
    forget_inplace_vs_deepcopy_speedup switching strategy in place, against deep-copying the UNet and blending
    finetune_seconds_per_step          one joint fine-tune step at batch 10
    tuning_file_speedup                a tuning's safetensors file built and hashed by ``Tuning.to_files``, against
                                       ``safetensors.torch.save`` (what it used), for a tuning of SD 1.5's
                                       ``reference`` blocks (518 fp16 tensors, 1.18 GB, random values)
    tuning_file_stall_seconds          the longest another thread waited meanwhile (it wakes every millisecond);
                                       ``tuning_file_stall_safetensors_seconds`` the same for ``save``

Run: ``python benchmarks/method.py [--steps 50] [--repeat 3] [--tuning sd15|tiny]``. Targets: >= 4, >= 20, and
a stall of a few milliseconds (``save`` held Python's lock for seconds: no kernel launched from another thread).
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import threading
import time

import torch

from fastimagic.editor import Editor
from fastimagic.finetuning import FinetuneConfig, finetune
from fastimagic.forgetting import forgotten_names
from fastimagic.images import load_reference
from fastimagic.models import load_base_model
from fastimagic.sampler import sample
from fastimagic.tuning import Tuning

PROMPT = "a photo of a bird flying over the sea"
GAMMAS = [0.8, 0.9, 1.0, 1.1, 1.2, 1.3, 1.4, 1.5]
SEEDS = [0, 1]


def _photo():
    from fastimagic.tiny import reference_photo_bytes

    return load_reference(reference_photo_bytes(), "photo")


def _best(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def per_image_reference_style(model, tuning, steps: int, strategy: str) -> None:
    """One keyframe at a time, each with its own deep copy of the fine-tuned UNet and the strategy applied to it."""
    with Editor(model, tuning) as ed:
        learned_unet = model.unet
        originals = ed.forgetting._originals
        target = model.encode_prompts([PROMPT])
        for seed in SEEDS:
            for g in GAMMAS:
                unet = copy.deepcopy(learned_unet)
                with torch.no_grad():
                    params = dict(unet.named_parameters())
                    for n in forgotten_names(strategy, originals):
                        params[n].copy_(originals[n])
                emb = ed._source + g * (target - ed._source)
                model.unet = unet
                try:
                    sample(model, emb, [seed], width=tuning.width, height=tuning.height, steps=steps, max_batch=1)
                finally:
                    model.unet = learned_unet


def batched(model, tuning, steps: int, strategy: str) -> None:
    with Editor(model, tuning) as ed:
        ed.render(PROMPT, seeds=SEEDS, edits=[{"mode": "subtract", "gamma": g} for g in GAMMAS], steps=steps,
                  forget=strategy, max_batch=16)


def _reference_sized_tuning() -> Tuning:
    """A tuning shaped as SD 1.5's ``reference`` blocks (random values; the shapes from the real config)."""
    from diffusers import UNet2DConditionModel

    from fastimagic.finetuning import trained_parameter_names
    from fastimagic.models import SD15_UNET_CONFIG

    with torch.device("meta"):
        unet = UNet2DConditionModel(**SD15_UNET_CONFIG)
    shapes = {n: p.shape for n, p in unet.named_parameters()}
    g = torch.Generator().manual_seed(0)
    names = trained_parameter_names(unet, FinetuneConfig().blocks())
    deltas = {n: (torch.randn(shapes[n], generator=g) * 1e-3).half() for n in names}
    return Tuning(key="bench", source_prompt=PROMPT, source_embedding=torch.randn(1, 77, 768, generator=g),
                  deltas=deltas, model_identity="sd15-shaped", finetune={}, width=512, height=512)


def _longest_stall(fn) -> tuple[float, float]:
    """``fn``'s seconds, and the longest gap of a thread that asks to wake every millisecond meanwhile."""
    gaps, done = [0.0], threading.Event()

    def tick() -> None:
        last = time.perf_counter()
        while not done.is_set():
            time.sleep(0.001)
            now = time.perf_counter()
            gaps.append(now - last)
            last = now

    ticker = threading.Thread(target=tick)
    ticker.start()
    started = time.perf_counter()
    try:
        fn()
    finally:
        seconds = time.perf_counter() - started
        done.set()
        ticker.join()
    return seconds, max(gaps)


def tuning_file(tuning: Tuning) -> dict:
    """Build and hash ``tuning``'s weights file with ``Tuning.to_files`` and with ``safetensors.torch.save``
    (what ``to_files`` used before), in turn, twice: the faster time of each, and the longest stall. The two
    files are the same bytes (tests/test_tuning_and_sampling.py); ``bytes`` counts their tensors' bytes."""
    from safetensors.torch import save

    def before() -> None:
        hashlib.sha256(save({n: t.contiguous() for n, t in tuning.file_tensors().items()})).hexdigest()

    old, new = [], []
    for _ in range(2):  # in turn
        old.append(_longest_stall(before))
        new.append(_longest_stall(tuning.to_files))
    tensor_bytes = sum(t.numel() * t.element_size() for t in tuning.file_tensors().values())  # the file less its header
    return {"tensors": len(tuning.deltas), "bytes": tensor_bytes,
            "safetensors_seconds": min(t for t, _ in old), "seconds": min(t for t, _ in new),
            "stall_safetensors_seconds": max(g for _, g in old), "stall_seconds": max(g for _, g in new)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=50, help="DDIM steps per keyframe")
    ap.add_argument("--repeat", type=int, default=3, help="best of N timings")
    ap.add_argument(
        "--tuning", choices=("sd15", "tiny"), default="sd15",
        help="the tuning whose file is built: SD 1.5 reference-sized (1.2 GB of memory) or this run's tiny one",
    )
    args = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    model = load_base_model("tiny", device="cpu")
    photo = _photo()

    t = time.perf_counter()
    tuning = finetune(model, photo, "a photo of a bird", FinetuneConfig(steps=10, min_steps=10), width=64, height=64)
    per_step = (time.perf_counter() - t) / len(tuning.losses)

    strategy = "encoderattn"
    t_batched = _best(lambda: batched(model, tuning, args.steps, strategy), args.repeat)
    t_single = _best(lambda: per_image_reference_style(model, tuning, args.steps, strategy), args.repeat)

    with Editor(model, tuning) as ed:
        def inplace():
            ed.forget("encoderattn")
            ed.forget("decoderattn")

        def deepcopy_switch():
            for s in ("encoderattn", "decoderattn"):
                unet = copy.deepcopy(model.unet)
                params = dict(unet.named_parameters())
                with torch.no_grad():
                    for n in forgotten_names(s, ed.forgetting._originals):
                        params[n].copy_(ed.forgetting._originals[n])

        t_inplace = _best(inplace, args.repeat * 5) / 2
        t_copy = _best(deepcopy_switch, args.repeat * 5) / 2

    print(f"keyframes={len(SEEDS) * len(GAMMAS)} steps={args.steps} device=cpu model=tiny")
    print(f"batched_seconds={t_batched:.3f} per_image_deepcopy_seconds={t_single:.3f}")
    print(f"batched_vs_per_image_speedup={t_single / t_batched:.2f}")
    print(f"forget_inplace_seconds={t_inplace:.5f} forget_deepcopy_seconds={t_copy:.5f}")
    print(f"forget_inplace_vs_deepcopy_speedup={t_copy / t_inplace:.1f}")
    print(f"finetune_seconds_per_step={per_step:.3f}")
    f = tuning_file(_reference_sized_tuning() if args.tuning == "sd15" else tuning)
    print(f"tuning_file={args.tuning} tuning_file_tensors={f['tensors']} tuning_file_bytes={f['bytes']}")
    print(f"tuning_file_safetensors_seconds={f['safetensors_seconds']:.3f} tuning_file_seconds={f['seconds']:.3f}")
    print(f"tuning_file_speedup={f['safetensors_seconds'] / f['seconds']:.2f}")
    print(f"tuning_file_stall_safetensors_seconds={f['stall_safetensors_seconds']:.4f}"
          f" tuning_file_stall_seconds={f['stall_seconds']:.4f}")


if __name__ == "__main__":
    main()
