"""Picking keyframes for the video stage: the best of a scene by score, under the storyboard's ``select``.

Scores come from :mod:`fastimagic.scoring` (``{"clip", "fidelity", "fidelity_metric"}`` per keyframe). Pure
Python (no torch), so a video stage can pick keyframes from a manifest without loading any model.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Protocol

# Which way is "more like the reference" for each fidelity metric.
_HIGHER_IS_MORE_SIMILAR = {"clip_image": True, "lpips": False}


def similarity_key(metric: str, value: float) -> float:
    """A number that grows as a keyframe gets more similar to the reference, whatever fidelity ``metric`` is."""
    if metric not in _HIGHER_IS_MORE_SIMILAR:
        raise ValueError(f"unknown fidelity metric {metric!r}; allowed: {', '.join(_HIGHER_IS_MORE_SIMILAR)}")
    return float(value) if _HIGHER_IS_MORE_SIMILAR[metric] else -float(value)


def scores_of(item: Mapping) -> Mapping:
    # A keyframe record carrying "scores", or a scores dict itself.
    scores = item.get("scores", item)
    missing = [k for k in ("clip", "fidelity", "fidelity_metric") if k not in scores]
    if missing:
        name = item.get("key", "a keyframe")
        raise ValueError(f"{name}: no {', '.join(missing)} in its scores; score it first (Scorer.score)")
    return scores


def one_metric(scores: Sequence[Mapping]) -> str:
    metrics = sorted({s["fidelity_metric"] for s in scores})
    if len(metrics) != 1:
        raise ValueError(f"candidates mix fidelity metrics ({', '.join(metrics)}); score them with one scorer")
    similarity_key(metrics[0], 0.0)  # validates the name
    return metrics[0]


def pick(
    records: Sequence[Mapping],
    *,
    top: int | None = None,
    min_clip: float | None = None,
    max_lpips: float | None = None,
    min_fidelity: float | None = None,
) -> list[dict]:
    """The best keyframes of ``records`` (each carrying ``"scores"``), best first, each a copy with ``"rank"`` 1..K.

    Filters: ``min_clip`` (CLIP score, 0-100), ``max_lpips`` (only for records scored with ``"lpips"``),
    ``min_fidelity`` (CLIP image similarity, only for records scored with ``"clip_image"``); ``None`` disables one.
    Order: CLIP score descending, then fidelity (more similar to the reference first), then seed ascending, then
    the records' own order (the render order of the edits). ``top``: keep at most this many (``None``: all).
    Deterministic: the same records give the same picks.
    """
    if top is not None and top < 1:
        raise ValueError(f"top must be at least 1 (or None for all), got {top}")
    kept = []
    for index, record in enumerate(records):
        scores = scores_of(record)
        metric = scores["fidelity_metric"]
        clip, fidelity = float(scores["clip"]), float(scores["fidelity"])
        if min_clip is not None and clip < min_clip:
            continue
        if max_lpips is not None and metric == "lpips" and fidelity > max_lpips:
            continue
        if min_fidelity is not None and metric == "clip_image" and fidelity < min_fidelity:
            continue
        kept.append(((-clip, -similarity_key(metric, fidelity), record.get("seed", 0), index), record))
    kept.sort(key=lambda item: item[0])
    if top is not None:
        kept = kept[:top]
    return [{**record, "rank": rank} for rank, (_, record) in enumerate(kept, start=1)]


class SelectSettings(Protocol):
    """What :func:`scene_picks` reads of a scene's ``select`` (:class:`fastimagic.storyboard.Select`)."""

    top: int
    min_clip: float | None
    max_lpips: float | None
    min_fidelity: float | None


def scene_picks(records: Sequence[Mapping], select: SelectSettings | None, chosen: str | None = None) -> list[dict]:
    """A scene's picks: :func:`pick` under ``select`` over the keyframes of the forgetting strategy ``chosen`` (the
    one ``forget: auto`` settled on; ``None``: every keyframe). No ``select``, or unscored keyframes: no picks."""
    if select is None or not records or not all("scores" in r for r in records):
        return []
    pool = [r for r in records if chosen is None or r["forget"] == chosen]
    return pick(pool, top=select.top, min_clip=select.min_clip, max_lpips=select.max_lpips,
                min_fidelity=select.min_fidelity)
