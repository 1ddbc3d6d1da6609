"""Base models: load a Stable Diffusion 1.x model (UNet, VAE, CLIP text encoder + tokenizer, DDIM scheduler).

Where a model can come from, as a user writes it in ``model:``:

* ``tiny``: the built-in seeded random model (:mod:`fastimagic.tiny`), for tests and the demo.
* a Hugging Face repo id, e.g. ``stable-diffusion-v1-5/stable-diffusion-v1-5`` or ``CompVis/stable-diffusion-v1-4``:
  loaded with ``from_pretrained``; the local HF cache is used and ``HF_HUB_OFFLINE=1`` is honoured.
* a local diffusers folder (``model_index.json``, ``unet/``, ``vae/``, ``text_encoder/``, ``tokenizer/``).
* a single-file ``.safetensors`` checkpoint in the original SD layout (community fine-tunes such as Realistic
  Vision). diffusers' single-file loader needs the model's configs and tokenizer: ``config`` names a local
  diffusers folder or a repo id already in the HF cache (default: SD 1.5's repo id), so it works offline.

Pickle checkpoints (``.ckpt``, ``.pt``, ``.pth``, ``.bin``) can run arbitrary code when loaded, so they are refused
unless ``allow_pickle=True``.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from fastimagic.cache import LruCache
from fastimagic.config import PICKLE_SUFFIXES, model_kind
from fastimagic.errors import InputError
from fastimagic.precision import Precision, precision_for_dtype, resolve_precision

DEFAULT_SINGLE_FILE_CONFIG = "stable-diffusion-v1-5/stable-diffusion-v1-5"


def make_scheduler():
    """The DDIM scheduler of SD 1.x: scaled-linear betas 0.00085-0.012, no sample clipping."""
    from diffusers import DDIMScheduler

    return DDIMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )


def pick_device(
    device: str | None = None, dtype: str | torch.dtype | None = None, precision: str = "auto"
) -> tuple[torch.device, torch.dtype]:
    """Choose where to run (CUDA, else MPS, else CPU) and the dtype of the frozen text encoder and VAE.

    ``precision`` is one of :data:`~fastimagic.precision.PRECISIONS` (``auto``: fp16 on CUDA, fp32 elsewhere).
    ``dtype`` is the older override (``"float16"``, ``torch.bfloat16``...) and maps to ``fp16``/``bf16``/``fp32``.
    """
    dev = _pick(device)
    return dev, resolve_precision(_precision_name(precision, dtype), dev).frozen_dtype


def _pick(device: str | None) -> torch.device:
    if device is None:
        if torch.cuda.is_available():
            device = "cuda"
        elif getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            device = "mps"
        else:
            device = "cpu"
    return torch.device(device)


def _precision_name(precision: str, dtype: str | torch.dtype | None) -> str:
    if dtype is None:
        return precision
    named = precision_for_dtype(dtype)
    if precision not in ("auto", named):
        raise InputError(f"dtype {dtype} and precision {precision} disagree; give precision only")
    return named


def default_device() -> torch.device:
    """The device :func:`load_base_model` uses when none is given."""
    return _pick(None)


@dataclass
class Components:
    """The frozen components of an SD 1.x model, on one device.

    The UNet keeps float32 master weights (fine-tuning updates them, tunings and forgetting edit them); its compute
    runs under autocast in ``precision.compute_dtype``. The VAE and text encoder are stored in ``dtype`` (the
    precision's frozen dtype). ``identity`` names the weights for tuning content keys.
    """

    unet: torch.nn.Module
    vae: torch.nn.Module
    text_encoder: torch.nn.Module
    tokenizer: object
    scheduler: object
    identity: str
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    dtype: torch.dtype = torch.float32
    precision: Precision = field(default_factory=lambda: resolve_precision("fp32", "cpu"))
    # Applying a tuning or a forgetting strategy edits the UNet in place: one user at a time.
    lock: threading.RLock = field(default_factory=threading.RLock, repr=False)

    @property
    def latent_scale(self) -> float:
        return float(getattr(self.vae.config, "scaling_factor", 0.18215))

    def autocast(self):
        """The autocast context for UNet compute (a no-op for fp32 and tf32)."""
        enabled = self.precision.autocast and self.device.type in ("cuda", "cpu", "mps")
        return torch.autocast(self.device.type, dtype=self.precision.compute_dtype, enabled=enabled)

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        """CLIP text embeddings ``[len(prompts), 77, C]`` (float32) for ``prompts``, padded to the max length."""
        ids = self.tokenizer(
            prompts,
            padding="max_length",
            max_length=self.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids.to(self.device)
        return self.text_encoder(ids)[0].float()

    def truncated_part(self, prompt: str) -> str | None:
        """The words of ``prompt`` the text encoder cannot see (beyond 77 tokens), or None if it all fits."""
        ids = self.tokenizer(prompt, truncation=False).input_ids
        limit = self.tokenizer.model_max_length
        if len(ids) <= limit:
            return None
        kept = self.tokenizer.decode(ids[1 : limit - 1])
        # Tokenizers lower-case and normalise spaces: cut the original prompt at the same number of words.
        words = prompt.split()
        return " ".join(words[len(kept.split()) :]) or prompt[-20:]


def fingerprint(path: Path) -> str:
    """A fast identity for a large weights file: size plus SHA-256 of its first, middle and last 4 MiB.

    Hashing a 4 GB checkpoint completely takes tens of seconds per run; sampling three windows still changes for
    any re-saved or fine-tuned weights (their headers and leading tensors differ) and takes milliseconds.
    """
    size = path.stat().st_size
    h = hashlib.sha256(str(size).encode())
    window = 4 << 20
    with path.open("rb") as f:
        for offset in sorted({0, max(0, size // 2 - window // 2), max(0, size - window)}):
            f.seek(offset)
            h.update(f.read(window))
    return h.hexdigest()[:16]


def _folder_identity(folder: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if p.is_file() and p.suffix in (".json", ".safetensors", ".bin", ".txt"):
            h.update(str(p.relative_to(folder)).encode())
            h.update(p.read_bytes() if p.suffix in (".json", ".txt") else fingerprint(p).encode())
    return f"folder:{folder.name}:{h.hexdigest()[:16]}"


def _hub_identity(repo_id: str) -> str:
    # The commit the cache resolves to pins the weights; without a cache entry, the name alone.
    try:
        from huggingface_hub import snapshot_download

        snap = Path(snapshot_download(repo_id, local_files_only=True, allow_patterns=["model_index.json"]))
        return f"hf:{repo_id}@{snap.name}"
    except Exception:
        return f"hf:{repo_id}"


def _first_line(e: BaseException) -> str:
    """The first line of an exception's message, for a one-line error naming the cause."""
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def model_identity(spec: str, *, allow_pickle: bool = False) -> str:
    """The identity of the weights ``spec`` names, without loading them (cheap: for tuning content keys).

    ``tiny:v1``; ``file:<name>:<fingerprint>``; ``folder:<name>:<hash of configs and weight fingerprints>``;
    ``hf:<repo>@<cached commit>``. Raises :class:`InputError` for missing paths and refused pickle files.
    """
    if spec == "tiny":
        from fastimagic import tiny

        return tiny.TINY_IDENTITY
    path = Path(spec).expanduser()
    if path.suffix.lower() in PICKLE_SUFFIXES and not allow_pickle:
        raise InputError(
            f"{spec}: pickle checkpoints ({', '.join(PICKLE_SUFFIXES)}) can run code when loaded;"
            " convert it to .safetensors or allow it explicitly (allow_pickle: true)"
        )
    if path.is_file():
        return f"file:{path.name}:{fingerprint(path)}"
    if path.is_dir():
        if not (path / "model_index.json").is_file() and not (path / "unet").is_dir():
            raise InputError(f"{spec}: not a diffusers model folder (no model_index.json or unet/)")
        return _folder_identity(path)
    try:
        kind = model_kind(spec)
    except ValueError as e:
        raise InputError(str(e)) from None
    if kind != "hub":
        raise InputError(f"{spec}: model path does not exist (expected a diffusers folder or a .safetensors file)")
    return _hub_identity(spec)


def load_base_model(
    spec: str,
    *,
    config: str | None = None,
    device: str | None = None,
    dtype: str | torch.dtype | None = None,
    precision: str = "auto",
    allow_pickle: bool = False,
) -> Components:
    """Load a Stable Diffusion 1.x base model from ``spec`` (``tiny``, repo id, diffusers folder or single file).

    ``config``: for single-file checkpoints, the diffusers folder or cached repo id that supplies configs and the
    tokenizer (default :data:`DEFAULT_SINGLE_FILE_CONFIG`). ``device``/``dtype``/``precision``: see
    :func:`pick_device` and :mod:`fastimagic.precision`; the result's ``precision`` records the resolved one.
    Raises :class:`InputError` for a missing path, a refused pickle file or a checkpoint of another architecture.
    """
    dev = _pick(device)
    resolved = resolve_precision(_precision_name(precision, dtype), dev)
    identity = model_identity(spec, allow_pickle=allow_pickle)
    path = Path(spec).expanduser()
    if spec == "tiny":
        from fastimagic import tiny

        parts = tiny.build_components()
    elif path.is_file():
        parts = _load_single_file(path, config or DEFAULT_SINGLE_FILE_CONFIG)
    elif path.is_dir():
        parts = _load_pretrained(str(path), local_only=True)
    else:
        parts = _load_pretrained(spec, local_only=False)
    return _assemble(parts, identity, dev, resolved)


# Base models a process keeps loaded, least recently used out: one by default (an SD UNet and its encoders take
# several GB of GPU memory); a worker with room for more sets FASTIMAGIC_WARM_MODELS.
WARM_MODELS_ENV = "FASTIMAGIC_WARM_MODELS"
_WARM: LruCache[Components] = LruCache(max(1, int(os.environ.get(WARM_MODELS_ENV) or 1)))
_log = logging.getLogger(__name__)


def cached_base_model(
    spec: str,
    *,
    config: str | None = None,
    device: str | None = None,
    dtype: str | torch.dtype | None = None,
    precision: str = "auto",
    allow_pickle: bool = False,
) -> Components:
    """:func:`load_base_model`, once per process and model identity: workers keep base models warm.

    At most ``$FASTIMAGIC_WARM_MODELS`` models (default 1) stay loaded, least recently used out; two threads asking
    for the same model at once load it once.
    """
    key = (model_identity(spec, allow_pickle=allow_pickle), config, device, str(dtype), precision)

    def load() -> Components:
        started = time.perf_counter()
        model = load_base_model(
            spec, config=config, device=device, dtype=dtype, precision=precision, allow_pickle=allow_pickle
        )
        _log.info("loaded base model %s in %.1f s", key[0], time.perf_counter() - started)
        return model

    return _WARM.get(key, load)


def _assemble(parts: dict, identity: str, device: torch.device, precision: Precision) -> Components:
    dtype = precision.frozen_dtype
    unet, vae, text_encoder = parts["unet"], parts["vae"], parts["text_encoder"]
    for m in (unet, vae, text_encoder):
        m.requires_grad_(False)
        m.eval()
    for m, want in ((unet, torch.float32), (vae, dtype), (text_encoder, dtype)):
        if next(m.parameters()).dtype != want:  # casting a model to the dtype it has makes diffusers warn
            m.to(dtype=want)
        m.to(device)
    if device.type == "cuda":
        unet.to(memory_format=torch.channels_last)
        # Process-wide switches: cuDNN convolutions default to TF32 on Ampere and later, so fp32 must turn it off.
        torch.backends.cuda.matmul.allow_tf32 = precision.tf32
        torch.backends.cudnn.allow_tf32 = precision.tf32
    return Components(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=parts["tokenizer"],
        scheduler=make_scheduler(),
        identity=identity,
        device=device,
        dtype=dtype,
        precision=precision,
    )


def _load_pretrained(source: str, *, local_only: bool) -> dict:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    # huggingface_hub itself honours HF_HUB_OFFLINE and the local cache (HF_HOME / HF_HUB_CACHE).
    kw = {"local_files_only": True} if local_only else {}
    try:
        return {
            "unet": UNet2DConditionModel.from_pretrained(source, subfolder="unet", **kw),
            "vae": AutoencoderKL.from_pretrained(source, subfolder="vae", **kw),
            "text_encoder": CLIPTextModel.from_pretrained(source, subfolder="text_encoder", **kw),
            "tokenizer": CLIPTokenizer.from_pretrained(source, subfolder="tokenizer", **kw),
        }
    except OSError as e:
        raise InputError(
            f"{source}: cannot load the model ({_first_line(e)}); give a diffusers folder, a .safetensors file,"
            " or a repo id present in the HF cache (HF_HUB_OFFLINE=1 forbids downloads)"
        ) from None


_CONTEXT_KEY = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"


def describe_checkpoint(path: str | Path) -> dict:
    """Classify a single-file checkpoint from its safetensors header alone (no tensor is read).

    Returns ``{"family": "sd1" | "sd2" | "sdxl" | "unknown", "cross_attention_dim", "has_vae",
    "has_text_encoder", "in_channels"}``. The cross-attention width (768 for SD 1.x, 1024 for SD 2.x, 2048 for
    SDXL) comes from the first ``attn2.to_k`` shape; ``in_channels`` is 9 for inpainting models.
    """
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        keys = list(f.keys())
        unet = sorted(k for k in keys if k.startswith("model.diffusion_model."))
        # SDXL's first level has no attention: fall back to the first cross-attention there is.
        first_k = next((k for k in unet if k.endswith("attn2.to_k.weight")), None)
        context = _CONTEXT_KEY if _CONTEXT_KEY in keys else first_k
        context_shape = list(f.get_slice(context).get_shape()) if context else None
        conv_in = "model.diffusion_model.input_blocks.0.0.weight"
        in_shape = list(f.get_slice(conv_in).get_shape()) if conv_in in keys else None
    dim = context_shape[1] if context_shape and len(context_shape) == 2 else None
    open_clip = any(k.startswith("cond_stage_model.model.") for k in keys)
    embedders = any(k.startswith("conditioner.embedders.") for k in keys)
    if not unet:
        family = "unknown"
    elif embedders or any(k.startswith("model.diffusion_model.label_emb") for k in keys) or dim == 2048:
        family = "sdxl"
    elif open_clip or dim == 1024:
        family = "sd2"
    else:
        family = "sd1" if dim is not None else "unknown"
    return {
        "family": family,
        "cross_attention_dim": dim,
        "has_vae": any(k.startswith("first_stage_model.") for k in keys),
        "has_text_encoder": open_clip or embedders or any(k.startswith("cond_stage_model.transformer.") for k in keys),
        "in_channels": in_shape[1] if in_shape and len(in_shape) == 4 else None,
    }


def _check_single_file(path: Path) -> None:
    """Refuse a checkpoint that is not SD 1.x before handing it to diffusers, which guesses "v1" for anything."""
    try:
        info = describe_checkpoint(path)
    except Exception as e:
        raise InputError(f"{path}: not a readable .safetensors checkpoint ({e})") from None
    names = {"sdxl": "an SDXL", "sd2": "a Stable Diffusion 2.x"}
    if info["family"] in names:
        raise InputError(f"{path}: this is {names[info['family']]} checkpoint; fastimagic needs Stable Diffusion 1.x")
    if info["family"] != "sd1":
        raise InputError(f"{path}: not a Stable Diffusion 1.x checkpoint (no SD UNet weights found)")
    if info["in_channels"] not in (None, 4):
        raise InputError(
            f"{path}: UNet takes {info['in_channels']} input channels (an inpainting model?); fastimagic needs 4"
        )
    if not (info["has_vae"] and info["has_text_encoder"]):
        raise InputError(f"{path}: checkpoint lacks its VAE or text encoder; give a full SD 1.x checkpoint")


def _load_single_file(path: Path, config: str) -> dict:
    if path.suffix.lower() not in PICKLE_SUFFIXES:
        _check_single_file(path)
    from diffusers import StableDiffusionPipeline

    local = Path(config).expanduser()
    try:
        pipe = StableDiffusionPipeline.from_single_file(
            str(path),
            config=str(local) if local.is_dir() else config,
            local_files_only=True,
            safety_checker=None,
            requires_safety_checker=False,
        )
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise InputError(
            f"{path}: cannot load the single-file checkpoint with config '{config}' ({_first_line(e)[:300]});"
            " the config must be a diffusers SD 1.x folder or a repo id in the local HF cache"
        ) from None
    return {"unet": pipe.unet, "vae": pipe.vae, "text_encoder": pipe.text_encoder, "tokenizer": pipe.tokenizer}


# The UNet of SD 1.4/1.5 and their fine-tunes (Realistic Vision, ...): for shapes, sizes and benchmarks.
SD15_UNET_CONFIG = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(320, 640, 1280, 1280),
    layers_per_block=2,
    cross_attention_dim=768,
    attention_head_dim=8,
    norm_num_groups=32,
)


def unet_shapes(which: str = "sd15") -> dict[str, torch.Size]:
    """Parameter name -> shape of the ``sd15`` or ``tiny`` UNet, built on the meta device (no memory, no weights)."""
    from diffusers import UNet2DConditionModel

    from fastimagic import tiny

    config = SD15_UNET_CONFIG if which == "sd15" else tiny.unet_config()
    with torch.device("meta"):
        unet = UNet2DConditionModel(**config)
    return {n: p.shape for n, p in unet.named_parameters()}
