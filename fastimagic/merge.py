"""Embedding merge (paper §3.3): combine the learned source embedding with a target prompt's embedding.

Both embeddings are ``[..., N tokens, C channels]``; every operation works per token on the channel dimension.

* Vector subtraction: ``e = e_src + gamma * (e_tgt - e_src)``. gamma = 0 gives e_src, gamma = 1 gives e_tgt;
  successful edits usually need gamma a little above 1.
* Vector projection: split e_tgt into a part along e_src and a part orthogonal to it,
  ``r = <e_src, e_tgt> / |e_src|^2``, ``e_edit = e_tgt - r * e_src``, then ``e = alpha * e_src + beta * e_edit``.
  alpha controls how much of the reference identity is kept, beta how strong the edit is.

One merge setting is an :data:`Edit`: :class:`Subtract` or :class:`Project`. This module imports no torch at import
time (the storyboard schema builds edits while validating).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from fastimagic.errors import InputError

if TYPE_CHECKING:
    import torch


def _finite(**values: float) -> None:
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise InputError(f"{name} must be a finite number, got {value!r}")


def subtract(source_embedding: torch.Tensor, target_embedding: torch.Tensor, gamma: float) -> torch.Tensor:
    """Vector subtraction: ``e_src + gamma * (e_tgt - e_src)``."""
    _finite(gamma=gamma)
    return source_embedding + gamma * (target_embedding - source_embedding)


def project(
    source_embedding: torch.Tensor, target_embedding: torch.Tensor, alpha: float, beta: float
) -> torch.Tensor:
    """Vector projection: ``alpha * e_src + beta * e_edit`` with e_edit the part of e_tgt orthogonal to e_src."""
    _finite(alpha=alpha, beta=beta)
    src, tgt = source_embedding.float(), target_embedding.float()
    r = (src * tgt).sum(-1, keepdim=True) / (src * src).sum(-1, keepdim=True).clamp_min(1e-12)
    edit = tgt - r * src
    return (alpha * src + beta * edit).to(source_embedding.dtype)


@dataclass(frozen=True)
class Subtract:
    """Vector subtraction with ``gamma``."""

    gamma: float
    mode: ClassVar[str] = "subtract"

    def label(self) -> str:
        """A short file-name-safe label: ``g1.10``."""
        return f"g{self.gamma:.2f}"

    def as_dict(self) -> dict:
        """The manifest form: ``{"mode": "subtract", "gamma": g}``."""
        return {"mode": self.mode, "gamma": self.gamma}


@dataclass(frozen=True)
class Project:
    """Vector projection with ``alpha`` (identity kept) and ``beta`` (edit strength)."""

    alpha: float
    beta: float
    mode: ClassVar[str] = "project"

    def label(self) -> str:
        """A short file-name-safe label: ``a0.80-b1.20``."""
        return f"a{self.alpha:.2f}-b{self.beta:.2f}"

    def as_dict(self) -> dict:
        """The manifest form: ``{"mode": "project", "alpha": a, "beta": b}``."""
        return {"mode": self.mode, "alpha": self.alpha, "beta": self.beta}


Edit = Subtract | Project


def as_edit(edit: Edit | Mapping) -> Edit:
    """An :data:`Edit`, from itself or from its manifest form ``{"mode": ..., ...}``."""
    if isinstance(edit, (Subtract, Project)):
        return edit
    mode = edit.get("mode") if isinstance(edit, Mapping) else None
    if mode == "subtract":
        return Subtract(edit["gamma"])
    if mode == "project":
        return Project(edit["alpha"], edit["beta"])
    raise InputError(f"edit mode must be 'subtract' or 'project', got {mode!r}")


def merge(source_embedding: torch.Tensor, target_embedding: torch.Tensor, edit: Edit | Mapping) -> torch.Tensor:
    """Merge e_src with e_tgt by one edit setting (an :data:`Edit` or its manifest form)."""
    edit = as_edit(edit)
    if isinstance(edit, Subtract):
        return subtract(source_embedding, target_embedding, edit.gamma)
    return project(source_embedding, target_embedding, edit.alpha, edit.beta)
