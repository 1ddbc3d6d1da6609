"""Joint vision-language fine-tuning (paper §3.2): the source embedding and part of the UNet, together, once.

The source text embedding e_src (the CLIP embedding of the source prompt; on SDXL both encoders' per-token states
and the pooled vector, packed as :mod:`fastimagic.families` describes) becomes a parameter and is optimised
jointly with the UNet's shallow blocks on the one reference image: a batch is the image latent repeated with
independent noise and timesteps, the loss is the MSE to what the model predicts (noise, or velocity for SD 2.0/2.1
768 px: the scheduler's ``prediction_type``). Different learning rates bridge the gap between text and image
(1e-3 for e_src, 6e-5 for the UNet). The mid block and the deepest decoder block stay frozen because training them
overfits; which other blocks train is a preset of the model's family (``reference``, the released
implementation's, by default; see :mod:`fastimagic.families`). About 40 steps; the result is a
:class:`~fastimagic.tuning.Tuning`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace

import torch
import torch.nn.functional as F
from PIL import Image

from fastimagic import images
from fastimagic.config import BLOCK_PRESETS  # noqa: F401  (SD 1.x's presets, as callers import them from here)
from fastimagic.errors import FinetuneError, InputError
from fastimagic.families import SD1, Family, all_presets
from fastimagic.models import Components, copy_to_host
from fastimagic.precision import float32_working, put_back, resolve_precision
from fastimagic.tuning import Tuning, content_key

# The released code calls accelerate's ``backward`` with ``mixed_precision="fp16"`` on an optimiser accelerate never
# wraps: the loss is multiplied by the GradScaler's initial scale, 2**16, and never divided back. Adam is blind to a
# constant gradient scale except through its eps, so that run is exactly Adam with eps = 1e-8 / 2**16 on the true
# gradients. That is the default here, in every precision (the fp16 path unscales before Adam sees the gradients).
RELEASED_ADAM_EPS = 1e-8 / 2**16


@dataclass(frozen=True)
class FinetuneConfig:
    """Fine-tune settings; the defaults reproduce the released implementation, which made the published numbers.

    steps: at most this many optimiser steps (released: 400 samples // batch 10). batch_size: copies of the image
    latent per step. min_steps / loss_threshold: once ``min_steps`` updates are done, a step whose loss is below
    ``loss_threshold`` ends the fine-tune before its update (released: ``i * 10 > 350`` counting from 0, so at
    least 36 updates). text_lr / unet_lr: Adam learning rates for e_src and the UNet. adam_eps: Adam's epsilon (see
    :data:`RELEASED_ADAM_EPS`; 1e-8 is torch's default). trained_blocks: a preset name of :data:`BLOCK_PRESETS`
    (``reference``, ``paper``) or block names. seed: noise, timesteps and the VAE latent sample.
    gradient_checkpointing: trade compute for memory. precision: one of
    :data:`~fastimagic.precision.PRECISIONS`; ``auto`` is the precision the model was loaded with (and for a key
    computed before loading, ``auto`` resolved for the device). fit: how the reference is fitted to the resolution,
    one of :data:`~fastimagic.images.FIT_MODES`.
    """

    steps: int = 40
    batch_size: int = 10
    min_steps: int = 36
    loss_threshold: float = 0.03
    text_lr: float = 1e-3
    unet_lr: float = 6e-5
    trained_blocks: str | tuple[str, ...] = "reference"
    seed: int = 0
    gradient_checkpointing: bool = False
    adam_eps: float = RELEASED_ADAM_EPS
    precision: str = "auto"
    fit: str = "crop"

    def blocks(self, family: Family = SD1) -> tuple[str, ...]:
        """The UNet blocks trained on a model of ``family``: the preset's, or the names given (checked against the
        family's levels)."""
        if isinstance(self.trained_blocks, str):
            if self.trained_blocks not in family.presets:
                raise InputError(
                    f"trained_blocks: unknown preset '{self.trained_blocks}'; allowed: {', '.join(all_presets())}"
                    " or a list of block names such as down_blocks.0"
                )
            return family.presets[self.trained_blocks]
        for block in self.trained_blocks:
            problem = family.block_problem(block)
            if problem:
                raise InputError(f"trained_blocks: {problem}")
        return tuple(self.trained_blocks)

    def as_dict(self, device: str | torch.device | None = None, family: Family = SD1) -> dict:
        """The settings recorded in a tuning and hashed into its content key (no model needed).

        ``precision`` is resolved for ``device`` (default: the device :func:`~fastimagic.models.load_base_model`
        picks), so ``auto`` becomes e.g. ``fp16`` on CUDA and ``fp32`` on CPU, as the loaded model's would.
        """
        from fastimagic.models import default_device

        if self.fit not in images.FIT_MODES:
            raise InputError(f"fit: unknown mode {self.fit!r}; allowed: {', '.join(images.FIT_MODES)}")
        d = asdict(self)
        d["trained_blocks"] = list(self.blocks(family))
        d["precision"] = resolve_precision(self.precision, device or default_device()).name
        return d


def trained_parameter_names(unet: torch.nn.Module, blocks: tuple[str, ...]) -> list[str]:
    """UNet parameter names inside ``blocks`` (e.g. ``down_blocks.0``); raises if a block does not exist."""
    names = [n for n, _ in unet.named_parameters()]
    for b in blocks:
        if not any(n.startswith(b + ".") for n in names):
            raise InputError(f"trained_blocks: the UNet has no block '{b}' (or it has no weights)")
    return [n for n in names if n.startswith(tuple(b + "." for b in blocks))]


@torch.no_grad()
def encode_image(
    model: Components, image: Image.Image, width: int, height: int, generator: torch.Generator, fit: str = "crop"
):
    """The scaled VAE latent ``[1, 4, H/8, W/8]`` of ``image`` fitted (``fit`` mode) to ``width`` x ``height``."""
    x = images.to_tensor(images.fit(image, width, height, mode=fit)).to(model.device, model.vae.dtype)
    dist = model.vae.encode(x).latent_dist
    eps = torch.randn(dist.mean.shape, generator=generator).to(model.device, dist.mean.dtype)
    return ((dist.mean + dist.std * eps) * model.latent_scale).float()


def _draws(
    gen: torch.Generator, config: FinetuneConfig, shape: torch.Size, num_train_timesteps: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Every step's noise ``[steps, batch, C, h, w]`` and timesteps ``[steps, batch]``, drawn on the CPU in the
    order the steps draw them (noise, then timesteps, step by step) and sent to ``device`` in one copy each, not
    two host-to-device copies (each a wait) per step."""
    noises, timesteps = [], []
    for _ in range(config.steps):
        noises.append(torch.randn((config.batch_size, *shape[1:]), generator=gen))
        timesteps.append(torch.randint(0, num_train_timesteps, (config.batch_size,), generator=gen))
    noise, ts = torch.stack(noises), torch.stack(timesteps)
    if device.type == "cuda":
        noise, ts = noise.pin_memory(), ts.pin_memory()
    return noise.to(device, non_blocking=True), ts.to(device, non_blocking=True)


def finetune_time_ids(image_size: tuple[int, int], width: int, height: int, fit: str = "crop") -> torch.Tensor:
    """SDXL's size conditioning for the reference: its original (h, w), the top-left corner of the crop ``fit``
    cuts (in output pixels; 0, 0 for ``pad`` and ``resize``) and the target (h, w), as SDXL was trained."""
    top = left = 0
    info = images.describe_fit(image_size, width, height, fit)
    if "crop_box" in info:
        x0, y0, x1, _ = info["crop_box"]
        scale = width / (x1 - x0)
        top, left = round(y0 * scale), round(x0 * scale)
    return Family.time_ids((image_size[1], image_size[0]), (top, left), (height, width))


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
    fit: str | None = None,
) -> Tuning:
    """Fine-tune e_src and the chosen UNet blocks on ``image``; return the :class:`Tuning`.

    The model's UNet is left exactly as it was (its trained tensors train as float32 copies and the stored ones are
    put back afterwards): the learned state
    lives only in the returned Tuning, which is applied to a model for rendering. ``callback(step, max_steps,
    loss)`` is called after every step (progress bars). ``image_sha256`` is the hash of the reference file's bytes,
    part of the content key. ``fit`` (default ``config.fit``, ``crop``) is how the reference is fitted to
    ``width`` x ``height`` (:func:`fastimagic.images.fit`); it is part of the content key, as is the precision
    (the model's; ``config.precision`` other than ``auto`` must agree with it). In fp16 the loss is scaled
    (``torch.amp.GradScaler``) so that gradients of ~1e-6 survive; a step whose scaled gradients overflow is
    skipped, as GradScaler does. Raises :class:`FinetuneError` if the loss stops being finite.
    """
    images.check_size(width, height)
    if config.steps < 1 or config.batch_size < 1:
        raise InputError("finetune: steps and batch_size must be at least 1")
    if fit is not None:
        config = replace(config, fit=fit)
    precision = model.precision
    if config.precision != "auto" and resolve_precision(config.precision, model.device).name != precision.name:
        raise InputError(
            f"finetune: precision {config.precision} asked for, but the model was loaded in {precision.name};"
            f" load it with precision={config.precision!r}"
        )
    family = model.family
    settings = config.as_dict(model.device, family) | {"precision": precision.name}
    started = time.perf_counter()
    unet = model.unet
    names = trained_parameter_names(unet, config.blocks(family))
    params = dict(unet.named_parameters())
    # The trained tensors train as float32 copies (a half-precision weight cannot hold a change of ~4e-4); the
    # stored base tensors are put back at the end. Adam keeps state for these tensors only.
    originals = float32_working(params, names)
    # The stored base tensors are not read until the end: on a GPU they wait in host memory (SD 1.5 `reference` in
    # fp16: 1.2 GB less at the fine-tune's peak), copied without waiting, and come back bit for bit.
    parked = model.device.type == "cuda"
    if parked:
        originals = {n: t.to("cpu", non_blocking=True) for n, t in originals.items()}
    trained = [params[n] for n in names]

    gen = torch.Generator().manual_seed(config.seed)  # CPU generator: the same draws on every device
    latent = encode_image(model, image, width, height, gen, config.fit)
    # SDXL: the pooled vector is a row of this one tensor, so it is optimised jointly at the text learning rate.
    source_embedding = torch.nn.Parameter(model.encode_prompts([source_prompt]).clone())
    time_ids = finetune_time_ids(image.size, width, height, config.fit) if family.pooled else None
    velocity = model.prediction_type == "v_prediction"

    fused = model.device.type == "cuda"
    optimizer = torch.optim.Adam(
        [
            {"params": trained, "lr": config.unet_lr},
            {"params": [source_embedding], "lr": config.text_lr},
        ],
        eps=config.adam_eps,
        fused=fused,
    )
    # float16 gradients below ~6e-8 flush to zero; the learned changes are made of gradients near 1e-6 and smaller.
    scaler = torch.amp.GradScaler(model.device.type, enabled=precision.grad_scaler)
    checkpointing = config.gradient_checkpointing or 0 < family.checkpointing_from <= width * height
    if checkpointing:
        unet.enable_gradient_checkpointing()
    for p in trained:
        p.requires_grad_(True)
    unet.train()
    losses: list[float] = []
    noises, timesteps = _draws(gen, config, latent.shape, model.scheduler.config.num_train_timesteps, model.device)
    # The loss is read back to the host (which waits for the GPU) only where early stopping needs it at once:
    # before that, each step's loss is copied without waiting and read one step later, when the next step is
    # already queued. The losses, the callback's calls and the updates are the same; only the reading is later.
    pending: list[tuple[int, torch.Tensor, object]] = []

    def settle(keep: int = 0) -> None:
        while len(pending) > keep:
            step, host, done = pending.pop(0)
            if done is not None:
                done.synchronize()
            record(step, float(host))

    def record(step: int, value: float) -> None:
        if not math.isfinite(value):
            raise FinetuneError(
                f"fine-tuning loss became {value} at step {step}; try a lower unet_lr/text_lr or float32"
            )
        losses.append(value)
        if callback is not None:
            callback(step, config.steps, value)

    try:
        with model.eager():  # a UNet compiled for sampling trains uncompiled
            for step in range(1, config.steps + 1):
                latents = latent.expand(config.batch_size, -1, -1, -1)
                noise, t = noises[step - 1], timesteps[step - 1]
                noisy = model.scheduler.add_noise(latents, noise, t)
                cond = model.unet_inputs(source_embedding.expand(config.batch_size, -1, -1), time_ids)
                with model.autocast():
                    pred = unet(noisy, t, **cond).sample
                target = model.scheduler.get_velocity(latents, noise, t) if velocity else noise
                loss = F.mse_loss(pred.float(), target)
                if step > config.min_steps:
                    settle()
                    value = float(loss.detach())
                    record(step, value)
                    if value < config.loss_threshold:
                        break  # converged: this step's loss is recorded, no further update (as the released code)
                else:
                    pending.append((step, *copy_to_host(loss.detach())))
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
                settle(keep=1)  # the previous step's loss: computed before this step's kernels, which are queued
            settle()
    finally:
        unet.eval()
        for p in trained:
            p.requires_grad_(False)
        if checkpointing:
            unet.disable_gradient_checkpointing()
        del optimizer
        with torch.no_grad():
            # Keep only what was learned, as half-precision differences from the base weights (compact to store
            # and send to render workers), then put the base weights back.
            if parked:
                originals = {n: t.to(model.device, non_blocking=True) for n, t in originals.items()}
            deltas = {n: (params[n] - originals[n].float()).to(torch.float16).cpu() for n in names}
            put_back(params, originals)
        del originals

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
        family=family.name,
        losses=losses,
        seconds=time.perf_counter() - started,
    )
