"""Joint vision-language fine-tuning (paper §3.2): the source embedding and part of the UNet, together, once.

The source text embedding e_src (the CLIP embedding of the source prompt) becomes a parameter and is optimised
jointly with the UNet's shallow blocks on the one reference image: a batch is the image latent repeated with
independent noise and timesteps, the loss is the usual noise-prediction MSE. Different learning rates bridge the
gap between text and image (1e-3 for e_src, 6e-5 for the UNet). The deepest blocks and the mid block stay frozen
because training them overfits. About 40 steps; the result is a :class:`~fastimagic.tuning.Tuning`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from PIL import Image

from fastimagic import images
from fastimagic.errors import FinetuneError, InputError
from fastimagic.models import Components
from fastimagic.tuning import Tuning, content_key

# Which UNet blocks are trained. "paper": encoder blocks 0-2 and decoder blocks 1-3 (§3.2).
# "reference": what the reference implementation trains, encoder blocks 1-3 and decoder blocks 1-3.
BLOCK_PRESETS: dict[str, tuple[str, ...]] = {
    "paper": ("down_blocks.0", "down_blocks.1", "down_blocks.2", "up_blocks.1", "up_blocks.2", "up_blocks.3"),
    "reference": ("down_blocks.1", "down_blocks.2", "down_blocks.3", "up_blocks.1", "up_blocks.2", "up_blocks.3"),
}


@dataclass(frozen=True)
class FinetuneConfig:
    """Fine-tune settings; the defaults are the paper's.

    steps: at most this many optimiser steps. batch_size: copies of the image latent per step.
    min_steps / loss_threshold: stop early after ``min_steps`` once the loss is below ``loss_threshold``.
    text_lr / unet_lr: Adam learning rates for e_src and the UNet. trained_blocks: a preset name or block names.
    seed: noise, timesteps and the VAE latent sample. gradient_checkpointing: trade compute for memory.
    """

    steps: int = 40
    batch_size: int = 10
    min_steps: int = 35
    loss_threshold: float = 0.03
    text_lr: float = 1e-3
    unet_lr: float = 6e-5
    trained_blocks: str | tuple[str, ...] = "paper"
    seed: int = 0
    gradient_checkpointing: bool = False

    def blocks(self) -> tuple[str, ...]:
        if isinstance(self.trained_blocks, str):
            if self.trained_blocks not in BLOCK_PRESETS:
                raise InputError(
                    f"trained_blocks: unknown preset '{self.trained_blocks}'; allowed: {', '.join(BLOCK_PRESETS)}"
                    " or a list of block names such as down_blocks.0"
                )
            return BLOCK_PRESETS[self.trained_blocks]
        return tuple(self.trained_blocks)

    def as_dict(self) -> dict:
        d = asdict(self)
        d["trained_blocks"] = list(self.blocks())
        return d


def trained_parameter_names(unet: torch.nn.Module, blocks: tuple[str, ...]) -> list[str]:
    """UNet parameter names inside ``blocks`` (e.g. ``down_blocks.0``); raises if a block does not exist."""
    names = [n for n, _ in unet.named_parameters()]
    for b in blocks:
        if not any(n.startswith(b + ".") for n in names):
            raise InputError(f"trained_blocks: the UNet has no block '{b}'")
    return [n for n in names if n.startswith(tuple(b + "." for b in blocks))]


@torch.no_grad()
def encode_image(model: Components, image: Image.Image, width: int, height: int, generator: torch.Generator):
    """The scaled VAE latent ``[1, 4, H/8, W/8]`` of ``image`` fitted to ``width`` x ``height``."""
    x = images.to_tensor(images.fit(image, width, height)).to(model.device, model.dtype)
    dist = model.vae.encode(x).latent_dist
    eps = torch.randn(dist.mean.shape, generator=generator).to(model.device, dist.mean.dtype)
    return ((dist.mean + dist.std * eps) * model.latent_scale).float()


def finetune(
    model: Components,
    image: Image.Image,
    source_prompt: str,
    config: FinetuneConfig = FinetuneConfig(),
    *,
    width: int = 512,
    height: int = 512,
    image_sha256: str = "",
    callback: Callable[[int, int, float], None] | None = None,
) -> Tuning:
    """Fine-tune e_src and the chosen UNet blocks on ``image``; return the :class:`Tuning`.

    The model's UNet is left exactly as it was (its trained tensors are put back afterwards): the learned state
    lives only in the returned Tuning, which is applied to a model for rendering. ``callback(step, max_steps,
    loss)`` is called after every step (progress bars). ``image_sha256`` is the hash of the reference file's bytes,
    part of the content key. Raises :class:`FinetuneError` if the loss stops being finite.
    """
    images.check_size(width, height)
    if config.steps < 1 or config.batch_size < 1:
        raise InputError("finetune: steps and batch_size must be at least 1")
    started = time.perf_counter()
    unet = model.unet
    names = trained_parameter_names(unet, config.blocks())
    params = dict(unet.named_parameters())
    trained = [params[n] for n in names]
    originals = {n: params[n].detach().clone() for n in names}

    gen = torch.Generator().manual_seed(config.seed)  # CPU generator: the same draws on every device
    latent = encode_image(model, image, width, height, gen)
    source_embedding = torch.nn.Parameter(model.encode_prompts([source_prompt]).clone())

    fused = model.device.type == "cuda"
    optimizer = torch.optim.Adam(
        [
            {"params": trained, "lr": config.unet_lr},
            {"params": [source_embedding], "lr": config.text_lr},
        ],
        fused=fused,
    )
    if config.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    for p in trained:
        p.requires_grad_(True)
    unet.train()
    losses: list[float] = []
    num_train_timesteps = model.scheduler.config.num_train_timesteps
    try:
        for step in range(1, config.steps + 1):
            latents = latent.expand(config.batch_size, -1, -1, -1)
            noise = torch.randn(latents.shape, generator=gen).to(model.device)
            timesteps = torch.randint(0, num_train_timesteps, (config.batch_size,), generator=gen).to(model.device)
            noisy = model.scheduler.add_noise(latents, noise, timesteps)
            with model.autocast():
                pred = unet(noisy, timesteps, source_embedding.expand(config.batch_size, -1, -1)).sample
            loss = F.mse_loss(pred.float(), noise)
            value = float(loss.detach())
            if not math.isfinite(value):
                raise FinetuneError(
                    f"fine-tuning loss became {value} at step {step}; try a lower unet_lr/text_lr or float32"
                )
            losses.append(value)
            if callback is not None:
                callback(step, config.steps, value)
            if step > config.min_steps and value < config.loss_threshold:
                break  # converged: this step's loss is recorded, no further update
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    finally:
        unet.eval()
        for p in trained:
            p.requires_grad_(False)
        if config.gradient_checkpointing:
            unet.disable_gradient_checkpointing()
        del optimizer
        with torch.no_grad():
            # Keep only what was learned, as half-precision differences from the base weights (compact to store
            # and send to render workers), then put the base weights back.
            deltas = {n: (params[n] - originals[n]).to(torch.float16).cpu() for n in names}
            for n in names:
                params[n].copy_(originals[n])
        del originals

    settings = config.as_dict()
    key = content_key(
        image_sha256=image_sha256,
        model_identity=model.identity,
        source_prompt=source_prompt,
        finetune=settings,
        width=width,
        height=height,
    )
    return Tuning(
        key=key,
        source_prompt=source_prompt,
        source_embedding=source_embedding.detach().float().cpu(),
        deltas=deltas,
        model_identity=model.identity,
        finetune=settings,
        width=width,
        height=height,
        image_sha256=image_sha256,
        losses=losses,
        seconds=time.perf_counter() - started,
    )
