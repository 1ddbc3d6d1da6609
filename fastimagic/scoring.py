"""Scores for keyframes: how well each follows its prompt, and how close it stays to the reference.

The paper (appendix 6.6) chooses a forgetting strategy by looking at the keyframes and says the choice "can also
be replaced by thresholds on metrics like CLIP score and LPIPS score". These are those metrics:

* **text alignment** (CLIP score): ``100 * max(cos(E_img(image), E_txt(prompt)), 0)`` with the projected,
  L2-normalised CLIP embeddings, as CLIPScore (Hessel et al., 2021) with the weight 100 that torchmetrics and most
  image-editing papers use (Hessel's ``w = 2.5`` gives 0.025 times this value). Higher = follows the prompt better.
  Typical values with CLIP ViT-L/14 on SD 1.5 images: 20-35.
* **fidelity** to the reference, one of two metrics, named in every score so a manifest can record it:

  - ``"lpips"``: LPIPS (Zhang et al., 2018) with the AlexNet backbone, both images resized to
    :data:`LPIPS_SIZE` square; 0 = identical, larger = more different (about 0.1-0.7). **Lower = more similar.**
    Used when the ``lpips`` package, torchvision and the AlexNet weights are all present locally (nothing is
    downloaded).
  - ``"clip_image"``: cosine similarity of the CLIP image embeddings of the keyframe and the reference, in
    ``[-1, 1]``; 1 = same embedding. **Higher = more similar.** The fallback everywhere else.

  :func:`fastimagic.picking.similarity_key` hides the direction.

``load_scorer("tiny")`` builds a tiny random CLIP offline for tests; its numbers are meaningless but finite and
deterministic.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from fastimagic.errors import InputError

DEFAULT_SCORER = "openai/clip-vit-large-patch14"
# A seed whose random text and image towers give positive cosines for ordinary prompts, so the tiny CLIP score
# (clamped at 0) varies between images instead of being 0 everywhere.
TINY_SCORER_SEED = 5
LPIPS_SIZE = 256
FIDELITY_METRICS = ("lpips", "clip_image")


def _embeddings(out) -> torch.Tensor:
    # transformers 4.x returns the projected embeddings as a tensor; 5.x returns an output object whose
    # pooler_output has been replaced by the projection.
    if isinstance(out, torch.Tensor):
        return out
    for name in ("image_embeds", "text_embeds", "pooler_output"):
        value = getattr(out, name, None)
        if isinstance(value, torch.Tensor):
            return value
    raise TypeError(f"unexpected CLIP features output: {type(out).__name__}")


def _lpips_tensor(images: Sequence[Image.Image], device: torch.device) -> torch.Tensor:
    # LPIPS takes RGB in [-1, 1]; a fixed square size keeps candidates of any shape comparable to the reference.
    arrays = [np.asarray(im.convert("RGB").resize((LPIPS_SIZE, LPIPS_SIZE), Image.BICUBIC)) for im in images]
    x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float()
    return (x / 127.5 - 1.0).to(device)


def load_lpips(device: torch.device | str = "cpu") -> tuple[torch.nn.Module | None, str]:
    """LPIPS (AlexNet) when everything it needs is already on this machine, else ``(None, why not)``.

    Needs the ``lpips`` package (its linear-layer weights ship inside it), an importable torchvision and
    torchvision's AlexNet ImageNet weights in the torch hub cache (``$TORCH_HOME/hub/checkpoints``). The weights
    are checked for before constructing LPIPS, which would otherwise download them.
    """
    try:
        import lpips
        from torchvision.models import AlexNet_Weights
    except Exception as e:  # torchvision can be present but broken (built for another torch)
        first = (str(e).splitlines() or [""])[0][:120]
        return None, f"lpips or torchvision is not importable ({type(e).__name__}: {first})"
    backbone = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(AlexNet_Weights.IMAGENET1K_V1.url))
    linear = os.path.join(os.path.dirname(lpips.__file__), "weights", "v0.1", "alex.pth")
    for path in (backbone, linear):
        if not os.path.isfile(path):
            return None, f"LPIPS weights are not present locally ({path})"
    net = lpips.LPIPS(net="alex", verbose=False)
    return net.eval().requires_grad_(False).to(device), "lpips"


@dataclass
class Scorer:
    """A CLIP model with its tokenizer and image processor on one device, plus LPIPS when available.

    ``lpips`` is any module called as ``lpips(x, y)`` on RGB batches in ``[-1, 1]`` returning ``[N, 1, 1, 1]``
    distances; ``None`` means fidelity is measured with CLIP image embeddings. Inference only, fp32, no grad.
    """

    model: torch.nn.Module
    tokenizer: object
    image_processor: object
    name: str
    device: torch.device = torch.device("cpu")
    lpips: torch.nn.Module | None = None
    batch_size: int = 16

    @property
    def fidelity_metric(self) -> str:
        """The fidelity metric this scorer reports: ``"lpips"`` or ``"clip_image"``."""
        return "clip_image" if self.lpips is None else "lpips"

    @torch.no_grad()
    def image_embeddings(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """L2-normalised CLIP image embeddings ``[len(images), D]`` (float32, on the CPU), in batches."""
        chunks = []
        for i in range(0, len(images), self.batch_size):
            batch = [im.convert("RGB") for im in images[i : i + self.batch_size]]
            pixels = self.image_processor(images=batch, return_tensors="pt")["pixel_values"]
            emb = _embeddings(self.model.get_image_features(pixel_values=pixels.to(self.device)))
            chunks.append(torch.nn.functional.normalize(emb.float(), dim=-1).cpu())
        return torch.cat(chunks) if chunks else torch.zeros(0, 1)

    @torch.no_grad()
    def text_embedding(self, prompt: str) -> torch.Tensor:
        """The L2-normalised CLIP embedding ``[D]`` of ``prompt`` (truncated to CLIP's 77 tokens)."""
        tokens = self.tokenizer([prompt], padding=True, truncation=True, max_length=77, return_tensors="pt")
        emb = _embeddings(
            self.model.get_text_features(
                input_ids=tokens["input_ids"].to(self.device), attention_mask=tokens["attention_mask"].to(self.device)
            )
        )
        return torch.nn.functional.normalize(emb.float(), dim=-1).cpu()[0]

    def text_alignment(self, images: Sequence[Image.Image], prompt: str) -> list[float]:
        """CLIP score of each image against ``prompt``: ``100 * max(cos(image, text), 0)``, in ``[0, 100]``."""
        if not images:
            return []
        cos = self.image_embeddings(images) @ self.text_embedding(prompt)
        return [100.0 * max(float(c), 0.0) for c in cos]

    @torch.no_grad()
    def fidelity(self, images: Sequence[Image.Image], reference: Image.Image) -> tuple[list[float], str]:
        """Fidelity of each image to ``reference`` and the metric used (see :attr:`fidelity_metric`).

        ``"lpips"``: LPIPS distance, lower = more similar. ``"clip_image"``: cosine similarity of CLIP image
        embeddings, higher = more similar (1.0 for the reference itself).
        """
        metric = self.fidelity_metric
        if not images:
            return [], metric
        if self.lpips is None:
            ref = self.image_embeddings([reference])[0]
            return [float(c) for c in self.image_embeddings(images) @ ref], metric
        ref = _lpips_tensor([reference], self.device)
        values: list[float] = []
        for i in range(0, len(images), self.batch_size):
            x = _lpips_tensor(images[i : i + self.batch_size], self.device)
            values.extend(float(v) for v in self.lpips(x, ref.expand_as(x)).reshape(-1))
        return values, metric

    def score(self, images: Sequence[Image.Image], prompt: str, reference: Image.Image) -> list[dict]:
        """Per-keyframe scores, in the order of ``images``: ``{"clip", "fidelity", "fidelity_metric"}``.

        Zip the result with the keyframe records (``record["scores"] = s``) to store it in a manifest and to pass
        the records to :func:`fastimagic.picking.pick`.
        """
        clip = self.text_alignment(images, prompt)
        fidelity, metric = self.fidelity(images, reference)
        return [{"clip": c, "fidelity": f, "fidelity_metric": metric} for c, f in zip(clip, fidelity)]


def _build_tiny(seed: int = TINY_SCORER_SEED):
    from transformers import CLIPConfig, CLIPModel

    try:
        from transformers import CLIPImageProcessorPil as ImageProcessor  # transformers 5: no torchvision needed
    except ImportError:  # transformers 4: the PIL-based processor has the plain name
        from transformers import CLIPImageProcessor as ImageProcessor

    from fastimagic import tiny

    tokenizer = tiny.clip_tokenizer()
    text_config = tiny.text_encoder_config(len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id)
    vision_config = dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=8
    )
    config = CLIPConfig(text_config=text_config, vision_config=vision_config, projection_dim=32)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIPModel(config)
    processor = ImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    return model, tokenizer, processor


def _load_pretrained(name: str, allow_pickle: bool = False):
    from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

    from fastimagic.models import refuse_pickle_weights

    refuse_pickle_weights(name, allow_pickle)
    try:
        model = CLIPModel.from_pretrained(name, use_safetensors=None if allow_pickle else True)
        tokenizer = AutoTokenizer.from_pretrained(name)
        # Picks the PIL image processor when torchvision is absent.
        processor = AutoImageProcessor.from_pretrained(name)
    except OSError as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise InputError(
            f"{name}: cannot load the CLIP scorer ({first}); download it once on a connected machine"
            f" (huggingface-cli download {name}) or use the scorer 'tiny'"
        ) from None
    return model, tokenizer, processor


def scorer_problem(name: str, allow_pickle: bool = False) -> str | None:
    """Why the CLIP scorer ``name`` cannot be loaded here, found without loading it (for checks before a run), or
    None: ``tiny`` always loads; a folder needs its ``config.json`` and, unless ``allow_pickle``, safetensors
    weights; a hub id must be in the local HF cache when downloads are off (``HF_HUB_OFFLINE``)."""
    if name == "tiny":
        return None
    from fastimagic.models import refuse_pickle_weights

    try:
        refuse_pickle_weights(name, allow_pickle)
    except InputError as e:
        return str(e)
    path = os.path.expanduser(name)
    if os.path.isabs(path) or os.path.isdir(path):
        return None if os.path.isfile(os.path.join(path, "config.json")) else f"{name}: not a CLIP model folder"
    from huggingface_hub import constants, try_to_load_from_cache

    cached = try_to_load_from_cache(name, "config.json")
    if isinstance(cached, str) or not constants.HF_HUB_OFFLINE:
        return None
    return (
        f"{name} is not in the local Hugging Face cache and downloads are off (HF_HUB_OFFLINE); download it once"
        f" (huggingface-cli download {name}), or set scorer: tiny or none"
    )


_CACHE: dict[tuple[str, str, str, bool], Scorer] = {}  # (name, device, fidelity, allow_pickle): ready scorers
_HOST: dict[tuple[str, str, bool], tuple] = {}  # (name, fidelity, allow_pickle): parts loaded ahead, in host memory
_CACHE_LOCK = threading.Lock()


def _host_parts(name: str, fidelity: str, allow_pickle: bool) -> tuple:
    """The scorer's parts, read and built in host memory: the CLIP model (float32, inference only), its tokenizer
    and image processor, and LPIPS (or None: see :func:`load_lpips`)."""
    if fidelity not in ("auto", *FIDELITY_METRICS):
        raise InputError(f"unknown fidelity metric '{fidelity}'; allowed: auto, {', '.join(FIDELITY_METRICS)}")
    model, tokenizer, processor = _build_tiny() if name == "tiny" else _load_pretrained(name, allow_pickle)
    net = None
    if fidelity != "clip_image":
        net, why = load_lpips("cpu")
        if net is None and fidelity == "lpips":
            raise InputError(f"LPIPS was asked for but cannot be used: {why}")
    return model.float().eval().requires_grad_(False), tokenizer, processor, net


def load_scorer(
    name: str = DEFAULT_SCORER, device: str | torch.device | None = None, fidelity: str = "auto",
    allow_pickle: bool = False,
) -> Scorer:
    """The CLIP scorer ``name`` on ``device``, loaded once per process and reused (taken from what
    :func:`prefetch_scorer` loaded ahead, if it did).

    ``name``: a Hugging Face repo id or local folder of a CLIP model (HF cache honoured, ``HF_HUB_OFFLINE``
    respected; a missing model raises :class:`InputError`), or ``"tiny"`` for a seeded random CLIP built offline.
    ``device``: default CUDA, else MPS, else CPU. ``fidelity``: ``"auto"`` (LPIPS when available locally, else
    CLIP image similarity), ``"lpips"`` (raise :class:`InputError` when unavailable) or ``"clip_image"``.
    ``allow_pickle``: load pickle weights (``pytorch_model.bin``) too; by default only safetensors, as for models.
    """
    from fastimagic.models import pick_device

    dev = pick_device(device)[0]
    key = (name, str(dev), fidelity, allow_pickle)
    with _CACHE_LOCK:
        if key in _CACHE:
            return _CACHE[key]
        parts = _HOST.pop((name, fidelity, allow_pickle), None) or _host_parts(name, fidelity, allow_pickle)
        model, tokenizer, processor, net = parts
        scorer = Scorer(
            model=model.to(dev),
            tokenizer=tokenizer,
            image_processor=processor,
            name=name,
            device=dev,
            lpips=None if net is None else net.to(dev),
        )
        _CACHE[key] = scorer
        return scorer


def prefetch_scorer(
    name: str = DEFAULT_SCORER, device: str | torch.device | None = None, fidelity: str = "auto",
    allow_pickle: bool = False,
) -> None:
    """Load the scorer :func:`load_scorer` will be asked for, ahead, so that its first caller (a render unit, which
    holds the device meanwhile) does not read and build it: CLIP ViT-L/14 is 1.7 GB of float32 weights, 2.5 s to
    load from a warm page cache and 4.2 s from a cold one on a 2-core CPU host (measured, random weights). On the
    CPU that is the scorer itself; on an accelerator its parts wait in host memory and the first :func:`load_scorer`
    for that device copies them there, so the device holds no scorer before one is needed (a fine-tune's peak
    memory counts without it). A load that fails here fails again, and is reported, where the scorer is needed."""
    from fastimagic.models import pick_device

    dev = pick_device(device)[0]
    if dev.type == "cpu":
        load_scorer(name, dev, fidelity, allow_pickle)
        return
    with _CACHE_LOCK:  # a load_scorer meanwhile waits for this load instead of making its own
        if (name, str(dev), fidelity, allow_pickle) not in _CACHE and (name, fidelity, allow_pickle) not in _HOST:
            _HOST[(name, fidelity, allow_pickle)] = _host_parts(name, fidelity, allow_pickle)
