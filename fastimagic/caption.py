"""Source prompt (paper §3.2): a BLIP caption of the reference image, the starting point of e_src."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from PIL import Image

from fastimagic.errors import InputError

DEFAULT_CAPTIONER = "Salesforce/blip-image-captioning-base"
_PHOTO_PREFIX = "a photo of"


@dataclass
class Captioner:
    """A BLIP image-captioning model and its processor, on one device."""

    model: torch.nn.Module
    processor: object
    device: torch.device = torch.device("cpu")
    max_new_tokens: int = 30

    @torch.no_grad()
    def __call__(self, image: Image.Image) -> str:
        inputs = self.processor(images=image.convert("RGB"), return_tensors="pt").to(self.device)
        out = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, num_beams=3)
        return " ".join(self.processor.decode(out[0], skip_special_tokens=True).split())


def load_captioner(name: str = DEFAULT_CAPTIONER, device: str | torch.device | None = None) -> Captioner:
    """Load BLIP from a repo id (HF cache honoured, ``HF_HUB_OFFLINE`` respected), a local folder, or ``tiny``."""
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if name == "tiny":
        from fastimagic import tiny

        model, processor = tiny.build_blip()
    else:
        from transformers import BlipForConditionalGeneration, BlipProcessor

        try:
            processor = BlipProcessor.from_pretrained(name)
            model = BlipForConditionalGeneration.from_pretrained(name)
        except OSError as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise InputError(
                f"{name}: cannot load the BLIP captioner ({first}); give source_prompt to skip captioning, or make"
                " the model available in the HF cache"
            ) from None
    model.to(dev).eval()
    return Captioner(model=model, processor=processor, device=dev)


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
