"""Base models: load a Stable Diffusion 1.x, 2.x or SDXL model (UNet, VAE, text encoder(s) + tokenizer(s), DDIM).

Which family a model belongs to (:mod:`fastimagic.families`) is read from the model itself: the UNet's config for
diffusers folders and repo ids, the safetensors header for single files. Where a model can come from, as a user
writes it in ``model:``:

* ``tiny``, ``tiny-sd2``, ``tiny-sdxl``: the built-in seeded random models (:mod:`fastimagic.tiny`).
* a Hugging Face repo id, e.g. ``stable-diffusion-v1-5/stable-diffusion-v1-5``,
  ``stabilityai/stable-diffusion-2-1`` or ``stabilityai/stable-diffusion-xl-base-1.0``: loaded with
  ``from_pretrained``; the local HF cache is used and ``HF_HUB_OFFLINE=1`` is honoured.
* a local diffusers folder (``model_index.json``, ``unet/``, ``vae/``, ``text_encoder/``, ``tokenizer/``, and
  ``text_encoder_2/``, ``tokenizer_2/`` for SDXL).
* a single-file ``.safetensors`` checkpoint in the original layout (community fine-tunes such as Realistic Vision
  or RealVisXL). diffusers' single-file loader needs the model's configs and tokenizers: ``config`` names a local
  diffusers folder or a repo id already in the HF cache (default: the family's base repo id, e.g. SDXL base's),
  so it works offline. SDXL refiners, inpainting models, SD 3 and FLUX are refused by name.

Pickle checkpoints (``.ckpt``, ``.pt``, ``.pth``, ``.bin``) can run arbitrary code when loaded, so they are refused
unless ``allow_pickle=True``.
"""

from __future__ import annotations

import hashlib
import inspect
import json
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
from fastimagic.families import FAMILIES, SD1, SUPPORTED, TINY_FAMILIES, UNSUPPORTED, Family
from fastimagic.precision import Precision, precision_for_dtype, resolve_precision, store_unet

DEFAULT_SINGLE_FILE_CONFIG = SD1.config_repo
PREDICTION_TYPES = ("epsilon", "v_prediction")


def make_scheduler(prediction_type: str = "epsilon"):
    """The DDIM scheduler SD 1.x, 2.x and SDXL were trained with: scaled-linear betas 0.00085-0.012, no sample
    clipping; ``prediction_type``: ``epsilon`` (noise) or ``v_prediction`` (velocity, SD 2.0/2.1 768 px)."""
    from diffusers import DDIMScheduler

    if prediction_type not in PREDICTION_TYPES:
        raise InputError(f"prediction type {prediction_type!r} is not supported; one of {', '.join(PREDICTION_TYPES)}")
    return DDIMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type=prediction_type,
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


def copy_to_host(value: torch.Tensor) -> tuple[torch.Tensor, object]:
    """A copy of ``value`` on the host that does not wait for the device (through pinned memory), and the event to
    wait on before reading it (None off CUDA, where the copy is done when this returns). Copies on one stream end
    in order: waiting for the last one's event waits for all."""
    if value.device.type != "cuda":
        return value.cpu(), None
    host = torch.empty(value.shape, dtype=value.dtype, pin_memory=True)
    host.copy_(value, non_blocking=True)
    done = torch.cuda.Event()
    done.record(torch.cuda.current_stream(value.device))
    return host, done


@dataclass
class Components:
    """The frozen components of a Stable Diffusion model of any family, on one device.

    The UNet's compute runs under autocast in ``precision.compute_dtype``; its convolution and linear weights are
    stored in that dtype (:func:`fastimagic.precision.store_unet`); whatever a fine-tune trains gets float32 working
    copies meanwhile (:func:`fastimagic.precision.float32_working`), and an applied tuning is added in float32 and
    rounded once to the stored dtype (:func:`fastimagic.precision.apply_deltas`). ``compiled``: ``off`` or
    ``regional`` (:func:`compile_unet`). The text
    encoders are stored in ``dtype`` (the precision's frozen dtype), the VAE too where the family's VAE does not
    overflow in it (SDXL's: float32). ``identity`` names
    the weights for tuning content keys. ``family``: what kind of model it is (:mod:`fastimagic.families`);
    ``text_encoder_2`` / ``tokenizer_2``: SDXL's second encoder (OpenCLIP bigG with projection).
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
    # The Editor kept open on this model between renders (fastimagic.editor.applied), or None: base weights.
    applied: object | None = field(default=None, repr=False, compare=False)
    family: Family = SD1
    text_encoder_2: torch.nn.Module | None = None
    tokenizer_2: object | None = None
    # How the UNet's sampling calls are compiled: "off" or "regional" (:func:`compile_unet`).
    compiled: str = "off"
    # Shapes a throwaway fine-tune step or sampling step has built the device's plans for, on the device's thread
    # (tasks.pipeline.prime: a GPU's cold start, paid ahead): ("finetune", width, height, batch, blocks,
    # checkpointing), ("sample", width, height, images per call).
    primed: set[tuple] = field(default_factory=set, repr=False, compare=False)

    def eager(self):
        """A context in which a compiled UNet runs uncompiled (the fine-tune: training graphs would cost minutes of
        compilation for one use); a no-op for an uncompiled one."""
        import contextlib

        return torch.compiler.set_stance("force_eager") if self.compiled != "off" else contextlib.nullcontext()

    @property
    def latent_scale(self) -> float:
        return float(getattr(self.vae.config, "scaling_factor", 0.18215))

    @property
    def prediction_type(self) -> str:
        """What the UNet predicts: ``epsilon`` (noise) or ``v_prediction`` (velocity), from its scheduler config."""
        return self.scheduler.config.prediction_type

    @property
    def default_resolution(self) -> int:
        """The side the model was trained at: 512 (SD 1.x, SD 2 base), 768 (SD 2.0/2.1), 1024 (SDXL), 64 (tiny)."""
        return int(self.unet.config.sample_size) * 8

    @property
    def pooled_dim(self) -> int:
        """Width of the pooled text vector (SDXL: 1280) inside the packed embedding; 0 for families without one."""
        return int(self.text_encoder_2.config.projection_dim) if self.family.pooled else 0

    def unet_inputs(self, embeddings: torch.Tensor, time_ids: torch.Tensor | None = None) -> dict:
        """The UNet's conditioning keywords for packed ``embeddings`` ``[n, tokens, C]``: ``encoder_hidden_states``,
        and for SDXL ``added_cond_kwargs`` (the pooled vector and ``time_ids`` ``[1 or n, 6]``, see
        :meth:`fastimagic.families.Family.time_ids`)."""
        tokens, pooled = self.family.split(embeddings, self.pooled_dim)
        if pooled is None:
            return {"encoder_hidden_states": tokens}
        if time_ids is None:
            raise ValueError(f"{self.family.label} needs time ids (original size, crop, target size)")
        ids = time_ids.to(device=tokens.device, dtype=tokens.dtype).expand(tokens.shape[0], -1)
        return {"encoder_hidden_states": tokens, "added_cond_kwargs": {"text_embeds": pooled, "time_ids": ids}}

    def autocast(self):
        """The autocast context for UNet compute (a no-op for fp32 and tf32)."""
        enabled = self.precision.autocast and self.device.type in ("cuda", "cpu", "mps")
        return torch.autocast(self.device.type, dtype=self.precision.compute_dtype, enabled=enabled)

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        """Text embeddings ``[len(prompts), 77, C]`` (float32) for ``prompts``, padded to the max length.

        SDXL: both encoders' penultimate hidden states, concatenated on the channels, and the pooled vector packed
        as one more row, ``[n, 78, C]`` (:mod:`fastimagic.families`); an empty prompt gives zeros, as SDXL base's
        pipeline does for the unconditional embedding.
        """
        pairs = [(self.tokenizer, self.text_encoder), (self.tokenizer_2, self.text_encoder_2)]
        states, pooled = [], None
        for tokenizer, encoder in pairs[: len(self.family.text_encoders)]:
            ids = tokenizer(
                prompts,
                padding="max_length",
                max_length=tokenizer.model_max_length,
                truncation=True,
                return_tensors="pt",
            ).input_ids.to(self.device)
            if self.family.text_hidden == "last":
                states.append(encoder(ids)[0].float())
                continue
            out = encoder(ids, output_hidden_states=True)
            states.append(out.hidden_states[-2].float())
            pooled = out[0].float()  # the last encoder's projected pooled output (SDXL: bigG's text_embeds)
        packed = self.family.pack(torch.cat(states, dim=-1), pooled)
        if self.family.zero_empty_prompt:
            packed[[i for i, p in enumerate(prompts) if not p]] = 0.0
        return packed

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


def model_identity(spec: str, *, allow_pickle: bool = False, vae: str | None = None) -> str:
    """The identity of the weights ``spec`` names, without loading them (cheap: for tuning content keys).

    ``tiny:v1``; ``file:<name>:<fingerprint>``; ``folder:<name>:<hash of configs and weight fingerprints>``;
    ``hf:<repo>@<cached commit>``; with a ``vae`` override, ``+vae:<its identity>`` follows. Raises
    :class:`InputError` for missing paths and refused pickle files.
    """
    if vae is not None:
        return f"{model_identity(spec, allow_pickle=allow_pickle)}+vae:{_vae_identity(vae, allow_pickle)}"
    if spec in TINY_FAMILIES:
        from fastimagic import tiny

        return tiny.IDENTITIES[spec]
    path = Path(spec).expanduser()
    _refuse_pickle_file(spec, path, allow_pickle)
    if path.is_file():
        return f"file:{path.name}:{fingerprint(path)}"
    if path.is_dir():
        if not (path / "model_index.json").is_file() and not (path / "unet").is_dir():
            raise InputError(f"{spec}: not a diffusers model folder (no model_index.json or unet/)")
        _refuse_pickle_folder(spec, path, allow_pickle)
        return _folder_identity(path)
    try:
        kind = model_kind(spec)
    except ValueError as e:
        raise InputError(str(e)) from None
    if kind != "hub":
        raise InputError(f"{spec}: model path does not exist (expected a diffusers folder or a .safetensors file)")
    snapshot = _hub_snapshot(spec)
    if snapshot is not None:
        _refuse_pickle_folder(spec, snapshot, allow_pickle)
    return _hub_identity(spec)


def _vae_identity(spec: str, allow_pickle: bool = False) -> str:
    """A ``vae:`` override's identity, refusing pickle weights as for models (``allow_pickle`` covers both)."""
    path = Path(spec).expanduser()
    _refuse_pickle_vae(spec, path, allow_pickle)
    if path.is_dir():
        if not (path / "config.json").is_file() and not (path / "vae" / "config.json").is_file():
            raise InputError(f"vae: {spec}: not a diffusers VAE folder (no config.json or vae/config.json)")
        return _folder_identity(path)
    if path.is_file():
        return f"file:{path.name}:{fingerprint(path)}"
    try:
        kind = model_kind(spec)
    except ValueError as e:
        raise InputError(f"vae: {e}") from None
    if kind != "hub":
        raise InputError(f"vae: {spec}: no such folder (expected a diffusers VAE folder or a hub repo id)")
    snapshot = _hub_snapshot(spec)
    if snapshot is not None:
        _refuse_pickle_vae(spec, snapshot, allow_pickle)
    return _hub_identity(spec)


def _refuse_pickle_vae(spec: str, path: Path, allow_pickle: bool) -> None:
    """A VAE file, or folder (weights at the top or in ``vae/``), of pickle weights only: refused unless
    ``allow_pickle``, as a model's are (:func:`_refuse_pickle_file`, :func:`_refuse_pickle_folder`)."""
    try:
        _refuse_pickle_file(spec, path, allow_pickle)
        if path.is_dir():
            weights = path / "vae" if (path / "vae").is_dir() else path
            _refuse_pickle_folder(spec, weights.parent, allow_pickle, parts=(weights.name,))
    except InputError as e:
        raise InputError(f"vae: {e}") from None


def model_family(spec: str, *, allow_pickle: bool = False) -> Family:
    """The family of the model ``spec`` names, without loading it (cheap: for content keys and checks before a
    run): a tiny model's own, a single file's from its header, a folder's or cached repo's from ``unet/config.json``.
    Raises :class:`InputError` as :func:`model_identity` does, and for a refused architecture."""
    model_identity(spec, allow_pickle=allow_pickle)  # the same refusals, first
    if spec in TINY_FAMILIES:
        return TINY_FAMILIES[spec]
    path = Path(spec).expanduser()
    if path.is_file():
        return SD1 if path.suffix.lower() in PICKLE_SUFFIXES else _check_single_file(path)
    from fastimagic.families import family_of_unet

    try:
        if path.is_dir():
            config = json.loads((path / "unet" / "config.json").read_text())
        else:
            from huggingface_hub import hf_hub_download

            try:
                config = json.loads(Path(hf_hub_download(spec, "unet/config.json", local_files_only=True)).read_text())
            except Exception:
                return SD1  # not in the cache: loading it will say so; until then, the name is all there is
    except (OSError, ValueError) as e:
        raise InputError(f"{spec}: cannot read the UNet's config ({_first_line(e)})") from None
    _check_unet(spec, config)
    return family_of_unet(config)


_COMPONENTS = ("unet", "vae", "text_encoder")


def _refuse_pickle_file(spec: str, path: Path, allow_pickle: bool) -> None:
    """A pickle checkpoint (``.ckpt``, ``.bin``...) can run code when loaded: refused unless ``allow_pickle``."""
    if path.suffix.lower() in PICKLE_SUFFIXES and not allow_pickle:
        raise InputError(
            f"{spec}: pickle checkpoints ({', '.join(PICKLE_SUFFIXES)}) can run code when loaded;"
            " convert it to .safetensors or allow it explicitly (allow_pickle: true)"
        )


def _refuse_pickle_folder(
    spec: str, folder: Path, allow_pickle: bool, parts: tuple[str, ...] = _COMPONENTS
) -> None:
    """A diffusers folder (or hub snapshot) whose weights for some component (of ``parts``) are only pickle files
    (``.bin``...) would run code when loaded: refused unless ``allow_pickle``. (Loading also asks for safetensors
    only.)"""
    if allow_pickle:
        return
    pickled = []
    for part in parts:
        files = [p for p in (folder / part).glob("*") if p.is_file()] if (folder / part).is_dir() else []
        pickle_only = not any(p.suffix == ".safetensors" for p in files)
        if pickle_only and any(p.suffix.lower() in PICKLE_SUFFIXES for p in files):
            pickled.append(part)
    if pickled:
        raise InputError(
            f"{spec}: the weights of {', '.join(pickled)} are pickle files ({', '.join(PICKLE_SUFFIXES)}), which can"
            " run code when loaded; convert them to .safetensors or allow it explicitly (allow_pickle: true)"
        )


def refuse_pickle_weights(spec: str, allow_pickle: bool) -> None:
    """For a transformers model (the CLIP scorer, the BLIP captioner): a local folder, or a cached hub snapshot,
    whose weights are only pickle files is refused unless ``allow_pickle`` (loading also asks for safetensors)."""
    if allow_pickle or spec == "tiny":
        return
    path = Path(os.path.expanduser(spec))
    folder = path if path.is_dir() else None if path.is_absolute() else _hub_snapshot(spec)
    if folder is not None:
        _refuse_pickle_folder(spec, folder.parent, allow_pickle, parts=(folder.name,))


def _hub_snapshot(repo_id: str) -> Path | None:
    """The cached snapshot folder of a hub repo, None when it is not cached (nothing is downloaded)."""
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id, local_files_only=True))
    except Exception:  # noqa: BLE001 - not cached, or no hub library: nothing to inspect
        return None


def load_base_model(
    spec: str,
    *,
    config: str | None = None,
    device: str | None = None,
    dtype: str | torch.dtype | None = None,
    precision: str = "auto",
    allow_pickle: bool = False,
    vae: str | None = None,
    compile: str | None = None,
) -> Components:
    """Load a Stable Diffusion base model of any family from ``spec`` (a tiny name, repo id, diffusers folder or
    single file); the family is read from the model (UNet config or checkpoint header).

    ``config``: for single-file checkpoints, the diffusers folder or cached repo id that supplies configs and the
    tokenizers (default: the family's base repo, e.g. :data:`DEFAULT_SINGLE_FILE_CONFIG` for SD 1.x).
    ``device``/``dtype``/``precision``: see :func:`pick_device` and :mod:`fastimagic.precision`; the result's
    ``precision`` records the resolved one. ``vae``: a diffusers VAE (folder, or repo id in the cache) replacing the
    model's, e.g. a float16-safe SDXL VAE; it then runs in the precision's dtype unless its config says
    ``force_upcast: true`` (the model's own SDXL VAE runs in float32, as it overflows in float16). ``compile``:
    ``off`` or ``regional`` (:func:`compile_unet`), default ``$FASTIMAGIC_COMPILE`` (off). Raises
    :class:`InputError` for a missing path, a refused pickle file, a checkpoint of an unsupported architecture or an
    unknown compile setting.
    """
    compile = compile_setting(compile)
    dev = _pick(device)
    resolved = resolve_precision(_precision_name(precision, dtype), dev)
    identity = model_identity(spec, allow_pickle=allow_pickle, vae=vae)
    path = Path(spec).expanduser()
    if spec in TINY_FAMILIES:
        from fastimagic import tiny

        parts = tiny.build_components(name=spec) | {"family": TINY_FAMILIES[spec]}
    elif path.is_file():
        parts = _load_single_file(path, config)
    elif path.is_dir():
        parts = _load_pretrained(str(path), local_only=True, allow_pickle=allow_pickle)
    else:
        parts = _load_pretrained(spec, local_only=False, allow_pickle=allow_pickle)
    if vae is not None:
        parts["vae"] = _load_vae(vae, allow_pickle)
    model = _assemble(parts, identity, dev, resolved, fixed_vae=vae is not None)
    compile_unet(model, compile)
    return model


# Compiling the UNet for sampling, a worker setting (docs/performance.md, "Compilation").
COMPILE_ENV = "FASTIMAGIC_COMPILE"
COMPILE_CACHE_ENV = "FASTIMAGIC_COMPILE_CACHE"
COMPILE_MODES = ("off", "regional")
# The UNet's repeated blocks (diffusers' own list for regional compilation, UNet2DConditionModel._repeated_blocks,
# plus the ResNet blocks, where GroupNorm, SiLU and the float32 round trips of autocast fuse into one kernel).
COMPILED_BLOCKS = ("BasicTransformerBlock", "ResnetBlock2D")
# A compiled UNet sees batches of these sizes only (sampler pads a short last chunk up to one): with fixed shapes,
# each size is one set of graphs, compiled once per process and then read from the on-disk cache.
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)


def compile_setting(value: str | None = None) -> str:
    """``value`` (default ``$FASTIMAGIC_COMPILE``) as one of :data:`COMPILE_MODES`; ``1``/``on``/``true`` mean
    ``regional``, empty/``0``/``false`` mean ``off``. Anything else: :class:`InputError`, one line."""
    given = os.environ.get(COMPILE_ENV, "") if value is None else value
    name = {"": "off", "0": "off", "false": "off", "no": "off", "1": "regional", "on": "regional",
            "true": "regional", "yes": "regional"}.get(given.strip().lower(), given.strip().lower())
    if name not in COMPILE_MODES:
        where = COMPILE_ENV if value is None else "compile"
        raise InputError(f"{where}: unknown setting {given!r}; allowed: off, regional (or 0/1)")
    return name


def compile_unet(
    model: Components, setting: str = "regional", *, backend: str | object = "inductor", mode: str | None = None
) -> None:
    """Compile ``model``'s UNet for sampling, in place, region by region (``setting``: ``regional``; ``off`` does
    nothing).

    Each of the UNet's repeated blocks (:data:`COMPILED_BLOCKS`) is compiled with ``nn.Module.compile`` (as
    diffusers' ``compile_repeated_blocks`` does): instances of one block class share their graphs, so a process
    compiles a few dozen small graphs in seconds to a minute instead of the whole UNet in minutes, and parameter
    names do not change (tunings and forgetting address them by name; weights are graph inputs, so their in-place
    edits are seen). Shapes are static: the sampler pads batches to :data:`BATCH_BUCKETS`. The compiled artefacts
    go to inductor's on-disk cache, ``$FASTIMAGIC_COMPILE_CACHE`` (default ``~/.cache/fastimagic/torch-compile``
    unless ``TORCHINDUCTOR_CACHE_DIR`` is set), so a second process or a restarted worker compiles from the cache.
    The fine-tune runs uncompiled (:meth:`Components.eager`). ``backend``, ``mode``: torch.compile's (tests count
    graphs with a counting backend; ``benchmarks/gpu.py --compile-mode`` tries others).
    """
    if compile_setting(setting) == "off":
        return
    import torch._dynamo

    cache = os.environ.get(COMPILE_CACHE_ENV)
    if cache:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache
    else:
        os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(Path.home() / ".cache" / "fastimagic" / "torch-compile"))
    # One graph per (block shape, batch bucket): SD 1.5's ResNet blocks alone have ~15 shapes.
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, max(256, getattr(torch._dynamo.config, name)))
    if hasattr(torch._dynamo.config, "accumulated_recompile_limit"):
        torch._dynamo.config.accumulated_recompile_limit = max(4096, torch._dynamo.config.accumulated_recompile_limit)
    blocks = [m for m in model.unet.modules() if type(m).__name__ in COMPILED_BLOCKS]
    for block in blocks:
        block.compile(backend=backend, dynamic=False, mode=mode)
    model.compiled = "regional"


# Base models a process keeps loaded, least recently used out: one by default (an SD UNet and its encoders take
# several GB of GPU memory); a worker with room for more sets FASTIMAGIC_WARM_MODELS.
WARM_MODELS_ENV = "FASTIMAGIC_WARM_MODELS"
_WARM: LruCache[Components] = LruCache(max(1, int(os.environ.get(WARM_MODELS_ENV) or 1)))
_log = logging.getLogger(__name__)


def cached_base_model(spec: str, **options) -> Components:
    """:func:`load_base_model` (same keyword arguments), once per process and model: workers keep base models warm.

    At most ``$FASTIMAGIC_WARM_MODELS`` models (default 1) stay loaded, least recently used out; two threads asking
    for the same model at once load it once.
    """
    identity = model_identity(spec, allow_pickle=options.get("allow_pickle", False), vae=options.get("vae"))
    options["compile"] = compile_setting(options.get("compile"))  # the worker's setting is part of the key
    call = inspect.signature(load_base_model).bind(spec, **options)
    call.apply_defaults()  # the same model whether a caller spells out a default or leaves it out
    key = (identity, *sorted((k, str(v)) for k, v in call.arguments.items() if k != "spec"))

    def load() -> Components:
        started = time.perf_counter()
        model = load_base_model(spec, **options)
        _log.info("loaded base model %s in %.1f s", identity, time.perf_counter() - started)
        return model

    return _WARM.get(key, load)


def _assemble(
    parts: dict, identity: str, device: torch.device, precision: Precision, *, fixed_vae: bool = False
) -> Components:
    dtype = precision.frozen_dtype
    family: Family = parts.get("family", SD1)
    unet, vae, text_encoder = parts["unet"], parts["vae"], parts["text_encoder"]
    text_encoder_2 = parts.get("text_encoder_2")
    # The SDXL VAE's activations overflow float16 (NaN images): it runs in float32 unless a fixed VAE was given
    # whose config does not ask for float32 (``force_upcast``: false in the fp16-fix VAE, true in SDXL's own).
    fp16_safe = family.vae_fp16 or (fixed_vae and not getattr(vae.config, "force_upcast", True))
    vae_dtype = dtype if fp16_safe or dtype != torch.float16 else torch.float32
    encoders = [(text_encoder, dtype)] + ([(text_encoder_2, dtype)] if text_encoder_2 is not None else [])
    for m, want in ((unet, torch.float32), (vae, vae_dtype), *encoders):
        m.requires_grad_(False)
        m.eval()
        if next(m.parameters()).dtype != want:  # casting a model to the dtype it has makes diffusers warn
            m.to(dtype=want)
        m.to(device)
    store_unet(unet, precision)  # fp16/bf16: convolutions and linears in the compute dtype, as autocast uses them
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
        scheduler=make_scheduler(parts.get("prediction_type", "epsilon")),
        identity=identity,
        device=device,
        dtype=dtype,
        precision=precision,
        family=family,
        text_encoder_2=text_encoder_2,
        tokenizer_2=parts.get("tokenizer_2"),
    )


def _load_pretrained(source: str, *, local_only: bool, allow_pickle: bool = False) -> dict:
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    from fastimagic.families import family_of_unet

    # huggingface_hub itself honours HF_HUB_OFFLINE and the local cache (HF_HOME / HF_HUB_CACHE).
    kw = {"local_files_only": True} if local_only else {}
    weights = {} if allow_pickle else {"use_safetensors": True}  # never fall back to a pickle .bin on its own
    try:
        unet = UNet2DConditionModel.from_pretrained(source, subfolder="unet", **kw, **weights)
        family = family_of_unet(dict(unet.config))
        _check_unet(source, unet.config)
        parts = {
            "family": family,
            "unet": unet,
            "vae": AutoencoderKL.from_pretrained(source, subfolder="vae", **kw, **weights),
            "text_encoder": CLIPTextModel.from_pretrained(source, subfolder="text_encoder", **kw, **weights),
            "tokenizer": CLIPTokenizer.from_pretrained(source, subfolder="tokenizer", **kw),
            "prediction_type": DDIMScheduler.load_config(source, subfolder="scheduler", **kw).get(
                "prediction_type", "epsilon"
            ),
        }
        if family.pooled:
            parts["text_encoder_2"] = CLIPTextModelWithProjection.from_pretrained(
                source, subfolder="text_encoder_2", **kw, **weights
            )
            parts["tokenizer_2"] = CLIPTokenizer.from_pretrained(source, subfolder="tokenizer_2", **kw)
    except OSError as e:
        raise InputError(
            f"{source}: cannot load the model ({_first_line(e)}); give a diffusers folder, a .safetensors file,"
            " or a repo id present in the HF cache (HF_HUB_OFFLINE=1 forbids downloads)"
        ) from None
    _check_added_embedding(source, parts)
    return parts


def _check_unet(source: object, config) -> None:
    """Refuse UNets the method does not apply to, by name: inpainting (9 input channels) and the like."""
    if config.get("in_channels", 4) != 4:
        raise InputError(
            f"{source}: the UNet takes {config['in_channels']} input channels (an inpainting or instruct model);"
            f" fastimagic supports {SUPPORTED}, which take 4"
        )


def _check_added_embedding(source: object, parts: dict) -> None:
    """An SDXL-family UNet whose added embedding does not take the pooled vector and six time ids is a refiner
    (five: its aesthetic score replaces the target size)."""
    unet, encoder = parts["unet"], parts.get("text_encoder_2")
    if not parts["family"].pooled or encoder is None:
        return
    config = unet.config
    expected = 6 * config.addition_time_embed_dim + encoder.config.projection_dim
    if config.projection_class_embeddings_input_dim != expected:
        raise InputError(f"{source}: this is {UNSUPPORTED['sdxl-refiner']}; fastimagic supports {SUPPORTED}")


def _load_vae(spec: str, allow_pickle: bool = False):
    from diffusers import AutoencoderKL

    path = Path(spec).expanduser()
    weights = {} if allow_pickle else {"use_safetensors": True}  # as for models: never a pickle .bin on its own
    try:
        if path.is_file():
            return AutoencoderKL.from_single_file(str(path), local_files_only=True)
        local = path.is_dir()
        source = str(path) if local else spec
        sub = {"subfolder": "vae"} if local and (path / "vae").is_dir() else {}
        return AutoencoderKL.from_pretrained(source, local_files_only=local, **sub, **weights)
    except (OSError, ValueError) as e:
        raise InputError(f"vae: cannot load '{spec}' ({_first_line(e)}); give a diffusers VAE folder or repo id")\
            from None


_CONTEXT_KEY = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"


def describe_checkpoint(path: str | Path) -> dict:
    """Classify a single-file checkpoint from its safetensors header alone (no tensor is read).

    Returns ``{"family", "cross_attention_dim", "has_vae", "has_text_encoder", "in_channels"}``. ``family`` is a
    family of :mod:`fastimagic.families` (``sd1``, ``sd2``, ``sdxl``), a refused architecture (``sdxl-refiner``,
    ``sd3``, ``flux``) or ``unknown``. The cross-attention width (768 for SD 1.x, 1024 for SD 2.x, 2048 for
    SDXL, 1280 for the SDXL refiner) comes from the first ``attn2.to_k`` shape; ``in_channels`` is 9 for
    inpainting models.
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
    clip_l = any(k.startswith("conditioner.embedders.0.transformer.") for k in keys)
    if any("joint_blocks." in k for k in keys):
        family = "sd3"
    elif any("double_blocks." in k or "single_blocks." in k for k in keys):
        family = "flux"
    elif not unet:
        family = "unknown"
    elif embedders or any(k.startswith("model.diffusion_model.label_emb") for k in keys) or dim in (2048, 1280):
        # The refiner has only the bigG encoder (embedders.0 is OpenCLIP) and 1280-channel cross-attention.
        family = "sdxl-refiner" if dim == 1280 or (embedders and not clip_l) else "sdxl"
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


def _check_single_file(path: Path) -> Family:
    """The family of a single-file checkpoint, from its header; refuses, by name, what the method does not support
    before handing it to diffusers (which guesses a model type for anything)."""
    try:
        info = describe_checkpoint(path)
    except Exception as e:
        raise InputError(f"{path}: not a readable .safetensors checkpoint ({e})") from None
    if info["family"] in UNSUPPORTED:
        raise InputError(f"{path}: this is {UNSUPPORTED[info['family']]}; fastimagic supports {SUPPORTED}")
    if info["family"] not in FAMILIES:
        raise InputError(f"{path}: not a Stable Diffusion checkpoint (no SD UNet weights found); {SUPPORTED} work")
    family = FAMILIES[info["family"]]
    if info["in_channels"] not in (None, 4):
        _check_unet(path, {"in_channels": info["in_channels"]})
    if not (info["has_vae"] and info["has_text_encoder"]):
        raise InputError(
            f"{path}: checkpoint lacks its VAE or text encoder; give a full {family.label} checkpoint"
        )
    return family


def _load_single_file(path: Path, config: str | None) -> dict:
    import diffusers

    if path.suffix.lower() not in PICKLE_SUFFIXES:
        family = _check_single_file(path)
    else:
        family = SD1  # a pickle cannot be inspected without loading it; the config decides
    config = config or family.config_repo
    local = Path(config).expanduser()
    pipeline = getattr(diffusers, family.single_file_pipeline)
    extra = {"safety_checker": None, "requires_safety_checker": False} if not family.pooled else {}
    try:
        pipe = pipeline.from_single_file(
            str(path), config=str(local) if local.is_dir() else config, local_files_only=True, **extra
        )
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise InputError(
            f"{path}: cannot load the single-file checkpoint with config '{config}' ({_first_line(e)[:300]});"
            f" the config must be a diffusers {family.label} folder or a repo id in the local HF cache"
        ) from None
    parts = {
        "family": family,
        "unet": pipe.unet,
        "vae": pipe.vae,
        "text_encoder": pipe.text_encoder,
        "tokenizer": pipe.tokenizer,
        "prediction_type": pipe.scheduler.config.get("prediction_type", "epsilon"),
    }
    if family.pooled:
        parts |= {"text_encoder_2": pipe.text_encoder_2, "tokenizer_2": pipe.tokenizer_2}
    _check_added_embedding(path, parts)
    return parts


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


# SD 2.0/2.1 (768 px, velocity): SD 1.x's levels, linear projections, OpenCLIP ViT-H's 1024 channels.
SD2_UNET_CONFIG = SD15_UNET_CONFIG | dict(
    sample_size=96, cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20), use_linear_projection=True
)

# SDXL base 1.0 (and its fine-tunes: RealVisXL, Juggernaut XL, ...).
SDXL_UNET_CONFIG = dict(
    sample_size=128,
    in_channels=4,
    out_channels=4,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(320, 640, 1280),
    layers_per_block=2,
    transformer_layers_per_block=(1, 2, 10),
    attention_head_dim=(5, 10, 20),
    use_linear_projection=True,
    cross_attention_dim=2048,
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
    norm_num_groups=32,
)



def unet_config(which: str) -> dict:
    """The diffusers UNet config of ``which``, one of :data:`fastimagic.families.UNET_ARCHS` (``sd15``, ``sd2``,
    ``sdxl``, ``tiny``, ``tiny-sd2``, ``tiny-sdxl``)."""
    from fastimagic import tiny

    configs = {
        "sd15": SD15_UNET_CONFIG,
        "sd2": SD2_UNET_CONFIG,
        "sdxl": SDXL_UNET_CONFIG,
        "tiny": tiny.unet_config(),
        "tiny-sd2": tiny.sd2_unet_config(),
        "tiny-sdxl": tiny.sdxl_unet_config(),
    }
    if which not in configs:
        raise InputError(f"unknown UNet '{which}'; one of {', '.join(configs)}")
    return configs[which]


def unet_shapes(which: str = "sd15") -> dict[str, torch.Size]:
    """Parameter name -> shape of a UNet of :data:`fastimagic.families.UNET_ARCHS`, built on the meta device (no
    memory, no weights)."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**unet_config(which))
    return {n: p.shape for n, p in unet.named_parameters()}
