"""Edit many times after fine-tuning once: a base model with a :class:`Tuning` applied.

:class:`Editor` puts the learned tensors into the base model's UNet (in place), switches forgetting strategies in
place, merges embeddings and samples. Closing it puts the base weights back, so one warm base model serves any
number of tunings in turn. :func:`applied` keeps one open between renders, so a worker that renders a whole run
(or many) with one tuning applies it once; :func:`release` puts the base weights back.

>>> from fastimagic.merge import Subtract
>>> with Editor(model, tuning) as editor:
...     frames = editor.render("two people dancing on the beach", seeds=[0, 1],
...                            edits=[Subtract(g) for g in (0.8, 1.0, 1.2)],
...                            forget="encoderattn", steps=4)
>>> len(frames), frames[0].width == tuning.width
(6, True)
"""

from __future__ import annotations

import logging
import threading
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from PIL import Image

from fastimagic import images
from fastimagic.errors import InputError
from fastimagic.families import FAMILIES
from fastimagic.forgetting import Forgetting, StrategyReport, canonical
from fastimagic.merge import Edit, as_edit, merge
from fastimagic.models import Components
from fastimagic.precision import apply_deltas, put_back
from fastimagic.sampler import sample
from fastimagic.tuning import Tuning

log = logging.getLogger("fastimagic")


@dataclass
class Keyframe:
    """One rendered image and the exact settings that made it."""

    image: Image.Image
    prompt: str
    seed: int
    edit: Edit
    forget: str
    sigma: float
    guidance: float
    steps: int
    width: int
    height: int
    negative_prompt: str | None = None
    compiled: str = "off"  # how the UNet was compiled (fastimagic.models.compile_unet); recorded when not off

    def settings(self) -> dict:
        return {
            "prompt": self.prompt,
            "seed": self.seed,
            "edit": self.edit.as_dict(),
            "forget": self.forget,
            "sigma": self.sigma,
            "guidance": self.guidance,
            "steps": self.steps,
            "width": self.width,
            "height": self.height,
            "negative_prompt": self.negative_prompt,
        } | ({"compile": self.compiled} if self.compiled != "off" else {})


class Editor:
    """A base model with a tuning applied in place. Use as a context manager, or call :meth:`close`."""

    def __init__(self, model: Components, tuning: Tuning):
        if tuning.family != model.family.name:
            made_on = FAMILIES[tuning.family].label if tuning.family in FAMILIES else tuning.family
            raise InputError(
                f"tuning {tuning.key} was made on a {made_on} model and cannot be used with this"
                f" {model.family.label} model ('{model.identity}'); fine-tune on it instead"
            )
        if tuning.model_identity != model.identity:
            raise InputError(
                f"tuning {tuning.key} was fine-tuned on '{tuning.model_identity}', not on '{model.identity}'"
            )
        if model.applied is not None:  # a model carries one tuning at a time: the kept one goes first
            release(model)
        params = dict(model.unet.named_parameters())
        missing = [n for n in tuning.deltas if n not in params or params[n].shape != tuning.deltas[n].shape]
        if missing:
            raise InputError(f"tuning {tuning.key} does not fit this UNet (first mismatch: '{missing[0]}')")
        self.model = model
        self.tuning = tuning
        self._source = tuning.source_embedding.to(model.device)
        # Each tuned tensor becomes base + delta, added in float32 (a half-precision base weight, see
        # fastimagic.precision, cannot hold the delta) and rounded once to the dtype the base weight is stored in:
        # fp16/bf16 for convolutions and linears, which autocast would otherwise round from a float32 copy on every
        # UNet call (the same rounding, so the same numbers, without a weight cast per call). The stored base
        # tensors come back on close.
        self._originals = apply_deltas(params, tuning.deltas)
        self.forgetting = Forgetting(model.unet, self._originals, model.family, deltas=tuning.deltas)
        self._closed = False

    def __enter__(self) -> Editor:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @torch.no_grad()
    def close(self) -> None:
        """Put the base model's original weights back (bit for bit)."""
        if self._closed:
            return
        self.forgetting.restore()
        put_back(dict(self.model.unet.named_parameters()), self._originals)
        self._closed = True
        if self.model.applied is self:
            self.model.applied = None

    def forget(self, strategy: str, sigma: float = 0.0) -> StrategyReport:
        """Switch the forgetting strategy in place (see :mod:`fastimagic.forgetting`)."""
        return self.forgetting.apply(strategy, sigma)

    def render(
        self,
        prompt: str,
        *,
        seeds: list[int],
        edits: Sequence[Edit | Mapping],
        forget: str = "none",
        sigma: float = 0.0,
        guidance: float = 7.5,
        steps: int = 50,
        negative_prompt: str | None = None,
        width: int | None = None,
        height: int | None = None,
        max_batch: int | None = None,
    ) -> list[Keyframe]:
        """Render every (seed, edit) combination for ``prompt`` under one forgetting strategy.

        ``seeds``: one keyframe per seed and edit; each seed's initial noise is drawn on the CPU, so a keyframe is
        the same alone or batched. ``edits``: merge settings, :class:`~fastimagic.merge.Subtract` /
        :class:`~fastimagic.merge.Project` or their manifest form (``{"mode": "subtract", "gamma": g}``).
        ``forget``: the forgetting strategy, applied in place for this call. ``sigma``: how much of the learned
        weights a forgotten tensor keeps (0 forgets completely). ``guidance``: classifier-free guidance scale (1
        turns it off). ``steps``: DDIM steps. ``negative_prompt``: the unconditional prompt (default empty).
        ``width`` / ``height``: pixels, multiples of 8; default the tuning's. ``max_batch``: most images per UNet
        call (default: what fits, see :func:`fastimagic.sampler.auto_batch_size`). Keyframes come back seed-major,
        then in edit order.
        """
        if self._closed:
            raise RuntimeError("editor is closed")
        width = self.tuning.width if width is None else width
        height = self.tuning.height if height is None else height
        images.check_size(width, height)
        strategy = canonical(forget)
        cut = self.model.truncated_part(prompt)
        if cut:
            log.warning("prompt is longer than the text encoder's 77 tokens; ignored: %r", cut)
        target = self.model.encode_prompts([prompt])
        edits = [as_edit(e) for e in edits]
        merged = [merge(self._source, target, e) for e in edits]
        combos = [(s, i) for s in seeds for i in range(len(edits))]
        embeddings = torch.cat([merged[i] for _, i in combos])
        unconditional = self.model.encode_prompts([negative_prompt or ""]) if guidance > 1.0 else None
        self.forget(strategy, sigma)
        pixels = sample(
            self.model,
            embeddings,
            [s for s, _ in combos],
            width=width,
            height=height,
            guidance=guidance,
            steps=steps,
            unconditional=unconditional,
            max_batch=max_batch,
        )
        return [
            Keyframe(
                image=img,
                prompt=prompt,
                seed=int(s),
                edit=edits[i],
                forget=strategy,
                sigma=float(sigma),
                guidance=float(guidance),
                steps=int(steps),
                width=width,
                height=height,
                negative_prompt=negative_prompt,
                compiled=self.model.compiled,
            )
            for (s, i), img in zip(combos, images.to_pil(pixels))
        ]


# Models with an editor kept open on them (weakly: a base model the LRU drops goes, with its editor).
_KEPT: weakref.WeakValueDictionary[int, Components] = weakref.WeakValueDictionary()
_KEPT_LOCK = threading.Lock()


def applied(model: Components, tuning: Tuning) -> Editor:
    """An :class:`Editor` with ``tuning`` applied to ``model``, kept open afterwards: the next call for the same
    tuning (by content key) on this model applies nothing, and forgetting switches in place as usual. Another tuning
    closes the kept editor first. Hold ``model.lock`` from this call until done with the editor, and leave closing it
    to :func:`release` (or to the next :class:`Editor` opened on the model)."""
    editor = model.applied
    if isinstance(editor, Editor) and not editor._closed and editor.tuning.key == tuning.key:
        return editor
    editor = Editor(model, tuning)  # closes any other kept editor first
    model.applied = editor
    with _KEPT_LOCK:
        _KEPT[id(model)] = model
    return editor


def release(model: Components | None = None) -> None:
    """Close the editor :func:`applied` kept open on ``model`` (on every model when None): the base weights back,
    bit for bit. Call before anything that needs the base weights (a fine-tune) and when a run ends."""
    with _KEPT_LOCK:
        models = [model] if model is not None else list(_KEPT.values())
    for m in models:
        with m.lock:
            editor, m.applied = m.applied, None
            if editor is not None:
                editor.close()
        with _KEPT_LOCK:
            _KEPT.pop(id(m), None)
