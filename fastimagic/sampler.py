"""Sampling: DDIM with classifier-free guidance from merged embeddings, many keyframes per UNet batch.

Each keyframe's starting noise is drawn from its own seed on a CPU generator, and DDIM (eta = 0) is
deterministic, so a keyframe depends only on its seed and settings, never on what it was batched with.
"""

from __future__ import annotations

import torch

from fastimagic import images
from fastimagic.models import Components

# Rough activation memory per latent pixel for one guided image (two UNet passes) of an SD 1.x UNet under bf16
# autocast with SDPA attention, plus headroom. Used only to pick a batch size when none is given.
_BYTES_PER_LATENT_PIXEL = 160_000
VAE_DECODE_BATCH = 4


def auto_batch_size(model: Components, width: int, height: int, cap: int = 32) -> int:
    """How many images to push through the UNet at once: from free GPU memory on CUDA, else 8."""
    if model.device.type != "cuda":
        return 8
    free, _ = torch.cuda.mem_get_info(model.device)
    per_image = (width // 8) * (height // 8) * _BYTES_PER_LATENT_PIXEL  # ~0.65 GB at 512x512
    return max(1, min(cap, int(free * 0.8) // max(per_image, 1)))


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
    Rows are processed in chunks of ``max_batch`` (default :func:`auto_batch_size`). The UNet predicts what the
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
    for start in range(0, len(seeds), batch):
        cond = embeddings[start : start + batch].to(model.device)
        n = cond.shape[0]
        latents = torch.cat([initial_latents(s, width, height, channels) for s in seeds[start : start + n]])
        latents = latents.to(model.device) * scheduler.init_noise_sigma
        context = torch.cat([unconditional.to(model.device).expand(n, -1, -1), cond]) if guided else cond
        scheduler.set_timesteps(steps, device=model.device)
        for t in scheduler.timesteps:
            x = torch.cat([latents, latents]) if guided else latents
            x = scheduler.scale_model_input(x, t)
            with model.autocast():
                pred = model.unet(x, t, **model.unet_inputs(context, time_ids)).sample.float()
            if guided:
                uncond, text = pred.chunk(2)
                pred = uncond + guidance * (text - uncond)
            latents = scheduler.step(pred, t, latents).prev_sample
        # The VAE decoder's activations at full resolution dwarf the UNet's: decode a few images at a time.
        for part in (latents / model.latent_scale).to(model.vae.dtype).split(VAE_DECODE_BATCH):
            out.append(model.vae.decode(part).sample.float().cpu())
    return torch.cat(out)
