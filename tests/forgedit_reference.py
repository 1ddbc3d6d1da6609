"""Test oracle: the released Forgedit fine-tune loop, ported to run on our components.

Ported from the released implementation (github.com/witcherofresearch/Forgedit): the driver script
``src/sample_forgedit_batch_textencoder.py`` (settings, reference resize) and
``ForgeditStableDiffusionPipeline.train`` in ``src/forgedit_stable_diffusion/pipelineattentionparallel_bsz=1.py``
(the loop). What the port keeps, as the released code does it:

* the reference: ``Image.resize((w, h))`` with PIL's default filter (bicubic), then ``preprocess``: sides cut
  down to a multiple of 32 (LANCZOS), ``/ 255``, ``* 2 - 1``;
* the latent: ``vae.encode(x).latent_dist.sample(generator) * 0.18215``;
* e_src: the text encoder's output for the source prompt (max-length padding), detached, as a Parameter;
* which UNet parameters train: a *substring* test on the name, ``"up_blocks" in name and not "up_blocks.0" in
  name`` or the same for ``down_blocks``;
* one Adam, parameter groups ``[UNet params at the UNet lr, e_src at the text lr]``, torch's other defaults;
* ``text_embedding_optimization_steps // bsz`` iterations (400 // 10 = 40); each draws the noise for the repeated
  latent, then ``randint(1000, (bsz,))`` timesteps, adds noise with the DDIM scheduler (the driver's betas),
  predicts with e_src repeated ``bsz`` times, loss ``mse(reduction="none").mean([1, 2, 3]).mean()``;
* the early stop, checked before the update: ``loss.item() < 0.03 and i * bsz > 350``;
* ``accelerator.backward(loss)`` with ``mixed_precision="fp16"``: accelerate makes a GradScaler (on CUDA) and
  multiplies the loss by its scale, 2**16, but the optimiser was never given to accelerate, so the gradients are
  never unscaled. ``loss_scale`` reproduces that (2**16 for the published GPU runs; 1 where no scaler exists).

What differs on purpose: the released code draws the latent sample from a CUDA generator and the noise and
timesteps from torch's global RNG. Here all draws come from one CPU ``generator``, in the order our fine-tune uses
(latent sample, then per step noise and timesteps), so both loops see the same numbers. It runs in float32 (the
released driver loads the pipeline with ``torch_dtype=torch.float32``; no autocast is ever entered).
"""

from __future__ import annotations

import copy

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler
from PIL import Image

RELEASED_LOSS_SCALE_ON_CUDA = 2.0**16  # torch GradScaler's init_scale, never updated by the released loop


def released_should_stop(i: int, loss: float, bsz: int, threshold: float = 0.03, min_samples: int = 350) -> bool:
    """The released early-stop test, ``i`` counted from 0, checked before the update of iteration ``i``."""
    return loss < threshold and i * bsz > min_samples


def released_trains(name: str) -> bool:
    """The released code's choice of trained UNet parameters (a substring test on the name)."""
    up = "up_blocks" in name and "up_blocks.0" not in name
    down = "down_blocks" in name and "down_blocks.0" not in name
    return up or down


def preprocess(image: Image.Image) -> torch.Tensor:
    w, h = image.size
    w, h = (x - x % 32 for x in (w, h))
    image = image.resize((w, h), resample=Image.Resampling.LANCZOS)
    arr = np.array(image).astype(np.float32) / 255.0
    return 2.0 * torch.from_numpy(arr[None].transpose(0, 3, 1, 2)) - 1.0


def released_scheduler() -> DDIMScheduler:
    return DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False
    )


def released_finetune(
    model,
    image: Image.Image,
    source: str,
    *,
    width: int,
    height: int,
    generator: torch.Generator,
    bsz: int = 10,
    text_embedding_optimization_steps: int = 400,
    embedding_learning_rate: float = 1e-3,
    diffusion_model_learning_rate: float = 6e-5,
    loss_scale: float = 1.0,
    loss_threshold: float = 0.03,
) -> dict:
    """Run the released loop on a copy of ``model``'s UNet (``model``: our Components; nothing of it is changed).

    Returns ``{"losses", "source_embedding" [1, 77, C], "deltas" {name: learned - original, float32},
    "trained_names", "updates"}``.
    """
    unet = copy.deepcopy(model.unet)
    vae, text_encoder, tokenizer = model.vae, model.text_encoder, model.tokenizer
    scheduler = released_scheduler()
    original = {n: p.detach().clone() for n, p in unet.named_parameters()}

    init_image = image.convert("RGB").resize((width, height))  # the driver script, PIL's default filter

    ids = tokenizer(
        source, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids
    with torch.no_grad():
        text_embeddings = text_encoder(ids)[0].detach()
    text_embeddings = torch.nn.Parameter(text_embeddings, requires_grad=True)

    unet.train()
    params_to_optimize = []
    names = []
    for name, params in unet.named_parameters():
        params.requires_grad = released_trains(name)
        if params.requires_grad:
            params_to_optimize.append(params)
            names.append(name)
    optimizer = torch.optim.Adam(
        [
            {"params": params_to_optimize, "lr": diffusion_model_learning_rate},
            {"params": text_embeddings, "lr": embedding_learning_rate},
        ]
    )

    x = preprocess(init_image).to(dtype=text_embeddings.dtype)
    with torch.no_grad():
        image_latents = vae.encode(x).latent_dist.sample(generator=generator)
    image_latents = 0.18215 * image_latents

    losses: list[float] = []
    updates = 0
    for i in range(text_embedding_optimization_steps // bsz):
        image_latents_batch = image_latents.repeat(bsz, 1, 1, 1)
        noise = torch.randn(image_latents_batch.shape, generator=generator)
        text_embeddings_batch = text_embeddings.repeat(bsz, 1, 1)
        timesteps = torch.randint(1000, (bsz,), generator=generator)
        noisy_latents = scheduler.add_noise(image_latents_batch, noise, timesteps)
        noise_pred = unet(noisy_latents, timesteps, text_embeddings_batch).sample
        loss = F.mse_loss(noise_pred, noise, reduction="none").mean([1, 2, 3]).mean()
        losses.append(loss.item())
        if released_should_stop(i, loss.item(), bsz, loss_threshold):
            break
        (loss * loss_scale if loss_scale != 1.0 else loss).backward()  # accelerator.backward
        optimizer.step()
        optimizer.zero_grad()
        updates += 1

    with torch.no_grad():
        params = dict(unet.named_parameters())
        deltas = {n: (params[n] - original[n]).float() for n in names}
    return {
        "losses": losses,
        "source_embedding": text_embeddings.detach().float(),
        "deltas": deltas,
        "trained_names": names,
        "updates": updates,
    }
