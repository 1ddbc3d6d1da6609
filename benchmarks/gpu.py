"""GPU benchmark: the issue's speed targets, measured on an SD 1.5-architecture model with random weights.

Nothing is downloaded. The UNet is :data:`fastimagic.models.SD15_UNET_CONFIG`, the VAE is SD 1.5's AutoencoderKL
config and the text encoder is CLIP ViT-L/14's text tower (768 wide, 12 layers, 12 heads, 49408-token vocabulary),
all with seeded random weights, put together by the loader's own ``_assemble`` (fp32 UNet master weights,
channels_last on CUDA, VAE and text encoder in the compute dtype). The tokenizer is the tiny byte-level CLIP BPE
of :mod:`fastimagic.tiny`, because the real vocabulary cannot be downloaded: prompts split into different tokens,
but every prompt is padded to 77 tokens either way, so the text encoder does exactly the same compute. Random
weights do not change the speed of any kernel here; the images are noise.

Prints one JSON line per figure (stdout; progress goes to stderr):

    device          the GPU, torch/diffusers versions, date
    equivalence     each speed switch (--compile, --channels-last, --cudnn-benchmark, --no-cudnn-sdpa) against none,
                    on a tiny-model keyframe: the largest 8-bit pixel difference
    finetune        fastimagic.finetuning.finetune, 40 steps at batch 10, 512 px, no early stop: steady seconds (after
                    a separate 1-step warm-up call, whose time is first_call_seconds) and peak CUDA memory;
                    new_thread: the 1-step call on a thread that has run nothing yet against this warm one (torch
                    keeps cuDNN's plans per thread, see fastimagic.devices) and the attention kernels it ran
    compile         (with --only compile, or with --compile and sample; runs before sample) compile_unet: the
                    first-call seconds per batch size cold (empty inductor cache) and from the on-disk cache,
                    images/s compiled against uncompiled in the same run, largest pixel difference
    sample          Editor.render: 50-step DDIM with guidance 7.5 at 512 px, VAE decode and PIL conversion included,
                    best images/second over a sweep of batch sizes (images per UNet call, x2 for guidance)
    batch1          one image alone (comes with sample): seconds per image, UNet steps/s, VAE decode seconds, and
                    the host syncs per sampling step CUDA's sync debug mode counts
    flops           (comes with sample) TFLOP per keyframe (UNet pair x steps + VAE decode) and per fine-tune step,
                    counted with torch.utils.flop_counter, and the fraction of 790 TFLOP/s (dense fp16, H200) that
                    the sample, batch1 and finetune figures achieve
    forget_switch   Editor.forget("encoderattn") then Editor.forget("decoderattn"): median seconds of one switch
    profile         (comes with sample, runs after forget_switch) where the device's time goes, by torch.profiler:
                    3 guided UNet calls at the sample figure's best batch and at batch 1, the VAE decode of that
                    batch, a 2-step fine-tune; each as the share of kernel time per kind of operator (convolution,
                    matmul, attention, norm, copy/cast, elementwise, other), the ten costliest ops, and
                    device_busy = kernel time / wall time (below 1: the GPU waits for the host)
    storyboard      the real Prefect flow (flows.storyboard.storyboard_flow) on a 5-scene x 4-seed x 8-gamma
                    storyboard (160 keyframes, 50 steps, 512 px) whose model is a diffusers folder saved from the
                    random components, written to a local folder; seconds = model load + flow.
                    render_images_per_second: keyframes / the flow's render time; flow_efficiency: that / the
                    sampler's best images/s in this process (the sample figure's, or one render at the flow's batch
                    size on the flow's warm model when the sample figure did not run); gpu_busy_fraction: the time
                    inside the sampler (CUDA events on a GPU, the wall clock on CPU) / the flow's render time

Each figure carries ``target`` and ``meets_target`` (true/false on a CUDA run, null with --tiny or on CPU).
A figure that raises prints ``{"figure", "error", "where"}`` instead, the figures after it still run (those that
needed what failed print ``{"figure", "skipped"}``), and the exit status is 1.

Run: ``python benchmarks/gpu.py`` on a CUDA machine (estimated at about 5 minutes on an H200, most of it the
storyboard; not yet measured);
``python benchmarks/gpu.py --tiny`` runs the same code on the tiny model on CPU in well under a minute (CI).
Options: ``--precision fp16`` (see fastimagic.precision; default auto) for the finetune, sample and forget_switch
figures; ``--only finetune,sample`` selects figures; ``--compile``, ``--channels-last`` (VAE; CUDA only),
``--cudnn-benchmark``, ``--no-cudnn-sdpa`` switch speed-ups on for every figure (checked by the equivalence figure
first); ``--compile`` is the product's regional compilation (FASTIMAGIC_COMPILE=regional). See docs/performance.md
for what each figure includes.
"""

from __future__ import annotations

import argparse
import gc
import io
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

FIGURES = ("equivalence", "finetune", "compile", "sample", "batch1", "flops", "forget_switch", "profile", "storyboard")
# Run by default (compile only when asked: it compiles for minutes on a CPU) and what comes with what.
DEFAULT_FIGURES = tuple(f for f in FIGURES if f != "compile")
RIDERS = {"sample": ("batch1", "flops", "profile")}
# Dense fp16 tensor-core TFLOP/s this machine kind (H200) measures; the flops figure's yardstick.
PEAK_TFLOPS = 790.0
SWITCHES = ("channels_last", "cudnn_benchmark", "no_cudnn_sdpa", "compile")

# The issues' targets, for one H200, per architecture (--arch): SD 1.5 at 512 px, SDXL at 1024 px.
TARGETS_BY_ARCH = {
    "sd15": {
        "finetune": {"seconds_max": 4.0, "peak_gib_max": 20.0},
        "sample": {"images_per_second_min": 5.0},
        "batch1": {"seconds_per_image_max": 1.0},
        "forget_switch": {"seconds_max": 0.1},
        "storyboard": {"seconds_max": 60.0, "flow_efficiency_min": 0.9, "gpu_busy_fraction_min": 0.9},
    },
    "sdxl": {
        "finetune": {"seconds_max": 30.0, "peak_gib_max": 60.0},
        "sample": {"images_per_second_min": 0.5},
        "batch1": {"seconds_per_image_max": 3.0},
        "forget_switch": {"seconds_max": 0.2},
        "storyboard": {"seconds_max": None},  # no target given for SDXL; measured all the same
    },
}
TARGETS = TARGETS_BY_ARCH["sd15"]

SOURCE_PROMPT = "a photo of two friends standing on the beach"
PROMPT = "a photo of two friends dancing on the beach"
SCENE_PROMPTS = (
    "a photo of two friends walking on the beach",
    "a photo of two friends dancing on the beach",
    "a photo of two friends sitting on the beach at sunset",
    "a photo of two friends running in the rain",
    "a photo of two friends standing on the beach at night",
)
# One strategy per scene, so the storyboard switches forgetting between scenes as a real one does.
SCENE_FORGETS = ("none", "encoderattn", "decoderattn", "none", "encoderattn")

# SD 1.5's VAE (AutoencoderKL) and text encoder (CLIP ViT-L/14 text tower).
SD15_VAE_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    act_fn="silu",
    latent_channels=4,
    norm_num_groups=32,
    sample_size=512,
    scaling_factor=0.18215,
)
SD15_TEXT_CONFIG = dict(
    vocab_size=49408,
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    max_position_embeddings=77,
    hidden_act="quick_gelu",
    projection_dim=768,
)
# SDXL's second text encoder: OpenCLIP ViT-bigG/14's text tower with its projection (the pooled vector, 1280).
SDXL_BIGG_TEXT_CONFIG = dict(
    vocab_size=49408,
    hidden_size=1280,
    intermediate_size=5120,
    num_hidden_layers=32,
    num_attention_heads=20,
    max_position_embeddings=77,
    hidden_act="gelu",
    projection_dim=1280,
)


@dataclass(frozen=True)
class Plan:
    """Sizes of one benchmark run: the issue's (``FULL``) or the CI smoke run on the tiny model (``TINY``)."""

    model: str  # "sd15", "sdxl", "tiny" or "tiny-sdxl"
    resolution: int
    finetune_steps: int
    finetune_batch: int
    sample_steps: int
    sample_batches: tuple[int, ...]
    forget_repeat: int
    story_scenes: int
    story_seeds: int
    story_gammas: tuple[float, ...]


FULL = Plan("sd15", 512, 40, 10, 50, (1, 4, 8, 16, 32), 21, 5, 4, (0.8, 0.9, 1.0, 1.1, 1.2, 1.3, 1.4, 1.5))
TINY = Plan("tiny", 64, 4, 10, 4, (1, 4), 5, 2, 2, (0.9, 1.2))
# SDXL at 1024 px: fine-tune 40 steps x batch 10, 50-step sampling over a smaller batch sweep, a 2-scene storyboard.
FULL_SDXL = Plan("sdxl", 1024, 40, 10, 50, (1, 2, 4, 8), 21, 2, 2, (0.9, 1.1))
TINY_SDXL = replace(TINY, model="tiny-sdxl")
PLANS = {("sd15", False): FULL, ("sd15", True): TINY, ("sdxl", False): FULL_SDXL, ("sdxl", True): TINY_SDXL}


def targets(plan: Plan) -> dict:
    return TARGETS_BY_ARCH["sdxl" if "sdxl" in plan.model else "sd15"]


def emit(record: dict) -> None:
    print(json.dumps(record), flush=True)


_STARTED = time.perf_counter()


def note(message: str) -> None:
    print(f"[gpu.py {time.perf_counter() - _STARTED:6.1f}s] {message}", file=sys.stderr, flush=True)


def prefect_env(home: Path) -> None:
    """Point Prefect at its own embedded server and database under ``home``; call before importing prefect."""
    os.environ["PREFECT_HOME"] = str(home)
    os.environ.pop("PREFECT_API_URL", None)
    os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
    os.environ["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"] = "180"
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")


def reference_png(size: int) -> bytes:
    """A drawn reference picture (sky, sun, hill, tree) as PNG bytes; with random weights any picture will do."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (size, size), (110, 160, 230))
    d = ImageDraw.Draw(img)
    d.ellipse((size * 0.6, size * 0.1, size * 0.8, size * 0.3), fill=(250, 220, 60))
    d.polygon([(0, size), (size * 0.4, size * 0.5), (size, size)], fill=(60, 140, 70))
    d.rectangle((size * 0.2, size * 0.6, size * 0.3, size * 0.85), fill=(120, 70, 40))
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def storyboard_yaml(
    *,
    name: str,
    reference: str,
    model: str,
    output: str,
    resolution: int,
    scenes: int,
    seeds: int,
    gammas: tuple[float, ...],
    steps: int,
    finetune_steps: int,
    finetune_batch: int = 10,
) -> str:
    """A storyboard: ``scenes`` scenes x ``seeds`` seeds x ``gammas`` (one forgetting strategy each), no scoring."""
    from fastimagic.storyboard import Storyboard

    lines = [
        f"name: {name}",
        f"reference: {reference}",
        f"model: {model}",
        f"resolution: {resolution}",
        f"source_prompt: {SOURCE_PROMPT}",
        f"finetune: {{steps: {finetune_steps}, min_steps: {finetune_steps}, batch_size: {finetune_batch}}}",
        f"output: {output}",
    ]
    # Scoring loads CLIP L/14, which cannot be downloaded here, and is not part of "reference to keyframes".
    if "scorer" in Storyboard.model_fields:
        lines.append("scorer: none")
    gamma_list = ", ".join(f"{g:g}" for g in gammas)
    lines += [
        "defaults:",
        f"  seeds: {seeds}",
        f"  steps: {steps}",
        "  guidance: 7.5",
        f"  edit: {{subtract: {{gamma: [{gamma_list}]}}}}",
        "scenes:",
    ]
    for i in range(scenes):
        prompt = SCENE_PROMPTS[i % len(SCENE_PROMPTS)]
        lines.append(f"  - {{id: scene-{i + 1}, prompt: {prompt}, forget: {SCENE_FORGETS[i % len(SCENE_FORGETS)]}}}")
    return "\n".join(lines) + "\n"


# --- models -------------------------------------------------------------------------------------------------------


def build_components(kind: str, device: str, seed: int = 0) -> dict:
    """Fresh components with seeded random weights: ``sd15`` / ``sdxl`` (built on ``device``), ``tiny`` /
    ``tiny-sdxl``. SDXL: its UNet (:data:`fastimagic.models.SDXL_UNET_CONFIG`), SD 1.5's VAE config with SDXL's
    latent scale, CLIP ViT-L and OpenCLIP bigG text towers (the second tokenizer pads with ``!``)."""
    import torch

    from fastimagic import tiny
    from fastimagic.families import SDXL, TINY_FAMILIES

    if kind in TINY_FAMILIES:
        return tiny.build_components(seed, name=kind) | {"family": TINY_FAMILIES[kind]}
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from fastimagic.models import SD15_UNET_CONFIG, SDXL_UNET_CONFIG

    if kind == "sdxl":
        tokenizer = tiny.clip_tokenizer()
        ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
        torch.manual_seed(seed)
        with torch.device(device):
            unet = UNet2DConditionModel(**SDXL_UNET_CONFIG)
            vae = AutoencoderKL(**(SD15_VAE_CONFIG | {"scaling_factor": 0.13025, "sample_size": 1024}))
            text_encoder = CLIPTextModel(CLIPTextConfig(**SD15_TEXT_CONFIG, **ids, pad_token_id=tokenizer.eos_token_id))
            text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**SDXL_BIGG_TEXT_CONFIG, **ids, pad_token_id=0))
        return {
            "family": SDXL,
            "unet": unet,
            "vae": vae,
            "text_encoder": text_encoder,
            "text_encoder_2": text_encoder_2,
            "tokenizer": tokenizer,
            "tokenizer_2": tiny.clip_tokenizer(pad_token="!"),
        }

    tokenizer = tiny.clip_tokenizer()
    torch.manual_seed(seed)
    # Initialising 1.1 billion parameters is quick on the GPU and slow on the CPU: build where they will run.
    with torch.device(device):
        unet = UNet2DConditionModel(**SD15_UNET_CONFIG)
        vae = AutoencoderKL(**SD15_VAE_CONFIG)
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                **SD15_TEXT_CONFIG,
                bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.eos_token_id,
            )
        )
    return {"unet": unet, "vae": vae, "text_encoder": text_encoder, "tokenizer": tokenizer}


def assemble(kind: str, device: str, seed: int = 0, precision: str = "auto"):
    """A :class:`fastimagic.models.Components` from :func:`build_components`, through the loader's ``_assemble``."""
    import torch

    from fastimagic.models import _assemble
    from fastimagic.precision import resolve_precision

    dev = torch.device(device)
    resolved = resolve_precision(precision, dev)
    return _assemble(build_components(kind, device, seed), f"benchmark:{kind}-random-{seed}", dev, resolved)


def apply_switches(model, switches: list[str], compile_mode: str, backend: str = "inductor") -> None:
    """Turn speed switches on for ``model``. None changes parameter names, so tunings and forgetting still apply.

    channels_last: the VAE (``_assemble`` already makes the UNet channels_last on CUDA). CUDA only: on CPU, torch
    2.13 segfaults in GroupNorm's channels_last backward when the input needs no grad, which is what the first
    norm of down_blocks.0 sees in fine-tuning once a channels_last latent reaches it. cudnn_benchmark:
    process-wide. no_cudnn_sdpa: attention off cuDNN (flash or memory-efficient kernels instead), process-wide;
    torch prefers cuDNN's attention on Hopper, which builds a graph per shape and thread. compile:
    :func:`fastimagic.models.compile_unet`, the UNet's repeated blocks compiled in place (parameter names
    unchanged), batches padded to buckets, the fine-tune eager.
    """
    import torch

    if "channels_last" in switches:
        model.vae.to(memory_format=torch.channels_last)
    if "cudnn_benchmark" in switches:
        torch.backends.cudnn.benchmark = True
    if "no_cudnn_sdpa" in switches:
        torch.backends.cuda.enable_cudnn_sdp(False)
    if "compile" in switches:
        from fastimagic.models import compile_unet

        compile_unet(model, "regional", mode=None if compile_mode == "default" else compile_mode, backend=backend)


def free(device) -> None:
    import torch

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(device, fn):
    """(result, seconds) of ``fn()``, with the device synchronised before and after."""
    sync(device)
    t = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - t


def verdict(plan: Plan, device, checks: list[bool]) -> bool | None:
    if plan.model.startswith("tiny") or device.type != "cuda":
        return None
    return all(checks)


# --- figures ------------------------------------------------------------------------------------------------------


def figure_device(plan: Plan, device, switches: list[str], precision: str = "auto") -> dict:
    import diffusers
    import torch
    import transformers

    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    return {
        "figure": "device",
        "gpu": gpu,
        "device": str(device),
        "model": {
            "tiny": "tiny (random)",
            "tiny-sdxl": "tiny-sdxl (random)",
            "sd15": "SD 1.5 architecture (random weights)",
            "sdxl": "SDXL architecture (random weights)",
        }[plan.model],
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "cpu": platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        # Which attention kernels torch may pick (it prefers cuDNN's on Hopper unless told otherwise).
        "sdpa_enabled": {
            "cudnn": torch.backends.cuda.cudnn_sdp_enabled() and "no_cudnn_sdpa" not in switches,
            "flash": torch.backends.cuda.flash_sdp_enabled(),
            "efficient": torch.backends.cuda.mem_efficient_sdp_enabled(),
        },
        "TORCH_CUDNN_SDPA_DEPRIORITIZED": os.environ.get("TORCH_CUDNN_SDPA_DEPRIORITIZED"),
        "switches": switches,
        "precision": precision,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def _frames_uint8(frames) -> list:
    import numpy as np

    return [np.asarray(f.image, dtype=np.int16) for f in frames]


def _max_diff(a: list, b: list) -> int:
    return int(max(abs(x - y).max() for x, y in zip(a, b)))


def figure_equivalence(device, switches: list[str], compile_mode: str, image) -> dict:
    """Render tiny-model keyframes (two gammas; forgetting none, encoderattn, none again) without and
    with each switch, from the same tuning; also fine-tune 2 steps under each switch and compare the losses."""
    import torch

    from fastimagic.editor import Editor
    from fastimagic.finetuning import FinetuneConfig, finetune
    from fastimagic.models import load_base_model

    config = FinetuneConfig(steps=2, min_steps=2, batch_size=2)
    size = 64

    def keyframes(model, tuning):
        with Editor(model, tuning) as editor:
            edits = [{"mode": "subtract", "gamma": g} for g in (1.0, 1.3)]
            frames = []
            # Two strategies on one model: a compiled UNet must see the in-place forgetting edits.
            for forget in ("none", "encoderattn", "none"):
                frames += editor.render(PROMPT, seeds=[0], edits=edits, forget=forget, steps=4, max_batch=2)
        return _frames_uint8(frames)

    benchmark_flag, cudnn_sdpa = torch.backends.cudnn.benchmark, torch.backends.cuda.cudnn_sdp_enabled()
    torch.backends.cudnn.benchmark = False
    try:
        plain = load_base_model("tiny", device=str(device))
        tuning = finetune(plain, image, SOURCE_PROMPT, config, width=size, height=size)
        baseline = keyframes(plain, tuning)
        repeat = _max_diff(baseline, keyframes(plain, tuning))
        del plain
        groups = [[s] for s in switches] + ([list(switches)] if len(switches) > 1 else [])
        per_switch = {}
        for group in groups:
            model = load_base_model("tiny", device=str(device))
            apply_switches(model, group, compile_mode)
            switched_tuning = finetune(model, image, SOURCE_PROMPT, config, width=size, height=size)
            loss_diff = max(abs(a - b) for a, b in zip(tuning.losses, switched_tuning.losses))
            per_switch["+".join(group)] = {
                "max_pixel_diff": _max_diff(baseline, keyframes(model, tuning)),
                "finetune_loss_max_abs_diff": round(loss_diff, 6),
            }
            torch.backends.cudnn.benchmark = False
            torch.backends.cuda.enable_cudnn_sdp(cudnn_sdpa)
            del model
            free(device)
    finally:
        torch.backends.cudnn.benchmark = benchmark_flag
        torch.backends.cuda.enable_cudnn_sdp(cudnn_sdpa)
    return {
        "figure": "equivalence",
        "model": "tiny",
        "resolution": size,
        "switches": switches,
        "max_pixel_diff": max([repeat] + [v["max_pixel_diff"] for v in per_switch.values()]),
        "baseline_repeat_max_pixel_diff": repeat,
        "per_switch": per_switch,
    }


def figure_finetune(model, image, plan: Plan):
    import torch

    from fastimagic.finetuning import FinetuneConfig, finetune
    from fastimagic.store import open_store
    from tasks.pipeline import put_tuning

    device, size = model.device, plan.resolution
    steps, batch = plan.finetune_steps, plan.finetune_batch
    warm = FinetuneConfig(steps=1, min_steps=1, batch_size=batch)
    # The cold first call under the host-side profiler: which ops hold the start (kernel loading, planning).
    cold = profiled(device, lambda: finetune(model, image, SOURCE_PROMPT, warm, width=size, height=size), host=True)
    first = cold.pop("wall_ms") / 1e3
    free(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    config = FinetuneConfig(steps=steps, min_steps=steps, batch_size=batch)  # min_steps = steps: no early stop
    tuning, seconds = timed(device, lambda: finetune(model, image, SOURCE_PROMPT, config, width=size, height=size))
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    target = targets(plan)["finetune"]
    # torch keeps cuDNN's plans per thread (see fastimagic.devices): the 1-step call again on this warm thread, and
    # on a thread that has run nothing yet, under the host-side profiler (which attention kernels, which set-up).
    _, warm_seconds = timed(device, lambda: finetune(model, image, SOURCE_PROMPT, warm, width=size, height=size))
    fresh: dict = {}

    def on_a_new_thread() -> None:
        try:
            fresh.update(profiled(
                device, lambda: finetune(model, image, SOURCE_PROMPT, warm, width=size, height=size), host=True
            ))
        except Exception as e:  # reported in the record, not lost with the thread
            fresh["error"] = f"{type(e).__name__}: {e}"

    worker = threading.Thread(target=on_a_new_thread, name="gpu-bench-new-thread")
    worker.start()
    worker.join()
    fresh_seconds = fresh.pop("wall_ms", float("nan")) / 1e3
    with tempfile.TemporaryDirectory() as folder:  # what a run writes after a fine-tune (behind its renders)
        started = time.perf_counter()
        put_tuning(open_store(folder), tuning)
        write_seconds = time.perf_counter() - started
        tuning_bytes = sum(f.stat().st_size for f in Path(folder).iterdir())
    record = {
        "figure": "finetune",
        "seconds": round(seconds, 3),
        "first_call_seconds": round(first, 3),
        "first_call_host": cold,
        "new_thread": {
            "warm_thread_seconds": round(warm_seconds, 3),
            "first_call_seconds": round(fresh_seconds, 3),
            "per_thread_setup_seconds": round(fresh_seconds - warm_seconds, 3),
            "host": fresh,
        },
        "seconds_per_step": round(seconds / len(tuning.losses), 4),
        "steps": len(tuning.losses),
        "batch": batch,
        "resolution": size,
        "peak_gib": round(peak, 2) if peak is not None else None,
        "trained_parameters": tuning.trained_parameters,
        "tuning_bytes": tuning_bytes,
        "tuning_write_seconds": round(write_seconds, 3),
        # The UNet as stored on the device (fp16/bf16: convolutions and linears in half, fastimagic.precision).
        "unet_weights_bytes": sum(p.numel() * p.element_size() for p in model.unet.parameters()),
        "gradient_checkpointing": 0 < model.family.checkpointing_from <= size * size,
        "target": target,
        "meets_target": verdict(
            plan, device, [seconds <= target["seconds_max"], peak is not None and peak <= target["peak_gib_max"]]
        ),
    }
    return record, tuning


def figure_sample(model, tuning, plan: Plan) -> dict:
    import torch

    from fastimagic.editor import Editor
    from fastimagic.sampler import auto_batch_size

    device, size = model.device, plan.resolution
    oom = getattr(torch, "OutOfMemoryError", RuntimeError)
    sweep = {}
    with Editor(model, tuning) as editor:
        for batch in plan.sample_batches:

            def render(steps: int, batch: int = batch):
                return editor.render(
                    PROMPT,
                    seeds=list(range(batch)),
                    edits=[{"mode": "subtract", "gamma": 1.0}],
                    steps=steps,
                    guidance=7.5,
                    max_batch=batch,
                )

            try:
                render(2)  # warm-up with the same shapes (allocator, cuDNN/compile for this batch size)
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                frames, seconds = timed(device, lambda: render(plan.sample_steps))
            except oom:
                sweep[str(batch)] = "out of memory"
                free(device)
                break
            assert len(frames) == batch
            peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
            sweep[str(batch)] = {
                "images_per_second": round(batch / seconds, 3),
                "seconds": round(seconds, 3),
                "peak_gib": round(peak, 2) if peak is not None else None,
            }
            note(f"sample batch {batch}: {batch / seconds:.2f} images/s")
            free(device)
    measured = {int(b): v for b, v in sweep.items() if isinstance(v, dict)}
    best = max(measured, key=lambda b: measured[b]["images_per_second"])
    ips = measured[best]["images_per_second"]
    target = targets(plan)["sample"]
    return {
        "figure": "sample",
        "images_per_second": ips,
        "batch": best,
        "steps": plan.sample_steps,
        "guidance": 7.5,
        "resolution": size,
        "sweep": sweep,
        "auto_batch": auto_batch_size(model, size, size),
        "target": target,
        "meets_target": verdict(plan, device, [ips >= target["images_per_second_min"]]),
    }


def host_syncs_per_step(device, render) -> float | None:
    """Synchronising CUDA calls per sampling step, as CUDA's sync debug mode reports them: ``render(steps)`` at 2
    and 6 steps, the difference over 4 (so the syncs before and after the step loop cancel out). None off CUDA."""
    import warnings

    import torch

    if device.type != "cuda":
        return None
    counts = {}
    for steps in (2, 6):
        torch.cuda.set_sync_debug_mode("warn")
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                render(steps)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        counts[steps] = sum("synchroniz" in str(w.message).lower() for w in caught)
    return (counts[6] - counts[2]) / 4


def figure_batch1(model, tuning, plan: Plan) -> dict:
    """One image alone: what a user waiting for one keyframe sees."""
    import torch

    from fastimagic.editor import Editor
    from fastimagic.sampler import decode

    device, size = model.device, plan.resolution
    with Editor(model, tuning) as editor:

        def render(steps: int):
            return editor.render(PROMPT, seeds=[0], edits=[{"mode": "subtract", "gamma": 1.0}], steps=steps,
                                 guidance=7.5, max_batch=1)

        render(2)
        _, seconds = timed(device, lambda: render(plan.sample_steps))
        syncs = host_syncs_per_step(device, render)
    latent = torch.randn(1, model.unet.config.in_channels, size // 8, size // 8, device=device)
    decode(model, latent)
    _, decode_seconds = timed(device, lambda: decode(model, latent))
    target = targets(plan)["batch1"]
    return {
        "figure": "batch1",
        "seconds_per_image": round(seconds, 3),
        "unet_steps_per_second": round(plan.sample_steps / seconds, 2),  # one step = the guided pair
        "steps": plan.sample_steps,
        "resolution": size,
        "vae_decode_seconds": round(decode_seconds, 4),
        "vae_decode_share": round(decode_seconds / seconds, 3),
        "vae_dtype": str(model.vae.dtype).removeprefix("torch."),
        "host_syncs_per_step": syncs,
        "target": target,
        "meets_target": verdict(plan, device, [seconds <= target["seconds_per_image_max"]]),
    }


def count_tflop(fn) -> float:
    """TFLOP that ``fn()`` runs, counted by ``torch.utils.flop_counter`` (matmuls, convolutions, attention)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops() / 1e12


def _sig(x: float) -> float:
    return float(f"{x:.4g}")


def figure_flops(model, image, plan: Plan, records: dict) -> dict:
    """Work counted, not guessed, and the fraction of the chip the sample, batch1 and finetune figures reach."""
    import torch

    from fastimagic.finetuning import FinetuneConfig, finetune

    device, size, latent = model.device, plan.resolution, plan.resolution // 8
    ids = model.family.time_ids((size, size), (0, 0), (size, size)) if model.family.pooled else None
    inputs = model.unet_inputs(model.encode_prompts(["", PROMPT]), ids)
    x = torch.randn(2, model.unet.config.in_channels, latent, latent, device=device)
    z = torch.randn(1, model.unet.config.in_channels, latent, latent, device=device, dtype=model.vae.dtype)
    t = torch.tensor(500, device=device)

    def unet_pair():
        with model.autocast():
            model.unet(x, t, **inputs)

    def finetune_steps(steps: int) -> float:
        config = FinetuneConfig(steps=steps, min_steps=steps, batch_size=plan.finetune_batch)
        return count_tflop(lambda: finetune(model, image, SOURCE_PROMPT, config, width=size, height=size))

    with model.eager(), torch.no_grad():
        unet = count_tflop(unet_pair) / 2  # per image; the guided pair is two
        vae = count_tflop(lambda: model.vae.decode(z))
    with model.eager():
        step = finetune_steps(2) - finetune_steps(1)  # one step exactly: encode and text work cancel out
    keyframe = plan.sample_steps * 2 * unet + vae
    on_gpu = device.type == "cuda" and not plan.model.startswith("tiny")

    def fraction(tflop_per_second: float | None) -> float | None:
        return round(tflop_per_second / PEAK_TFLOPS, 3) if on_gpu and tflop_per_second else None

    sample, batch1, tune = records.get("sample"), records.get("batch1"), records.get("finetune")
    return {
        "figure": "flops",
        "unet_tflop_per_image": _sig(unet),
        "vae_decode_tflop": _sig(vae),
        "tflop_per_keyframe": _sig(keyframe),
        "finetune_tflop_per_step": _sig(step),
        "finetune_batch": plan.finetune_batch,
        "resolution": size,
        "steps": plan.sample_steps,
        "peak_tflops": PEAK_TFLOPS,
        "keyframes_per_second_at_peak": _sig(PEAK_TFLOPS / keyframe),
        "sample_fraction_of_peak": fraction(sample and sample["images_per_second"] * keyframe),
        "batch1_fraction_of_peak": fraction(batch1 and keyframe / batch1["seconds_per_image"]),
        "finetune_fraction_of_peak": fraction(tune and step / tune["seconds_per_step"]),
    }


# What each profiled operator is, from its name (the innermost aten op that launched the kernels); first match wins.
OP_KINDS = (
    ("attention", ("attention", "flash", "sdpa")),
    ("convolution", ("conv",)),
    ("matmul", ("mm", "matmul", "linear", "gemm")),  # aten::mm, addmm, bmm, baddbmm
    ("norm", ("norm",)),
    ("copy/cast", ("copy", "_to", "cat", "clone", "contiguous", "stack", "index")),
    ("elementwise", ("add", "mul", "sub", "div", "silu", "gelu", "sigmoid", "neg", "exp", "pow", "sqrt", "where",
                     "fill", "zero", "mean", "sum", "upsample", "cos", "sin", "arange", "lerp", "clamp", "foreach")),
)


def op_kind(name: str) -> str:
    low = name.lower().removeprefix("aten::")
    return next((kind for kind, parts in OP_KINDS if any(p in low for p in parts)), "other")


def profiled(device, fn, host: bool = False) -> dict:
    """``fn()`` once under torch.profiler: the device's time by kind of operator (self time of each aten op: on a
    GPU its kernels, on a CPU its own compute), the ten costliest ops, and ``device_busy`` = kernel time / wall
    time (a GPU that waits for Python launching kernels shows it here; the profiler's own overhead lowers it a
    little). Times in milliseconds.

    ``host=True``: the host's side instead (CPU activity only, so little overhead): each op's own time on the host,
    which on a GPU includes what the op waits for there, as loading kernels and planning convolutions the first
    time (``host_ms``, ``in_ops`` = that / wall; the rest is Python and what runs outside aten ops)."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda" and not host
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    sync(device)
    with profile(activities=activities) as prof:
        _, wall = timed(device, fn)

    def own(e) -> float:  # microseconds
        if cuda:
            return float(getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0) or 0)
        return float(e.self_cpu_time_total)

    averages = prof.key_averages()
    ops = [(e.key, own(e), e.count) for e in averages if own(e) > 0 and e.key.startswith("aten::")]
    attention = {e.key: e.count for e in averages if "scaled_dot_product" in e.key and e.key.startswith("aten::_")}
    total = sum(us for _, us, _ in ops) or 1.0
    kinds: dict[str, float] = {}
    for name, us, _ in ops:
        kind = op_kind(name)
        kinds[kind] = kinds.get(kind, 0.0) + us
    top = sorted(ops, key=lambda o: -o[1])[:10]
    share = round(total / 1e6 / wall, 3)  # of the wall time, in the ops
    return {
        "wall_ms": round(wall * 1e3, 2),
        **({"host_ms": round(total / 1e3, 2), "in_ops": share} if host else
           {"device_ms": round(total / 1e3, 2), "device_busy": share if cuda else None}),
        "by_kind": {k: round(v / total, 3) for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])},
        "top": [{"op": n, "ms": round(us / 1e3, 2), "share": round(us / total, 3), "calls": c} for n, us, c in top],
        "attention_kernels": attention,  # the backends SDPA picked: aten::_scaled_dot_product_<backend>_attention
    }


def figure_profile(model, tuning, image, plan: Plan, records: dict) -> dict:
    """Where the device's time goes (comes with sample, runs last): guided UNet calls at the sample figure's best
    batch and at batch 1, the VAE decoding that batch, and a 2-step fine-tune, each under torch.profiler
    (:func:`profiled`), with the tuning applied as when rendering."""
    import torch

    from fastimagic.editor import Editor
    from fastimagic.finetuning import FinetuneConfig, finetune
    from fastimagic.sampler import decode

    device, size, latent = model.device, plan.resolution, plan.resolution // 8
    best = (records.get("sample") or {}).get("batch") or max(plan.sample_batches)
    ids = model.family.time_ids((size, size), (0, 0), (size, size)) if model.family.pooled else None
    t = torch.tensor(500, device=device)
    calls = 3
    out = {"figure": "profile", "resolution": size, "unet_calls": calls}
    with Editor(model, tuning):
        for label, batch in (("unet_best_batch", best), ("unet_batch1", 1)):
            inputs = model.unet_inputs(model.encode_prompts([""] * batch + [PROMPT] * batch), ids)
            x = torch.randn(2 * batch, model.unet.config.in_channels, latent, latent, device=device)

            def unet(inputs=inputs, x=x):
                with torch.no_grad():
                    for _ in range(calls):
                        with model.autocast():
                            model.unet(x, t, **inputs)

            unet()  # warm-up: the same shapes
            out[label] = {"batch": batch, **profiled(device, unet)}
            note(f"profile {label}: {out[label]['by_kind']}")
            free(device)
        z = torch.randn(best, model.unet.config.in_channels, latent, latent, device=device)
        decode(model, z[:1])  # the product's decode: in parts of decode_batch images, copied to the host
        out["vae_decode"] = {"batch": best, **profiled(device, lambda: decode(model, z))}
        free(device)
    config = FinetuneConfig(steps=2, min_steps=2, batch_size=plan.finetune_batch)
    with model.eager():
        out["finetune_2_steps"] = {"batch": plan.finetune_batch, **profiled(
            device, lambda: finetune(model, image, SOURCE_PROMPT, config, width=size, height=size))}
    return out


def figure_compile(model, tuning, plan: Plan, work: Path, backend: str = "inductor") -> dict:
    """Regional compilation (fastimagic.models.compile_unet) against no compilation, in one run: the first call per
    batch size with an empty inductor cache (cold) and after ``torch._dynamo.reset()`` with the cache on disk
    (what a restarted worker pays), the steady speed, and the largest pixel difference."""
    import torch
    import torch._dynamo
    from torch._inductor.utils import clear_caches

    from fastimagic.editor import Editor
    from fastimagic.models import COMPILED_BLOCKS, compile_unet

    device = model.device
    if model.compiled == "off":
        compile_unet(model, "regional", backend=backend)
    # An empty cache folder of this run's own, inductor's and Triton's (the cold pass), read back by the second pass.
    cache = work / "inductor-cache"
    saved = {k: os.environ.get(k) for k in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR")}
    os.environ.update(TORCHINDUCTOR_CACHE_DIR=str(cache), TRITON_CACHE_DIR=str(cache / "triton"))
    per_batch: dict[str, dict] = {}
    diff = 0
    with Editor(model, tuning) as editor:

        def render(steps: int, batch: int):
            return editor.render(PROMPT, seeds=list(range(batch)), edits=[{"mode": "subtract", "gamma": 1.0}],
                                 steps=steps, guidance=7.5, max_batch=batch)

        eager_frames = {}
        with torch.compiler.set_stance("force_eager"):
            for b in plan.sample_batches:
                render(2, b)
                _, two = timed(device, lambda b=b: render(2, b))
                frames, seconds = timed(device, lambda b=b: render(plan.sample_steps, b))
                eager_frames[b] = _frames_uint8(frames)
                per_batch[str(b)] = {"eager_two_step_seconds": round(two, 3),
                                     "eager_images_per_second": round(b / seconds, 3)}
        for label in ("cold", "cache"):
            torch._dynamo.reset()
            clear_caches()  # inductor's in-memory caches: only the folder on disk carries over
            for b in plan.sample_batches:
                _, first = timed(device, lambda b=b: render(2, b))
                per_batch[str(b)][f"{label}_first_call_seconds"] = round(first, 3)
                note(f"compile {label}: batch {b} first call {first:.1f} s")
                if label == "cache":
                    frames, seconds = timed(device, lambda b=b: render(plan.sample_steps, b))
                    diff = max(diff, _max_diff(eager_frames[b], _frames_uint8(frames)))
                    row = per_batch[str(b)]
                    row["compiled_images_per_second"] = round(b / seconds, 3)
                    row["speedup"] = round(row["compiled_images_per_second"] / row["eager_images_per_second"], 3)
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    rows = per_batch.values()
    return {
        "figure": "compile",
        "setting": model.compiled,
        "backend": backend,
        "blocks": list(COMPILED_BLOCKS),
        "batches": per_batch,
        "cold_compile_seconds": round(sum(r["cold_first_call_seconds"] - r["eager_two_step_seconds"] for r in rows), 2),
        "cache_compile_seconds": round(
            sum(r["cache_first_call_seconds"] - r["eager_two_step_seconds"] for r in rows), 2
        ),
        "max_pixel_diff": diff,
        "target": {"max_pixel_diff_max": 2},
        "meets_target": verdict(plan, device, [diff <= 2]),
    }


def figure_forget_switch(model, tuning, plan: Plan) -> dict:
    from fastimagic.editor import Editor

    device = model.device
    times: dict[str, list[float]] = {"encoderattn": [], "decoderattn": []}
    touched = {}
    # What the storyboard flow pays once per render task: put the tuning into the UNet, and take it out again.
    editor, apply_seconds = timed(device, lambda: Editor(model, tuning))
    _, close_seconds = timed(device, editor.close)
    with Editor(model, tuning) as editor:
        editor.forget("encoderattn")
        editor.forget("decoderattn")  # warm-up; from here every call undoes one strategy and applies the other
        for _ in range(plan.forget_repeat):
            for strategy in times:
                report, seconds = timed(device, lambda strategy=strategy: editor.forget(strategy))
                times[strategy].append(seconds)
                touched[strategy] = report.parameters
    seconds = statistics.median(times["encoderattn"] + times["decoderattn"])
    target = targets(plan)["forget_switch"]
    return {
        "figure": "forget_switch",
        "seconds": round(seconds, 5),
        "median_seconds": {s: round(statistics.median(t), 5) for s, t in times.items()},
        "max_seconds": round(max(times["encoderattn"] + times["decoderattn"]), 5),
        "switches_timed": 2 * plan.forget_repeat,
        "parameters_forgotten": touched,
        "editor_apply_tuning_seconds": round(apply_seconds, 5),
        "editor_close_seconds": round(close_seconds, 5),
        "target": target,
        "meets_target": verdict(plan, device, [target["seconds_max"] is None or seconds <= target["seconds_max"]]),
    }


class SamplerClock:
    """Time spent inside :func:`fastimagic.sampler.sample` during the flow's renders: CUDA events around each call
    on a GPU (read after the flow, so nothing waits for the GPU meanwhile), the wall clock on CPU. Installed where
    the editor calls the sampler; the model lock keeps the calls from overlapping."""

    def __init__(self, device):
        self.device = device
        self.cuda = device.type == "cuda"
        self.spans: list = []
        self.calls = 0

    def __enter__(self) -> SamplerClock:
        import fastimagic.editor as editor_module

        self._module, self._sample = editor_module, editor_module.sample

        def timed_sample(*args, **kwargs):
            import torch

            self.calls += 1
            if self.cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                try:
                    return self._sample(*args, **kwargs)
                finally:
                    end.record()
                    self.spans.append((start, end))
            t = time.perf_counter()
            try:
                return self._sample(*args, **kwargs)
            finally:
                self.spans.append(time.perf_counter() - t)

        editor_module.sample = timed_sample
        return self

    def __exit__(self, *exc) -> None:
        self._module.sample = self._sample

    def seconds(self) -> float:
        if self.cuda:
            sync(self.device)
            return sum(start.elapsed_time(end) for start, end in self.spans) / 1000.0
        return float(sum(self.spans))


def sampler_images_per_second(model, tuning, plan: Plan, batch: int) -> float:
    """The sampler alone at ``batch`` images per call (one prompt, ``batch`` seeds), after a 2-step warm-up: the
    reference for ``flow_efficiency`` when the sample figure did not run in this process."""
    from fastimagic.editor import Editor

    device = model.device

    def render(steps: int):
        return editor.render(PROMPT, seeds=list(range(batch)), edits=[{"mode": "subtract", "gamma": 1.0}],
                             steps=steps, guidance=7.5, max_batch=batch)

    with model.lock, Editor(model, tuning) as editor:
        render(2)
        _, seconds = timed(device, lambda: render(plan.sample_steps))
    return batch / seconds


def figure_storyboard(
    plan: Plan, device, switches: list[str], compile_mode: str, work: Path, sample_ips: float | None = None
) -> dict:
    """The real flow from a storyboard file whose model is a diffusers folder of the random components.
    ``sample_ips``: the sample figure's best images/s, when it ran in this process."""
    sys.path.insert(0, str(ROOT / "tests"))
    from ldm_export import save_diffusers_folder  # the tests' recipe for a diffusers folder from components

    folder = work / "model"
    parts = build_components(plan.model, str(device))
    save_diffusers_folder(parts, folder)
    del parts
    free(device)
    (work / "reference.png").write_bytes(reference_png(plan.resolution))
    story = work / "story.yaml"
    story.write_text(
        storyboard_yaml(
            name="gpu-benchmark",
            reference="reference.png",
            model="./model",
            output="./keyframes",
            resolution=plan.resolution,
            scenes=plan.story_scenes,
            seeds=plan.story_seeds,
            gammas=plan.story_gammas,
            steps=plan.sample_steps,
            finetune_steps=plan.finetune_steps,
            finetune_batch=plan.finetune_batch,
        )
    )
    expected = plan.story_scenes * plan.story_seeds * len(plan.story_gammas)

    from prefect import flow

    from fastimagic import models
    from flows.storyboard import storyboard_flow

    @flow(name="warm-up")
    def warm_up() -> int:
        return 1

    # Prefect's embedded server starts with the first flow run of the process: keep that out of the figure.
    _, prefect_start = timed(device, warm_up)
    # Load the model the way the flow's tasks do (cached_base_model: one warm model per process), so the speed
    # switches can be applied to it; its load time is part of the figure.
    warm, load = timed(device, lambda: models.cached_base_model(str(folder.resolve())))
    apply_switches(warm, switches, compile_mode)
    with SamplerClock(device) as clock:
        result, flow_seconds = timed(device, lambda: storyboard_flow(storyboard=str(story)))
    busy_seconds = clock.seconds()
    prewarmed = any(m is warm for m in models._WARM.values())
    manifest = json.loads(Path(result["manifest"]).read_text())
    written = [Path(result["manifest"]).parent / k["key"] for k in manifest["keyframes"]]
    if result["keyframes"] != expected or not all(p.is_file() for p in written):
        raise RuntimeError(f"storyboard wrote {result['keyframes']} keyframes, expected {expected}")
    seconds = load + flow_seconds
    render_seconds = (manifest.get("timings") or {}).get("render_seconds") or flow_seconds
    render_ips = result["keyframes"] / render_seconds
    from fastimagic.sampler import auto_batch_size
    from fastimagic.tuning import Tuning

    flow_batch = min(auto_batch_size(warm, plan.resolution, plan.resolution), result["keyframes"])
    if sample_ips is None:
        stored = work / "keyframes" / "tunings" / result["tuning_key"]
        tuning = Tuning.read(lambda name: (stored / name).read_bytes(), where=str(stored))
        note(f"storyboard: the sampler alone at batch {flow_batch}, for flow_efficiency")
        sample_ips, sample_from = sampler_images_per_second(warm, tuning, plan, flow_batch), f"batch {flow_batch}"
    else:
        sample_from = "the sample figure's best"
    efficiency = render_ips / sample_ips
    busy = busy_seconds / render_seconds
    target = targets(plan)["storyboard"]
    checks = [target["seconds_max"] is None or seconds <= target["seconds_max"]]
    checks += [efficiency >= target.get("flow_efficiency_min", 0), busy >= target.get("gpu_busy_fraction_min", 0)]
    models._WARM.clear()
    return {
        "figure": "storyboard",
        "seconds": round(seconds, 3),
        "keyframes": result["keyframes"],
        "scenes": plan.story_scenes,
        "seeds": plan.story_seeds,
        "gammas": len(plan.story_gammas),
        "steps": plan.sample_steps,
        "resolution": plan.resolution,
        "finetune_steps": plan.finetune_steps,
        "model_load_seconds": round(load, 3),
        "flow_seconds": round(flow_seconds, 3),
        "prefect_startup_seconds": round(prefect_start, 3),
        "model_prewarmed": prewarmed,
        "flow_timings": manifest.get("timings"),
        "keyframes_per_second": round(result["keyframes"] / seconds, 3),
        "render_images_per_second": round(render_ips, 3),
        "sample_images_per_second": round(sample_ips, 3),
        "sample_reference": sample_from,
        "flow_efficiency": round(efficiency, 3),
        "gpu_busy_fraction": round(busy, 3),
        "gpu_busy_clock": "cuda events" if clock.cuda else "wall clock (no GPU: the sampler's share of render time)",
        "sampling_calls": clock.calls,
        "flow_batch": flow_batch,
        "target": target,
        "meets_target": verdict(plan, device, checks),
    }


# --- main ---------------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="the tiny model on CPU with small counts (CI smoke run)")
    ap.add_argument(
        "--arch", choices=["sd15", "sdxl"], default="sd15", help="UNet architecture (with --tiny: tiny or tiny-sdxl)"
    )
    ap.add_argument(
        "--only",
        default=",".join(DEFAULT_FIGURES),
        help=f"comma-separated figures: {', '.join(FIGURES)} (sample brings batch1 and flops along; --compile brings"
        " compile along with sample; default: all but compile)",
    )
    ap.add_argument("--device", default=None, help="default: cuda, or cpu with --tiny")
    ap.add_argument(
        "--compile", action="store_true", help="regional compilation of the UNet (fastimagic.models.compile_unet)"
    )
    ap.add_argument(
        "--compile-mode",
        default="default",
        choices=("default", "max-autotune-no-cudagraphs"),
        help="torch.compile mode (max-autotune takes minutes to compile)",
    )
    ap.add_argument(
        "--compile-backend", default="inductor", help="torch.compile backend (eager: dynamo only, a quick CPU check)"
    )
    ap.add_argument("--channels-last", action="store_true", help="channels_last VAE (the UNet already is, on CUDA)")
    ap.add_argument("--cudnn-benchmark", action="store_true", help="torch.backends.cudnn.benchmark = True")
    ap.add_argument(
        "--no-cudnn-sdpa", action="store_true", help="attention off cuDNN: torch.backends.cuda.enable_cudnn_sdp(False)"
    )
    ap.add_argument(
        "--precision", default="auto", help="fastimagic.precision name for the SD figures: auto, fp32, tf32, fp16, bf16"
    )
    ap.add_argument("--batches", default=None, help="sampling batch sizes to sweep, e.g. 1,4,8,16,32")
    ap.add_argument("--keep", default=None, help="keep the storyboard's work folder (model, keyframes) here")
    args = ap.parse_args(argv)
    args.figures = [f.strip() for f in args.only.split(",") if f.strip()]
    unknown = [f for f in args.figures if f not in FIGURES]
    if unknown:
        ap.error(f"--only: unknown figure {', '.join(unknown)}; choose from {', '.join(FIGURES)}")
    args.switches = [s for s in SWITCHES if getattr(args, s)]
    wanted = set(args.figures) | {r for f in args.figures for r in RIDERS.get(f, ())}
    if "compile" in args.switches and "sample" in wanted:
        wanted.add("compile")
    args.figures = [f for f in FIGURES if f in wanted]
    args.device = args.device or ("cpu" if args.tiny else "cuda")
    if "channels_last" in args.switches and not args.device.startswith("cuda"):
        ap.error("--channels-last is for CUDA: on CPU, torch 2.13 crashes in GroupNorm's channels_last backward")
    return args


class Figures:
    """Runs each figure once and prints its record. A figure that raises prints an error record instead (its name,
    the exception, where it was raised) and the figures after it still run, so one failure on a rented GPU costs
    that figure, not the rest of the run; ``failed`` names the figures that raised (the exit status is then 1)."""

    def __init__(self, device) -> None:
        self.device, self.failed = device, []

    def run(self, name: str, fn, *, show: bool = True, label: str | None = None):
        note(label or name)
        try:
            record = fn()
            if show:
                emit(record)
            return record
        except Exception as e:
            frames = traceback.extract_tb(e.__traceback__)[-3:]
            emit({"figure": name, "error": f"{type(e).__name__}: {e}"[:2000],
                  "where": [f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in frames]})
            print(traceback.format_exc(), file=sys.stderr, flush=True)
            self.failed.append(name)
        free(self.device)  # out of the except block: the failed figure's frames, and the tensors they held, are gone
        return None

    def skip(self, names: list[str], why: str) -> None:
        for name in names:
            emit({"figure": name, "skipped": why})


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    plan = PLANS[(args.arch, args.tiny)]
    if args.batches:
        plan = replace(plan, sample_batches=tuple(int(b) for b in args.batches.split(",")))
    if args.device == "cpu":
        # The storyboard flow picks its device itself: hide any GPU so that it, too, runs on the CPU.
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    work = Path(args.keep).resolve() if args.keep else Path(tempfile.mkdtemp(prefix="fastimagic-gpu-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    prefect_env(work / "prefect")

    import torch

    from fastimagic.images import load_reference

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("gpu.py: no CUDA device here; run `python benchmarks/gpu.py --tiny` on CPU", file=sys.stderr)
        return 2
    device = torch.device(args.device)
    figures = Figures(device)
    figures.run("device", lambda: figure_device(plan, device, args.switches, args.precision))
    image = load_reference(reference_png(plan.resolution), "reference.png")
    sample_ips = None  # the sample figure's best images/s, the storyboard's flow_efficiency reference
    try:
        if "equivalence" in args.figures:
            figures.run("equivalence", lambda: figure_equivalence(device, args.switches, args.compile_mode, image))
        wanted = [f for f in ("finetune", "compile", "sample", "batch1", "flops", "forget_switch", "profile")
                  if f in args.figures]

        def build():
            model = assemble(plan.model, args.device, precision=args.precision)
            apply_switches(model, args.switches, args.compile_mode, args.compile_backend)
            return model

        model = None
        if wanted:
            model = figures.run("model", build, show=False, label=f"building the {plan.model} model on {device}")
            if model is None:
                figures.skip(wanted, "the model could not be built (see the model record)")
        if model is not None:
            tuning = None
            records: dict[str, dict] = {}
            if "finetune" in args.figures:
                finetuned = figures.run("finetune", lambda: figure_finetune(model, image, plan), show=False)
                if finetuned is not None:
                    records["finetune"], tuning = finetuned
                    emit(records["finetune"])
            if tuning is None:  # the other figures need some tuning to apply: a 1-step one will do
                from fastimagic.finetuning import FinetuneConfig, finetune

                config = FinetuneConfig(steps=1, min_steps=1, batch_size=plan.finetune_batch)
                tuning = figures.run("tuning", lambda: finetune(
                    model, image, SOURCE_PROMPT, config, width=plan.resolution, height=plan.resolution),
                    show=False, label="a 1-step tuning for the figures after it")
            # compile first: its cold pass must find nothing compiled, and what it compiles serves the figures after
            for name, run in (
                ("compile", lambda: figure_compile(model, tuning, plan, work, args.compile_backend)),
                ("sample", lambda: figure_sample(model, tuning, plan)),
                ("batch1", lambda: figure_batch1(model, tuning, plan)),
                ("flops", lambda: figure_flops(model, image, plan, records)),
                ("forget_switch", lambda: figure_forget_switch(model, tuning, plan)),
                # last: a run cut short by its time limit loses this figure only
                ("profile", lambda: figure_profile(model, tuning, image, plan, records)),
            ):
                if name not in args.figures:
                    continue
                if tuning is None and name != "flops":
                    figures.skip([name], "needs a tuning, and none could be made (see the tuning record)")
                    continue
                record = figures.run(name, run)
                if record is not None:
                    records[name] = record
            if "sample" in records:
                sample_ips = records["sample"]["images_per_second"]
            del model, tuning
            free(device)
        if "storyboard" in args.figures:
            figures.run("storyboard", lambda: figure_storyboard(
                plan, device, args.switches, args.compile_mode, work, sample_ips))
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    if figures.failed:
        print(f"gpu.py: figures that failed: {', '.join(figures.failed)} (their records say why)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
