"""fastimagic: Fast Imagic (Forgedit) text-guided editing of one reference image into many story keyframes.

The method, with no orchestrator: load a base model, fine-tune once, then edit many times.

>>> from fastimagic import Editor, FinetuneConfig, Subtract, finetune, load_base_model, load_reference
>>> from fastimagic.tiny import drawn_photo
>>> model = load_base_model("tiny")
>>> image = load_reference(drawn_photo(), "sky.jpg")
>>> tuning = finetune(model, image, "a photo of a bird", FinetuneConfig(steps=3), width=64, height=64)
>>> with Editor(model, tuning) as editor:
...     keyframes = editor.render("a photo of a bird flying", seeds=[0, 1], edits=[Subtract(1.1)],
...                               forget="encoderattn", steps=4)
>>> [(k.seed, k.edit.gamma, k.forget) for k in keyframes]
[(0, 1.1, 'encoderattn'), (1, 1.1, 'encoderattn')]

Names are lazy so that ``import fastimagic.storyboard`` (validation) does not pay for importing torch.
"""

from importlib import import_module

__version__ = "0.1.0"

_EXPORTS = {
    "load_base_model": "fastimagic.models",
    "Components": "fastimagic.models",
    "pick_device": "fastimagic.models",
    "finetune": "fastimagic.finetuning",
    "FinetuneConfig": "fastimagic.finetuning",
    "Tuning": "fastimagic.tuning",
    "Editor": "fastimagic.editor",
    "Keyframe": "fastimagic.editor",
    "subtract": "fastimagic.merge",
    "project": "fastimagic.merge",
    "Subtract": "fastimagic.merge",
    "Project": "fastimagic.merge",
    "Forgetting": "fastimagic.forgetting",
    "STRATEGIES": "fastimagic.forgetting",
    "load_captioner": "fastimagic.caption",
    "load_reference": "fastimagic.images",
    "InputError": "fastimagic.errors",
    "FastImagicError": "fastimagic.errors",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'fastimagic' has no attribute {name!r}")
