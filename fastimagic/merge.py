"""Embedding merge (paper §3.3): combine the learned source embedding with a target prompt's embedding.

Both embeddings are ``[..., N tokens, C channels]``; every operation works per token on the channel dimension.

* Vector subtraction: ``e = e_src + gamma * (e_tgt - e_src)``. gamma = 0 gives e_src, gamma = 1 gives e_tgt;
  successful edits usually need gamma a little above 1.
* Vector projection: split e_tgt into a part along e_src and a part orthogonal to it,
  ``r = <e_src, e_tgt> / |e_src|^2``, ``e_edit = e_tgt - r * e_src``, then ``e = alpha * e_src + beta * e_edit``.
  alpha controls how much of the reference identity is kept, beta how strong the edit is.
"""

from __future__ import annotations

import math

import torch

from fastimagic.errors import InputError


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


def merge(source_embedding: torch.Tensor, target_embedding: torch.Tensor, edit: dict) -> torch.Tensor:
    """Merge by an edit setting: ``{"mode": "subtract", "gamma": g}`` or ``{"mode": "project", "alpha", "beta"}``."""
    mode = edit.get("mode")
    if mode == "subtract":
        return subtract(source_embedding, target_embedding, edit["gamma"])
    if mode == "project":
        return project(source_embedding, target_embedding, edit["alpha"], edit["beta"])
    raise InputError(f"edit mode must be 'subtract' or 'project', got {mode!r}")
