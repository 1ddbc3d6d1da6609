"""Forgetting strategies (paper §3.4, appendix 6.3): put some learned UNet weights back to the originals.

The UNet is disentangled: the encoder (``down_blocks``) holds layout, pose and structure; the decoder
(``up_blocks``) holds appearance and texture. When a fine-tuned model overfits (it reconstructs the reference but
ignores the prompt), blending part of it back to the base weights restores editability:

    w = sigma * w_learned + (1 - sigma) * w_orig        (sigma = 0 forgets completely)

Each strategy is a rule over UNet parameter names, the same on every model family. "attn" means the ``attn1`` /
``attn2`` modules (self- and cross-attention), "kv" means ``attn2.to_k`` / ``attn2.to_v``; "encoder1" and
"decoder2" name the level they name on SD 1.x (``down_blocks.1`` and ``up_blocks.2``, both 640 channels wide) by
its channel width, so on SDXL they are ``down_blocks.1`` and ``up_blocks.1`` (see
:meth:`fastimagic.families.Family.down_block`). A rule names the tensors that are *forgotten*; everything else
keeps its learned value.

Switching strategy between scenes must stay cheap, so :class:`Forgetting` edits only the affected tensors in
place and keeps the learned values of exactly those tensors to undo bit for bit. The UNet is never copied.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from fastimagic.errors import InputError
from fastimagic.families import SD1, Family

if TYPE_CHECKING:  # torch is imported where tensors are touched, so the storyboard schema can use the names cheaply
    import torch

_ATTN = re.compile(r"\.attn[12]\.")
_KV = re.compile(r"\.attn2\.to_[kv]\.")


def _in(block: str) -> Callable[[str], bool]:
    return lambda name: name.startswith(block + ".")


_encoder = _in("down_blocks")
_decoder = _in("up_blocks")

# name -> (rule over a parameter name and the model's family that says "forget this tensor", one-line description;
# {encoder1} and {decoder2} stand for the family's blocks of those levels)
STRATEGIES: dict[str, tuple[Callable[[str, Family], bool], str]] = {
    "none": (lambda n, f: False, "keep every learned weight"),
    "encoder": (lambda n, f: _encoder(n), "forget the whole encoder (down_blocks)"),
    "decoder": (lambda n, f: _decoder(n), "forget the whole decoder (up_blocks)"),
    "encoderattn": (
        lambda n, f: _encoder(n) and not _ATTN.search(n),
        "forget the encoder except its self/cross-attention (attn1, attn2)",
    ),
    "decoderattn": (
        lambda n, f: _decoder(n) and not _ATTN.search(n),
        "forget the decoder except its self/cross-attention (attn1, attn2)",
    ),
    "encoderkv": (
        lambda n, f: _encoder(n) and not _KV.search(n),
        "forget the encoder except cross-attention keys/values (attn2.to_k, attn2.to_v)",
    ),
    "decoderkv": (
        lambda n, f: _decoder(n) and not _KV.search(n),
        "forget the decoder except cross-attention keys/values (attn2.to_k, attn2.to_v)",
    ),
    "encoderattn+encoder1": (
        lambda n, f: _encoder(n) and not (_ATTN.search(n) or _in(f.down_block(1))(n)),
        "forget the encoder except its attention and the whole {encoder1}",
    ),
    "decoderattn+decoder2": (
        lambda n, f: _decoder(n) and not (_ATTN.search(n) or _in(f.up_block(2))(n)),
        "forget the decoder except its attention and the whole {decoder2}",
    ),
}

# The reference implementation's names.
ALIASES: dict[str, str] = {"donotforget": "none", "noencoder": "encoder", "nodecoder": "decoder"}


def canonical(strategy: str) -> str:
    """Return the canonical strategy name for ``strategy`` (aliases resolved) or raise :class:`InputError`."""
    name = ALIASES.get(strategy, strategy)
    if name not in STRATEGIES:
        import difflib

        close = difflib.get_close_matches(strategy, [*STRATEGIES, *ALIASES], n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise InputError(
            f"unknown forgetting strategy '{strategy}'{hint}; valid: {', '.join(STRATEGIES)}"
            f" (aliases: {', '.join(ALIASES)})"
        )
    return name


def forgotten_names(strategy: str, names: Iterable[str], family: Family = SD1) -> list[str]:
    """The subset of parameter ``names`` of a ``family`` UNet that ``strategy`` puts back to the original weights."""
    rule = STRATEGIES[canonical(strategy)][0]
    return [n for n in names if rule(n, family)]


def description(strategy: str, family: Family = SD1) -> str:
    """The one-line description of ``strategy`` with the block names of ``family``."""
    text = STRATEGIES[canonical(strategy)][1]
    return text.format(encoder1=family.down_block(1), decoder2=family.up_block(2))


@dataclass(frozen=True)
class StrategyReport:
    """What a strategy touches among the trained tensors: names and total parameter count."""

    strategy: str
    description: str
    tensors: tuple[str, ...]
    parameters: int


def describe(
    strategy: str, shapes: Mapping[str, torch.Size | tuple[int, ...]], family: Family = SD1
) -> StrategyReport:
    """List what ``strategy`` would forget among trained tensors of a ``family`` UNet given as ``{name: shape}``."""
    name = canonical(strategy)
    touched = forgotten_names(name, shapes, family)
    return StrategyReport(
        strategy=name,
        description=description(name, family),
        tensors=tuple(touched),
        parameters=sum(math.prod(shapes[n]) for n in touched),
    )


class Forgetting:
    """Apply forgetting strategies to a fine-tuned UNet in place, and undo them exactly.

    ``originals`` holds the base weights of the trained tensors only (name -> tensor, any device/dtype). Only
    those names can ever be forgotten: every other UNet tensor already equals its original. ``family``: the
    model's (:mod:`fastimagic.families`), which says which blocks ``encoder1`` / ``decoder2`` are. ``deltas``:
    the tuning's changes (name -> tensor), given when the UNet holds the learned values rounded to a half-precision
    dtype (:func:`fastimagic.precision.apply_deltas`): a blend (0 < sigma < 1) is then made in float32 from the
    original and the delta, as from float32 learned values, and rounded once (the deltas a blend needs are copied
    to the UNet's device once and kept).

    An :class:`~fastimagic.editor.Editor` holds one for the tuning it applied:

    >>> editor = Editor(model, tuning)
    >>> editor.forgetting.apply("encoderattn").strategy
    'encoderattn'
    >>> editor.forgetting.apply("decoderattn", sigma=0.2).strategy   # undoes the previous one first
    'decoderattn'
    >>> editor.forgetting.restore()                                   # back to the learned weights, bit for bit
    >>> editor.close()
    """

    def __init__(
        self,
        unet: torch.nn.Module,
        originals: Mapping[str, torch.Tensor],
        family: Family = SD1,
        deltas: Mapping[str, torch.Tensor] | None = None,
    ):
        params = dict(unet.named_parameters())
        missing = [n for n in originals if n not in params]
        if missing:
            raise InputError(f"original weights name tensors the UNet lacks, e.g. '{missing[0]}'")
        self._params = {n: params[n] for n in originals}
        self._originals = dict(originals)
        self._deltas = deltas
        self._device_deltas: dict[str, torch.Tensor] = {}  # deltas a blend needed, kept where the UNet is
        self.family = family
        self._saved: dict[str, torch.Tensor] = {}  # learned values of the tensors currently forgotten
        self.strategy = "none"
        self.sigma = 0.0

    def apply(self, strategy: str, sigma: float = 0.0) -> StrategyReport:
        """Switch to ``strategy`` with blend ``sigma`` (0 = original weights, 1 = learned). Returns what it touched."""
        name = canonical(strategy)
        if not (isinstance(sigma, (int, float)) and math.isfinite(sigma) and 0.0 <= sigma <= 1.0):
            raise InputError(f"sigma must be a number in [0, 1], got {sigma!r}")
        report = describe(name, {n: p.shape for n, p in self._params.items()}, self.family)
        if (name, float(sigma)) == (self.strategy, self.sigma):
            return report
        import torch

        from fastimagic.precision import learned_value

        self.restore()
        with torch.no_grad():
            for n in report.tensors:
                p = self._params[n]
                self._saved[n] = p.detach().clone()
                if sigma == 0.0:
                    p.copy_(self._originals[n].to(device=p.device, dtype=p.dtype))
                    continue
                # The blend in float32 from the float32 learned value, rounded once by copy_ to p's dtype.
                stored = self._originals[n].to(p.device)
                learned = p if self._deltas is None else learned_value(stored, self._delta(n, p))
                orig = stored.to(dtype=learned.dtype)
                p.copy_(sigma * learned + (1.0 - sigma) * orig)
        self.strategy, self.sigma = name, float(sigma)
        return report

    def _delta(self, name: str, like: torch.Tensor) -> torch.Tensor:
        """The tuning's delta of ``name`` on ``like``'s device, copied there once (a blend of the same tensor with
        another sigma, or after another strategy, needs it again)."""
        if name not in self._device_deltas:
            self._device_deltas[name] = self._deltas[name].to(like.device)
        return self._device_deltas[name]

    def restore(self) -> None:
        """Put back the learned weights of every forgotten tensor, bit for bit."""
        import torch

        with torch.no_grad():
            for n, learned in self._saved.items():
                self._params[n].copy_(learned)
        self._saved.clear()
        self.strategy, self.sigma = "none", 0.0
