"""Sampling: DDIM with classifier-free guidance from merged embeddings, many keyframes per UNet batch.

Each keyframe's starting noise is drawn from its own seed on a CPU generator, and DDIM (eta = 0) is
deterministic, so a keyframe depends only on its seed and settings, never on what it was batched with.
"""

from __future__ import annotations

import torch

from fastimagic import images
from fastimagic.models import BATCH_BUCKETS, Components, copy_to_host

# Rough activation memory per latent pixel for one guided image (two UNet passes) of an SD 1.x UNet under bf16
# autocast with SDPA attention, plus headroom. Used only to pick a batch size when none is given.
_BYTES_PER_LATENT_PIXEL = 160_000
# The VAE decoder's peak per output pixel: its last level runs 128 channels at full resolution, a few such
# activations live at once (~6 x 128 x 2 B in fp16), doubled for float32 and headroom. 512 px: ~0.8 GB an image.
_VAE_BYTES_PER_PIXEL = 3_072
# Without a GPU to size it from: this many 512 x 512 images per decode call (fewer at larger sizes).
VAE_DECODE_BATCH = 4


def auto_batch_size(model: Components, width: int, height: int, cap: int = 32) -> int:
    """How many images to push through the UNet at once: from free GPU memory on CUDA, else 8."""
    if model.device.type != "cuda":
        return 8
    free, _ = torch.cuda.mem_get_info(model.device)
    per_image = (width // 8) * (height // 8) * _BYTES_PER_LATENT_PIXEL  # ~0.65 GB at 512x512
    return max(1, min(cap, int(free * 0.8) // max(per_image, 1)))


def decode_batch(model: Components, width: int, height: int, cap: int = 16) -> int:
    """How many images the VAE decodes per call at ``width`` x ``height``: on CUDA what half the free memory
    holds (at most ``cap``), elsewhere :data:`VAE_DECODE_BATCH`, fewer above 512 x 512 pixels (1 at 1024 x 1024).
    The decoder's full-resolution activations dwarf the UNet's, so a large UNet batch is decoded in parts."""
    pixels = width * height
    if model.device.type != "cuda":
        return max(1, min(VAE_DECODE_BATCH, VAE_DECODE_BATCH * 512 * 512 // pixels))
    free, _ = torch.cuda.mem_get_info(model.device)
    per_image = pixels * _VAE_BYTES_PER_PIXEL * (2 if model.vae.dtype == torch.float32 else 1)
    return max(1, min(cap, int(free * 0.5) // per_image))


@torch.no_grad()
def decode(model: Components, latents: torch.Tensor) -> list[torch.Tensor]:
    """Decode ``latents`` ``[n, C, h, w]`` to float32 pixels on the CPU in parts of :func:`decode_batch` images;
    the device-to-host copies go through pinned memory without waiting, and are waited for once at the end."""
    height, width = latents.shape[-2] * 8, latents.shape[-1] * 8
    parts, done = [], None
    for part in (latents / model.latent_scale).to(model.vae.dtype).split(decode_batch(model, width, height)):
        host, done = copy_to_host(model.vae.decode(part).sample.float())
        parts.append(host)
    if done is not None:
        done.synchronize()  # the last part's copy, and with it every earlier one
    return parts


def chunks(count: int, batch: int, bucketed: bool = False) -> list[tuple[int, int, int]]:
    """How :func:`sample` splits ``count`` images into UNet batches of at most ``batch``: ``(start, size,
    padded size)`` each. ``bucketed`` (a compiled UNet): every padded size is one of
    :data:`~fastimagic.models.BATCH_BUCKETS`, so a storyboard meets a handful of shapes however its scenes are
    sized: full chunks of the largest bucket up to ``batch``, and the rest padded up to the next bucket."""
    if not bucketed:
        return [(s, min(batch, count - s), min(batch, count - s)) for s in range(0, count, batch)]
    top = max([b for b in BATCH_BUCKETS if b <= batch] or [1])
    out = []
    for start in range(0, count, top):
        size = min(top, count - start)
        out.append((start, size, min(b for b in BATCH_BUCKETS if b >= size)))
    return out


def initial_latents(seed: int, width: int, height: int, channels: int = 4) -> torch.Tensor:
    """The starting noise of one keyframe, ``[1, C, H/8, W/8]``, from its seed alone (CPU generator)."""
    g = torch.Generator().manual_seed(int(seed))
    return torch.randn((1, channels, height // 8, width // 8), generator=g)


@torch.no_grad()
def sample(
    model: Components,
    embeddings: torch.Tensor,
    seeds: list[int],
    *,
    width: int,
    height: int,
    guidance: float = 7.5,
    steps: int = 50,
    unconditional: torch.Tensor | None = None,
    max_batch: int | None = None,
) -> torch.Tensor:
    """Render one image per row of ``embeddings`` ``[K, 77, C]`` with the matching seed; returns ``[K, 3, H, W]``.

    ``unconditional`` is the embedding of the empty (or negative) prompt ``[1, 77, C]``; guidance > 1 needs it.
    Rows are processed in chunks of ``max_batch`` (default :func:`auto_batch_size`; a compiled UNet gets them
    padded to a bucket size, see :func:`chunks`). The UNet predicts what the
    model's scheduler says (noise or velocity); SDXL embeddings carry their pooled row (``[K, 78, C]``) and are
    conditioned on the target size (original = target = ``height`` x ``width``, no crop).
    """
    images.check_size(width, height)
    if len(seeds) != embeddings.shape[0]:
        raise ValueError("one seed per embedding")
    guided = guidance > 1.0
    if guided and unconditional is None:
        unconditional = model.encode_prompts([""])
    batch = max_batch or auto_batch_size(model, width, height)
    scheduler = model.scheduler
    channels = model.unet.config.in_channels
    time_ids = model.family.time_ids((height, width), (0, 0), (height, width)) if model.family.pooled else None
    out = []
    for start, n, padded in chunks(len(seeds), batch, model.compiled != "off"):
        cond = embeddings[start : start + n].to(model.device)
        latents = torch.cat([initial_latents(s, width, height, channels) for s in seeds[start : start + n]])
        real = n
        if padded > n:  # a compiled UNet sees bucketed batch sizes only: repeat the last row, decode none of it
            cond = torch.cat([cond, cond[-1:].expand(padded - n, -1, -1)])
            latents = torch.cat([latents, latents[-1:].expand(padded - n, -1, -1, -1)])
            n = padded
        latents = latents.to(model.device) * scheduler.init_noise_sigma
        context = torch.cat([unconditional.to(model.device).expand(n, -1, -1), cond]) if guided else cond
        # The UNet takes each timestep as a device tensor, the DDIM step as a Python int: indexing the scheduler's
        # tables with a device tensor, and its `prev_timestep >= 0`, would wait for the GPU every step. The step is
        # diffusers' own, so its arithmetic (float32, on the whole batch) is unchanged. Nothing in the loop below
        # reads a device value back or copies from the host (tests/test_gpu_proxies.py counts).
        scheduler.set_timesteps(steps)
        timesteps = scheduler.timesteps.to(model.device)
        inputs = model.unet_inputs(context, time_ids)
        for t, step in zip(timesteps, scheduler.timesteps.tolist()):
            x = torch.cat([latents, latents]) if guided else latents
            x = scheduler.scale_model_input(x, t)
            with model.autocast():
                pred = model.unet(x, t, **inputs).sample.float()
            if guided:
                uncond, text = pred.chunk(2)
                pred = uncond + guidance * (text - uncond)
            latents = scheduler.step(pred, step, latents).prev_sample
        out += decode(model, latents[:real])
    return torch.cat(out)
