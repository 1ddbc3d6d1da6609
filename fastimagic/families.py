"""Model families: what differs between Stable Diffusion 1.x, 2.x and SDXL, as one description each.

The method (fine-tune, merge, forgetting, sampler) reads the same for every family; the few places where the
families differ are data here:

* the text side: one CLIP encoder (SD 1.x: ViT-L, 768 channels; SD 2.x: OpenCLIP ViT-H, 1024 channels), or two
  (SDXL: CLIP ViT-L + OpenCLIP ViT-bigG, per-token hidden states concatenated to 2048 channels) plus a pooled
  vector (bigG's projection, 1280) and size conditioning ("time ids") through the UNet's added embedding;
* the prediction target (noise or velocity): the model's scheduler config says which, see
  :attr:`fastimagic.models.Components.prediction_type`;
* the UNet levels: their channel widths, so that presets and forgetting rules name the same level on every family;
* where the VAE is safe to run in float16.

The pooled vector travels *inside* the embedding: an SDXL embedding is ``[n, 77 + 1, 2048]``, its last row the
pooled vector zero-padded to the token width. Every operation of the method is per token (merges, Adam's
element-wise update), so the pooled row is merged with the same coefficients as the tokens, optimised jointly at
the text learning rate, stored in the tuning as part of e_src, and the padding stays exactly zero (no gradient
reaches it; the merges map 0 to 0). Only the UNet call splits it off again (:meth:`Family.split`).

This module is torch-free at import time (the storyboard schema and ``fastimagic strategies`` read it).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

# SD 1.x's level widths. Names written for SD 1.x (``encoder1`` = down_blocks.1, ``decoder2`` = up_blocks.2, both
# the 640-channel level) mean the level of the same width on every family (SDXL: down_blocks.1 and up_blocks.1).
SD1_WIDTHS = (320, 640, 1280, 1280)


@dataclass(frozen=True)
class Family:
    """One model family. ``widths``: the UNet's ``block_out_channels`` of the released models (level i of the
    encoder is ``down_blocks.i``; the decoder runs the other way, ``up_blocks.0`` is the deepest).
    ``presets``: trained-block presets by name. ``text_hidden``: which hidden state of each text encoder the UNet
    sees (``last``, or ``penultimate`` for SDXL). ``pooled``: a pooled text vector and time ids condition the
    UNet. ``vae_fp16``: the VAE decodes in float16 without overflowing. ``zero_empty_prompt``: the unconditional
    embedding of an empty prompt is zeros (SDXL base's ``force_zeros_for_empty_prompt``). ``checkpointing_from``:
    gradient checkpointing is on by default from this many pixels (0: never by default).
    ``single_file_pipeline`` / ``config_repo``: how diffusers loads a single-file checkpoint of the family and the
    repo id whose configs it needs by default.
    """

    name: str
    label: str
    embedding_dim: int
    pooled_dim: int
    widths: tuple[int, ...]
    presets: dict[str, tuple[str, ...]] = field(hash=False)
    resolution: int
    text_encoders: tuple[str, ...] = ("text_encoder",)
    text_hidden: str = "last"
    prediction_type: str = "epsilon"
    vae_fp16: bool = True
    zero_empty_prompt: bool = False
    checkpointing_from: int = 0
    single_file_pipeline: str = "StableDiffusionPipeline"
    config_repo: str = ""

    @property
    def pooled(self) -> bool:
        return self.pooled_dim > 0

    @property
    def levels(self) -> int:
        return len(self.widths)

    def down_block(self, sd1_level: int) -> str:
        """The encoder block holding the level that ``down_blocks.<sd1_level>`` holds on SD 1.x, by channel width."""
        return f"down_blocks.{self.widths.index(SD1_WIDTHS[sd1_level])}"

    def up_block(self, sd1_level: int) -> str:
        """The decoder block holding the level that ``up_blocks.<sd1_level>`` holds on SD 1.x, by channel width."""
        width = tuple(reversed(SD1_WIDTHS))[sd1_level]
        return f"up_blocks.{self.levels - 1 - self.widths.index(width)}"

    def block_problem(self, block: str) -> str | None:
        """Why ``block`` (e.g. ``down_blocks.3``) is not a block of this family's UNet, or None when it is."""
        root, _, rest = block.partition(".")
        index = rest.split(".")[0]
        if root in ("down_blocks", "up_blocks") and index.isdigit() and int(index) >= self.levels:
            return f"'{block}': {self.label} has {root}.0 to {root}.{self.levels - 1}"
        return None

    def split(self, embedding: torch.Tensor, pooled_dim: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(tokens [n, 77, C], pooled [n, pooled_dim] or None)`` of a packed embedding (see the module doc)."""
        if not self.pooled:
            return embedding, None
        return embedding[:, :-1], embedding[:, -1, :pooled_dim]

    def pack(self, tokens: torch.Tensor, pooled: torch.Tensor | None) -> torch.Tensor:
        """The packed embedding of per-token states ``[n, 77, C]`` and a pooled vector ``[n, P]`` (P <= C)."""
        if not self.pooled:
            return tokens
        import torch

        n, _, width = tokens.shape
        if pooled.shape[-1] > width:
            raise ValueError(f"pooled width {pooled.shape[-1]} is wider than the token width {width}")
        row = torch.zeros(n, 1, width, dtype=tokens.dtype, device=tokens.device)
        row[:, 0, : pooled.shape[-1]] = pooled
        return torch.cat([tokens, row], dim=1)

    @staticmethod
    def time_ids(original: tuple[int, int], crop: tuple[int, int], target: tuple[int, int]) -> torch.Tensor:
        """SDXL's size conditioning ``[1, 6]``: original (h, w), crop top-left (top, left), target (h, w)."""
        import torch

        return torch.tensor([[*original, *crop, *target]], dtype=torch.float32)


SD1 = Family(
    name="sd1",
    label="Stable Diffusion 1.x",
    embedding_dim=768,
    pooled_dim=0,
    widths=SD1_WIDTHS,
    # "reference": what the released Forgedit code trains (down_blocks 1-3, up_blocks 1-3); the published TEdBench
    # figures come from it. "paper": encoder blocks 0-2 and decoder blocks 1-3, as the paper's §3.2 describes
    # them. The mid block and up_blocks.0 (the deepest decoder level) stay frozen in both.
    presets={
        "reference": ("down_blocks.1", "down_blocks.2", "down_blocks.3", "up_blocks.1", "up_blocks.2", "up_blocks.3"),
        "paper": ("down_blocks.0", "down_blocks.1", "down_blocks.2", "up_blocks.1", "up_blocks.2", "up_blocks.3"),
    },
    resolution=512,
    config_repo="stable-diffusion-v1-5/stable-diffusion-v1-5",
)

SD2 = Family(
    name="sd2",
    label="Stable Diffusion 2.x",
    embedding_dim=1024,
    pooled_dim=0,
    widths=SD1_WIDTHS,  # the same UNet levels as SD 1.x: the same presets, the same forgetting rules
    presets=SD1.presets,
    resolution=768,  # 2.0/2.1 (velocity); the -base models are 512 px and predict noise: per model, see Components
    prediction_type="v_prediction",
    config_repo="stabilityai/stable-diffusion-2-1",
)

SDXL = Family(
    name="sdxl",
    label="SDXL",
    embedding_dim=2048,
    pooled_dim=1280,
    widths=(320, 640, 1280),
    # Three levels: down_blocks.0 (320, no attention), .1 (640, 2-layer transformers), .2 (1280, 10-layer
    # transformers); the mid block (10 layers); up_blocks.0 (1280, 10 layers), .1 (640), .2 (320, no attention).
    # "reference" mirrors the released code level for level, by width: SD 1.x trains every encoder level but the
    # first (320) and every decoder level but the deepest, so SDXL trains down_blocks.1-2 and up_blocks.1-2.
    # "paper" carries the rule over: the deepest blocks stay frozen (down_blocks.2, mid, up_blocks.0: the
    # ten-layer transformers, most of the 2.6 B parameters), the shallow ones train. Parameter counts: docs/models.md.
    presets={
        "reference": ("down_blocks.1", "down_blocks.2", "up_blocks.1", "up_blocks.2"),
        "paper": ("down_blocks.0", "down_blocks.1", "up_blocks.1", "up_blocks.2"),
    },
    resolution=1024,
    text_encoders=("text_encoder", "text_encoder_2"),
    text_hidden="penultimate",
    vae_fp16=False,  # the SDXL VAE's activations overflow float16: decode in float32 (or give a fixed vae:)
    zero_empty_prompt=True,
    checkpointing_from=768 * 768,
    single_file_pipeline="StableDiffusionXLPipeline",
    config_repo="stabilityai/stable-diffusion-xl-base-1.0",
)

FAMILIES: dict[str, Family] = {f.name: f for f in (SD1, SD2, SDXL)}

# The built-in seeded tiny models (fastimagic.tiny), by name, and the family each is shaped like.
TINY_FAMILIES: dict[str, Family] = {"tiny": SD1, "tiny-sd2": SD2, "tiny-sdxl": SDXL}
# The UNet architectures built without weights (fastimagic.models.unet_shapes, `fastimagic strategies`, the
# benchmarks), by name, and the family each is shaped like.
UNET_ARCHS: dict[str, Family] = {"sd15": SD1, "sd2": SD2, "sdxl": SDXL, **TINY_FAMILIES}

# What single-file checkpoints are refused as, by the name describe_checkpoint gives them.
UNSUPPORTED = {
    "sdxl-refiner": "an SDXL refiner (it only refines another model's latents)",
    "sd3": "a Stable Diffusion 3 checkpoint (a transformer, not a UNet)",
    "flux": "a FLUX checkpoint (a transformer, not a UNet)",
}
SUPPORTED = "SD 1.x, SD 2.x and SDXL base models (and their fine-tunes)"


def family_of_unet(config: dict) -> Family:
    """The family of a diffusers UNet config (``unet/config.json``), from its structure, not its widths (so that
    the tiny models are recognised too): the "text_time" added embedding is SDXL's, linear-projection
    transformers or 1024-channel cross-attention are SD 2.x's, anything else is SD 1.x."""
    if config.get("addition_embed_type") == "text_time":
        return SDXL
    if config.get("use_linear_projection") or config.get("cross_attention_dim") == SD2.embedding_dim:
        return SD2
    return SD1


def family(name: str) -> Family:
    """The family called ``name`` (``sd1``, ``sd2``, ``sdxl``); KeyError otherwise."""
    return FAMILIES[name]


def all_presets() -> tuple[str, ...]:
    """Preset names any family knows (every family has the same names)."""
    return tuple(dict.fromkeys(p for f in FAMILIES.values() for p in f.presets))


MAX_LEVELS = max(f.levels for f in FAMILIES.values())
