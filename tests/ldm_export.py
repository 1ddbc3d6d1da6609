"""Write diffusers-format SD 1.x components as an original (CompVis/LDM) single-file checkpoint.

Community Stable Diffusion 1.x fine-tunes (Realistic Vision and the like) ship as one ``.safetensors`` in the layout
of the original training code: ``model.diffusion_model.*`` (UNet), ``first_stage_model.*`` (VAE) and
``cond_stage_model.transformer.text_model.*`` (CLIP ViT-L text encoder). We cannot download one in tests, so this
module builds one from the tiny components in :mod:`fastimagic.tiny`: the exact inverse of diffusers' own loader
(``diffusers.loaders.single_file_utils.convert_ldm_unet_checkpoint`` / ``convert_ldm_vae_checkpoint`` /
``convert_ldm_clip_checkpoint``), in the spirit of diffusers'
``scripts/convert_diffusers_to_original_stable_diffusion.py`` but derived from the configs, so it holds for any
number of blocks and ``layers_per_block``.

Loading the result back offline (diffusers 0.42) -- see ``tests/test_ldm_export.py``::

    pipe = StableDiffusionPipeline.from_single_file(
        str(ckpt), config=str(diffusers_folder), local_files_only=True, safety_checker=None, feature_extractor=None
    )

where ``diffusers_folder`` is a folder written by :func:`save_diffusers_folder` (only its configs and tokenizer
files are read; ``from_single_file`` never reads its weights).
"""

from __future__ import annotations

from pathlib import Path

import torch

from fastimagic.models import make_scheduler

LDM_UNET_PREFIX = "model.diffusion_model."
LDM_VAE_PREFIX = "first_stage_model."
LDM_CLIP_PREFIX = "cond_stage_model.transformer.text_model."

# Inside a UNet ResBlock: diffusers name -> LDM name.
_UNET_RESNET_RENAMES = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "time_emb_proj": "emb_layers.1",
    "conv_shortcut": "skip_connection",
}
# Inside a VAE ResnetBlock only the shortcut differs.
_VAE_RESNET_RENAMES = {"conv_shortcut": "nin_shortcut"}
# Inside the VAE mid-block AttnBlock (whose q/k/v/proj_out are 1x1 convolutions in LDM).
_VAE_ATTN_RENAMES = {
    "group_norm": "norm",
    "to_q": "q",
    "to_k": "k",
    "to_v": "v",
    "to_out.0": "proj_out",
}
_VAE_ATTN_CONV_WEIGHTS = {"q.weight", "k.weight", "v.weight", "proj_out.weight"}


def _layers_per_block(config) -> int:
    layers = config["layers_per_block"]
    if not isinstance(layers, int):
        # diffusers allows a tuple, but neither SD 1.x nor diffusers' LDM loader does.
        raise TypeError(f"layers_per_block must be an int for an LDM export, got {layers!r}")
    return layers


def unet_prefix_map(config) -> dict[str, tuple[str, dict[str, str]]]:
    """Map each diffusers UNet module prefix to (LDM prefix, renames of the names inside that module)."""
    n_blocks = len(config["block_out_channels"])
    per = _layers_per_block(config) + 1  # LDM input/output blocks per level: the resnets plus a down/upsampler slot.
    prefixes: dict[str, tuple[str, dict[str, str]]] = {
        "time_embedding.linear_1.": ("time_embed.0.", {}),
        "time_embedding.linear_2.": ("time_embed.2.", {}),
        "conv_in.": ("input_blocks.0.0.", {}),
        "conv_norm_out.": ("out.0.", {}),
        "conv_out.": ("out.2.", {}),
        # SDXL's added embedding (pooled text vector + time ids)
        "add_embedding.linear_1.": ("label_emb.0.0.", {}),
        "add_embedding.linear_2.": ("label_emb.0.2.", {}),
        "mid_block.resnets.0.": ("middle_block.0.", _UNET_RESNET_RENAMES),
        "mid_block.attentions.0.": ("middle_block.1.", {}),
        "mid_block.resnets.1.": ("middle_block.2.", _UNET_RESNET_RENAMES),
    }
    for i, block_type in enumerate(config["down_block_types"]):
        for j in range(per - 1):
            ldm = f"input_blocks.{i * per + j + 1}"
            prefixes[f"down_blocks.{i}.resnets.{j}."] = (f"{ldm}.0.", _UNET_RESNET_RENAMES)
            if "CrossAttn" in block_type:
                # Transformer2DModel and LDM's SpatialTransformer share their inner names.
                prefixes[f"down_blocks.{i}.attentions.{j}."] = (f"{ldm}.1.", {})
        if i < n_blocks - 1:
            prefixes[f"down_blocks.{i}.downsamplers.0.conv."] = (f"input_blocks.{(i + 1) * per}.0.op.", {})
    for i, block_type in enumerate(config["up_block_types"]):
        has_attention = "CrossAttn" in block_type
        for j in range(per):
            ldm = f"output_blocks.{i * per + j}"
            prefixes[f"up_blocks.{i}.resnets.{j}."] = (f"{ldm}.0.", _UNET_RESNET_RENAMES)
            if has_attention:
                prefixes[f"up_blocks.{i}.attentions.{j}."] = (f"{ldm}.1.", {})
        if i < n_blocks - 1:
            # The upsampler sits after the last resnet (and its attention, when the level has one).
            slot = 2 if has_attention else 1
            prefixes[f"up_blocks.{i}.upsamplers.0.conv."] = (f"output_blocks.{i * per + per - 1}.{slot}.conv.", {})
    return prefixes


def vae_prefix_map(config) -> dict[str, tuple[str, dict[str, str]]]:
    """Map each diffusers AutoencoderKL module prefix to (LDM prefix, renames of the names inside that module)."""
    n_blocks = len(config["block_out_channels"])
    layers = _layers_per_block(config)
    prefixes: dict[str, tuple[str, dict[str, str]]] = {}
    for part in ("encoder", "decoder"):
        prefixes[f"{part}.conv_in."] = (f"{part}.conv_in.", {})
        prefixes[f"{part}.conv_out."] = (f"{part}.conv_out.", {})
        prefixes[f"{part}.conv_norm_out."] = (f"{part}.norm_out.", {})
        for k in range(2):
            prefixes[f"{part}.mid_block.resnets.{k}."] = (f"{part}.mid.block_{k + 1}.", _VAE_RESNET_RENAMES)
        prefixes[f"{part}.mid_block.attentions.0."] = (f"{part}.mid.attn_1.", _VAE_ATTN_RENAMES)
    prefixes["quant_conv."] = ("quant_conv.", {})
    prefixes["post_quant_conv."] = ("post_quant_conv.", {})
    for i in range(n_blocks):
        for j in range(layers):
            prefixes[f"encoder.down_blocks.{i}.resnets.{j}."] = (f"encoder.down.{i}.block.{j}.", _VAE_RESNET_RENAMES)
        if i < n_blocks - 1:
            prefixes[f"encoder.down_blocks.{i}.downsamplers.0.conv."] = (f"encoder.down.{i}.downsample.conv.", {})
        # The decoder's levels are numbered the other way round in LDM (up.0 is the full-resolution level).
        level = n_blocks - 1 - i
        for j in range(layers + 1):
            prefixes[f"decoder.up_blocks.{i}.resnets.{j}."] = (f"decoder.up.{level}.block.{j}.", _VAE_RESNET_RENAMES)
        if i < n_blocks - 1:
            prefixes[f"decoder.up_blocks.{i}.upsamplers.0.conv."] = (f"decoder.up.{level}.upsample.conv.", {})
    return prefixes


def _rename(state_dict: dict[str, torch.Tensor], prefixes, what: str) -> dict[str, torch.Tensor]:
    # Longest prefix first, so "mid_block.resnets.1." is never taken for "mid_block.resnets.10.".
    ordered = sorted(prefixes.items(), key=lambda item: len(item[0]), reverse=True)
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state_dict.items():
        for prefix, (ldm_prefix, renames) in ordered:
            if key.startswith(prefix):
                rest = key[len(prefix) :]
                for old, new in renames.items():
                    if rest.startswith(old + "."):
                        rest = new + rest[len(old) :]
                        break
                out[ldm_prefix + rest] = tensor
                break
        else:
            raise KeyError(f"no LDM name for {what} parameter {key!r} (not an SD 1.x-shaped {what}?)")
    if len(out) != len(state_dict):
        raise AssertionError(f"{what}: two parameters were mapped to the same LDM name")
    return out


def unet_to_ldm(unet) -> dict[str, torch.Tensor]:
    """The UNet's state dict under LDM names (without the ``model.diffusion_model.`` prefix)."""
    return _rename(unet.state_dict(), unet_prefix_map(unet.config), "UNet")


def vae_to_ldm(vae) -> dict[str, torch.Tensor]:
    """The VAE's state dict under LDM names (without the ``first_stage_model.`` prefix).

    The mid-block attention's q/k/v/proj_out are linear layers in diffusers and 1x1 convolutions in LDM, so their
    weights gain two trailing singleton dimensions, as in the original checkpoints.
    """
    out = _rename(vae.state_dict(), vae_prefix_map(vae.config), "VAE")
    for key, tensor in out.items():
        if ".mid.attn_1." in key and key.split(".mid.attn_1.", 1)[1] in _VAE_ATTN_CONV_WEIGHTS and tensor.ndim == 2:
            out[key] = tensor[:, :, None, None]
    return out


def text_encoder_to_ldm(text_encoder) -> dict[str, torch.Tensor]:
    """The CLIP text encoder's state dict under names relative to ``cond_stage_model.transformer.text_model.``.

    transformers >= 5.6 flattened ``CLIPTextModel`` (its keys no longer start with ``text_model.``); older versions
    nest them. Both give the same LDM names. The ``position_ids`` buffer that the original checkpoints carry is added
    back (transformers no longer saves it), as ``int64`` ``[1, max_position_embeddings]``.
    """
    out = {key.removeprefix("text_model."): tensor for key, tensor in text_encoder.state_dict().items()}
    unexpected = [key for key in out if not key.startswith(("embeddings.", "encoder.", "final_layer_norm."))]
    if unexpected:
        raise KeyError(f"not a plain CLIP text encoder (SD 1.x has no {unexpected[:3]})")
    n_positions = out["embeddings.position_embedding.weight"].shape[0]
    out.setdefault("embeddings.position_ids", torch.arange(n_positions, dtype=torch.int64)[None])
    return out


def open_clip_to_ldm(text_encoder) -> dict[str, torch.Tensor]:
    """A CLIP text encoder's state dict in OpenCLIP's layout (SD 2.x's ``cond_stage_model.model.``, SDXL's
    ``conditioner.embedders.1.model.``): the inverse of diffusers' ``convert_open_clip_checkpoint``. q/k/v fuse
    into ``attn.in_proj_*``; a projection (``CLIPTextModelWithProjection``) becomes ``text_projection``,
    transposed."""
    state = {key.removeprefix("text_model."): tensor for key, tensor in text_encoder.state_dict().items()}
    out = {
        "token_embedding.weight": state.pop("embeddings.token_embedding.weight"),
        "positional_embedding": state.pop("embeddings.position_embedding.weight"),
        "ln_final.weight": state.pop("final_layer_norm.weight"),
        "ln_final.bias": state.pop("final_layer_norm.bias"),
    }
    if "text_projection.weight" in state:
        out["text_projection"] = state.pop("text_projection.weight").T.contiguous()
    state.pop("embeddings.position_ids", None)
    renames = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
               "self_attn.out_proj": "attn.out_proj"}
    for i in range(text_encoder.config.num_hidden_layers):
        layer, block = f"encoder.layers.{i}.", f"transformer.resblocks.{i}."
        for kind in ("weight", "bias"):
            out[f"{block}attn.in_proj_{kind}"] = torch.cat(
                [state.pop(f"{layer}self_attn.{p}_proj.{kind}") for p in ("q", "k", "v")]
            )
            for old, new in renames.items():
                out[f"{block}{new}.{kind}"] = state.pop(f"{layer}{old}.{kind}")
    if state:
        raise KeyError(f"not a plain CLIP text encoder: {sorted(state)[:3]} left over")
    return out


def ldm_schedule_buffers(num_train_timesteps: int = 1000, beta_start=0.00085, beta_end=0.012) -> dict:
    """The DDPM schedule buffers (``betas``, ``alphas_cumprod``, ...) that LDM's LatentDiffusion saves at top level."""
    betas = torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float64) ** 2
    alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
    alphas_cumprod_prev = torch.cat([torch.ones(1, dtype=torch.float64), alphas_cumprod[:-1]])
    posterior_variance = betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod)
    buffers = {
        "betas": betas,
        "alphas_cumprod": alphas_cumprod,
        "alphas_cumprod_prev": alphas_cumprod_prev,
        "sqrt_alphas_cumprod": alphas_cumprod.sqrt(),
        "sqrt_one_minus_alphas_cumprod": (1.0 - alphas_cumprod).sqrt(),
        "log_one_minus_alphas_cumprod": (1.0 - alphas_cumprod).log(),
        "sqrt_recip_alphas_cumprod": (1.0 / alphas_cumprod).sqrt(),
        "sqrt_recipm1_alphas_cumprod": (1.0 / alphas_cumprod - 1).sqrt(),
        "posterior_variance": posterior_variance,
        "posterior_log_variance_clipped": posterior_variance.clamp(min=1e-20).log(),
        "posterior_mean_coef1": betas * alphas_cumprod_prev.sqrt() / (1.0 - alphas_cumprod),
        "posterior_mean_coef2": (1.0 - alphas_cumprod_prev) * (1.0 - betas).sqrt() / (1.0 - alphas_cumprod),
    }
    return {key: value.float() for key, value in buffers.items()}


def ldm_state_dict(components: dict, *, schedule_buffers: bool = True) -> dict[str, torch.Tensor]:
    """The full original-layout state dict of ``components`` (``unet``, ``vae``, ``text_encoder`` and, for
    SDXL, ``text_encoder_2``). The text side follows the family: SD 1.x's CLIP under
    ``cond_stage_model.transformer.``; SD 2.x's OpenCLIP (``family`` ``sd2``) under ``cond_stage_model.model.``;
    SDXL's two encoders under ``conditioner.embedders.0.transformer.`` and ``conditioner.embedders.1.model.``."""
    state: dict[str, torch.Tensor] = {}
    state.update({LDM_UNET_PREFIX + k: v for k, v in unet_to_ldm(components["unet"]).items()})
    state.update({LDM_VAE_PREFIX + k: v for k, v in vae_to_ldm(components["vae"]).items()})
    family = getattr(components.get("family"), "name", "sd1")
    if family == "sdxl":
        clip = text_encoder_to_ldm(components["text_encoder"])
        state.update({"conditioner.embedders.0.transformer.text_model." + k: v for k, v in clip.items()})
        big_g = open_clip_to_ldm(components["text_encoder_2"])
        state.update({"conditioner.embedders.1.model." + k: v for k, v in big_g.items()})
    elif family == "sd2":
        open_clip = open_clip_to_ldm(components["text_encoder"])
        state.update({"cond_stage_model.model." + k: v for k, v in open_clip.items()})
    else:
        state.update({LDM_CLIP_PREFIX + k: v for k, v in text_encoder_to_ldm(components["text_encoder"]).items()})
    if schedule_buffers:
        state.update(ldm_schedule_buffers())
    return state


def export_single_file(
    components: dict, path: Path, *, dtype: torch.dtype | None = None, schedule_buffers: bool = True
) -> Path:
    """Write ``components`` as one original-layout SD 1.x ``.safetensors`` at ``path`` and return ``path``.

    ``dtype`` casts the floating-point weights (community checkpoints are mostly ``torch.float16``);
    ``position_ids`` stays ``int64``. ``schedule_buffers`` adds LDM's top-level DDPM buffers, as full exports have.
    """
    from safetensors.torch import save_file

    tensors = {}
    for key, tensor in ldm_state_dict(components, schedule_buffers=schedule_buffers).items():
        tensor = tensor.detach().to("cpu")
        if dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(dtype)
        tensors[key] = tensor.clone().contiguous()  # safetensors refuses views that share storage
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata={"format": "pt"})
    return path


def save_diffusers_folder(components: dict, folder: Path) -> Path:
    """Write ``components`` as a standard diffusers StableDiffusionPipeline folder and return it.

    model_index.json, unet/, vae/, text_encoder/, tokenizer/ and scheduler/ (DDIM); no safety checker and no
    feature extractor (both ``null`` in model_index.json, ``requires_safety_checker`` false).
    """
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    scheduler = make_scheduler(components.get("prediction_type", "epsilon"))
    if "text_encoder_2" in components:  # SDXL
        pipe = StableDiffusionXLPipeline(
            vae=components["vae"],
            text_encoder=components["text_encoder"],
            text_encoder_2=components["text_encoder_2"],
            tokenizer=components["tokenizer"],
            tokenizer_2=components["tokenizer_2"],
            unet=components["unet"],
            scheduler=scheduler,
            force_zeros_for_empty_prompt=True,
        )
    else:
        pipe = StableDiffusionPipeline(
            vae=components["vae"],
            text_encoder=components["text_encoder"],
            tokenizer=components["tokenizer"],
            unet=components["unet"],
            scheduler=scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
    folder = Path(folder)
    pipe.save_pretrained(str(folder), safe_serialization=True)
    return folder


# ---------------------------------------------------------------------------------------------------------------
# Prototype: tell an SD 1.x checkpoint from other architectures by its safetensors header alone (no tensor is read).

_SDXL_MARKERS = ("conditioner.embedders.", "model.diffusion_model.label_emb.")
_SD2_CLIP_PREFIX = "cond_stage_model.model."  # OpenCLIP ViT-H, the SD 2.x text encoder
# SD 1.x and 2.x both have a cross-attention at input_blocks.1 (the first level is CrossAttnDownBlock2D).
_CONTEXT_KEY = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"


