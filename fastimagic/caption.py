"""Source prompt (paper §3.2): a BLIP caption of the reference image, the starting point of e_src."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from PIL import Image

from fastimagic.errors import FastImagicError, InputError

DEFAULT_CAPTIONER = "Salesforce/blip-image-captioning-base"
_PHOTO_PREFIX = "a photo of"


@dataclass
class Captioner:
    """A BLIP image-captioning model and its processor, on one device.

    By default it decodes as the released implementation does, a plain ``generate()``: greedy, with the length
    limit of the model's own generation config (20 tokens for BLIP base). ``num_beams`` > 1 switches to beam search
    and ``max_new_tokens`` sets the length; :meth:`settings` says which was used, for the run's record.
    """

    model: torch.nn.Module
    processor: object
    device: torch.device = torch.device("cpu")
    num_beams: int = 1
    max_new_tokens: int | None = None

    def settings(self) -> dict:
        """How captions are decoded, JSON-ready: ``{"decoding": "greedy" | "beam", "num_beams", "max_new_tokens"}``
        (``max_new_tokens`` None: the model's generation config decides)."""
        return {
            "decoding": "beam" if self.num_beams > 1 else "greedy",
            "num_beams": self.num_beams,
            "max_new_tokens": self.max_new_tokens,
        }

    def _generate_kwargs(self) -> dict:
        kw: dict = {}
        if self.num_beams > 1:
            kw["num_beams"] = self.num_beams
        if self.max_new_tokens is not None:
            kw["max_new_tokens"] = self.max_new_tokens
        return kw

    @torch.no_grad()
    def __call__(self, image: Image.Image) -> str:
        inputs = self.processor(images=image.convert("RGB"), return_tensors="pt").to(self.device)
        out = self.model.generate(**inputs, **self._generate_kwargs())
        return " ".join(self.processor.decode(out[0], skip_special_tokens=True).split())


def load_captioner(
    name: str = DEFAULT_CAPTIONER,
    device: str | torch.device | None = None,
    *,
    num_beams: int = 1,
    max_new_tokens: int | None = None,
    allow_pickle: bool = False,
) -> Captioner:
    """Load BLIP from a repo id (HF cache honoured, ``HF_HUB_OFFLINE`` respected), a local folder, or ``tiny``.
    Only safetensors weights unless ``allow_pickle`` (pickle weights can run code when loaded).

    ``num_beams`` / ``max_new_tokens``: decoding, see :class:`Captioner` (defaults: the released code's).
    """
    if num_beams < 1 or (max_new_tokens is not None and max_new_tokens < 1):
        raise InputError("captioner: num_beams and max_new_tokens must be at least 1")
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if name == "tiny":
        from fastimagic import tiny

        model, processor = tiny.build_blip()
    else:
        from transformers import BlipForConditionalGeneration, BlipProcessor

        from fastimagic.models import refuse_pickle_weights

        refuse_pickle_weights(name, allow_pickle)
        weights = {"use_safetensors": None if allow_pickle else True}
        try:  # the cache (or a folder) first: no network at all when BLIP is already here
            processor = BlipProcessor.from_pretrained(name, local_files_only=True)
            model = BlipForConditionalGeneration.from_pretrained(name, local_files_only=True, **weights)
        except OSError:
            processor = model = None
        if model is None and not os.path.isdir(name) and (why := hub_unreachable()):
            raise FastImagicError(
                f"{name}: not in the Hugging Face cache, and {why}; download it on a connected machine"
                f" (`huggingface-cli download {name}`) and set HF_HUB_OFFLINE=1, or give source_prompt to skip"
                " captioning"
            )
        try:
            processor = processor or BlipProcessor.from_pretrained(name)
            model = model or BlipForConditionalGeneration.from_pretrained(name, **weights)
        except OSError as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise InputError(
                f"{name}: cannot load the BLIP captioner ({first}); give source_prompt to skip captioning, or make"
                " the model available in the HF cache"
            ) from None
    model.to(dev).eval()
    return Captioner(model=model, processor=processor, device=dev, num_beams=num_beams, max_new_tokens=max_new_tokens)


def hub_unreachable(timeout: float = 5.0) -> str | None:
    """Why the Hugging Face hub (``$HF_ENDPOINT``, default https://huggingface.co) cannot be reached, or None: one
    connection attempt of at most ``timeout`` seconds, where a download would retry for minutes with no network.
    ``HF_HUB_OFFLINE`` set is not a failure to connect (None): the download then fails at once, saying so."""
    import socket
    from urllib.parse import urlsplit

    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return None
    endpoint = os.environ.get("HF_ENDPOINT") or "https://huggingface.co"
    parts = urlsplit(endpoint)
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
        socket.create_connection((parts.hostname or "", port), timeout=timeout).close()
    except (OSError, ValueError) as e:
        return f"{endpoint} cannot be reached ({type(e).__name__}: {e})"
    return None


def source_prompt_from_caption(caption: str, target_prompts: list[str]) -> str:
    """The source prompt for a caption: prefixed with "A photo of" when the target prompts are written that way.

    The source and target embeddings are merged token by token, so both should share the same sentence frame.
    """
    caption = caption.strip()
    if any(p.strip().lower().startswith(_PHOTO_PREFIX) for p in target_prompts) and not caption.lower().startswith(
        _PHOTO_PREFIX
    ):
        caption = f"A photo of {caption}"
    return caption
