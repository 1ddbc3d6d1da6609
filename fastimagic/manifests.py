"""What a run passes from step to step, and the manifests it writes: typed records and pure functions, one place.

The pipeline's values (the reference, the source prompt, the stored tuning, each keyframe, each scene) are small
frozen records here, so a reader sees their fields in one place. The manifests, the JSON that people and the
video stage read, are built only by :func:`scene_manifest` and :func:`run_manifest`; their format is documented in
the README ("Output layout") and versioned by :data:`RUN_FORMAT`.

Keyframe records are JSON objects from the moment they are made (:class:`KeyframeRecord`, a ``TypedDict``): they
are written to progress records and manifests as they are, and :mod:`fastimagic.picking` and
:mod:`fastimagic.autoforget` read them the same way from a manifest as from a live run.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, TypedDict

RUN_FORMAT = 1  # the run manifest's "format"; bump it (and say what changed) when a field changes meaning


@dataclass(frozen=True)
class Reference:
    """The reference image as fetched: its bytes, their SHA-256 (part of the tuning's content key), its URI and its
    size in pixels (width, height), upright."""

    data: bytes = field(repr=False)
    sha256: str
    uri: str
    size: tuple[int, int]

    @classmethod
    def of(cls, data: bytes, uri: str, size: tuple[int, int]) -> Reference:
        return cls(data=data, sha256=hashlib.sha256(data).hexdigest(), uri=uri, size=tuple(size))


@dataclass(frozen=True)
class SourcePrompt:
    """The source prompt e_src starts from, the BLIP caption it came from and how BLIP decoded it (both None when
    the storyboard gave the source prompt)."""

    source_prompt: str
    caption: str | None = None
    captioner: dict | None = None


@dataclass(frozen=True)
class TuningRef:
    """A stored tuning as the run manifest records it: its content key, whether it was reused, where it is, the
    precision it was fine-tuned at, and how the fine-tune went. ``replaced_corrupt``: why a stored copy was
    replaced, if it was. Fields after ``reused`` are empty when the run only learned that the key is stored."""

    key: str
    reused: bool
    uri: str = ""
    precision: str | None = None
    losses: tuple[float, ...] = ()
    seconds: float = 0.0
    steps_run: int = 0
    trained_parameters: int = 0
    replaced_corrupt: str | None = None

    def as_dict(self) -> dict:
        d = asdict(self)
        d["losses"] = list(self.losses)
        if self.replaced_corrupt is None:
            del d["replaced_corrupt"]
        return d

    @classmethod
    def from_dict(cls, data: Mapping) -> TuningRef:
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        return cls(**{**known, "losses": tuple(known.get("losses", ()))})


class KeyframeRecord(TypedDict, total=False):
    """One keyframe in a manifest. ``key`` is relative to the run folder; ``edit`` is the merge setting's manifest
    form (``{"mode": "subtract", "gamma": g}``); ``scores`` (with a scorer) holds ``clip``, ``fidelity`` and
    ``fidelity_metric``; ``pick`` is the keyframe's rank among the scene's picks, or None."""

    key: str
    scene: str
    prompt: str
    seed: int
    edit: dict
    forget: str
    sigma: float
    guidance: float
    steps: int
    width: int
    height: int
    negative_prompt: str | None
    sha256: str
    scores: dict
    pick: int | None


_SHA256 = re.compile(r"[0-9a-f]{64}")
_RECORD_FIELDS = {"key": str, "scene": str, "prompt": str, "seed": int, "edit": dict, "forget": str,
                  "sigma": (int, float), "guidance": (int, float), "steps": int, "width": int, "height": int,
                  "negative_prompt": (str, type(None)), "sha256": str, "scores": dict, "pick": (int, type(None)),
                  "precision": str}


def records_are_data(records: Any, scene_id: str, seeds: Sequence[int], strategies: Sequence[str]) -> bool:
    """Whether ``records`` (read back from a progress record someone may have edited) are what fastimagic writes
    for this scene: a list of objects with known fields of the right types, this scene's id, one of ``seeds``,
    one of ``strategies``, a SHA-256; scores numbers. Anything else is damaged (a resume renders it again)."""
    if not isinstance(records, list):
        return False
    for r in records:
        if not isinstance(r, dict) or not {"key", "scene", "seed", "forget", "sha256"} <= r.keys():
            return False
        for name, value in r.items():
            kind = _RECORD_FIELDS.get(name)
            if kind is None or isinstance(value, bool) and name != "pick" or not isinstance(value, kind):
                return False
        if r["scene"] != scene_id or r["seed"] not in seeds or r["forget"] not in strategies:
            return False
        if not _SHA256.fullmatch(r["sha256"]):
            return False
        scores = r.get("scores", {})
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) or k == "fidelity_metric"
                   and isinstance(v, str) for k, v in scores.items()):
            return False
    return True


def keyframe_record(key: str, scene_id: str, settings: Mapping, sha256: str, scores: Mapping | None) -> KeyframeRecord:
    """The record of one written keyframe: where it is, the settings that made it, its hash and its scores."""
    record: KeyframeRecord = {"key": key, "scene": scene_id, **settings, "sha256": sha256}  # type: ignore[typeddict-item]
    if scores is not None:
        record["scores"] = {k: round(v, 4) if isinstance(v, float) else v for k, v in scores.items()}
    return record


@dataclass(frozen=True)
class SceneSummary:
    """One scene as the run manifest lists it; the scene's own manifest holds its keyframes."""

    id: str
    prompt: str
    manifest: str
    contact_sheet: str
    keyframes: int
    picks: tuple[dict, ...] = ()
    auto: dict | None = None
    motion: str | None = None

    def as_dict(self) -> dict:
        return {**asdict(self), "picks": [dict(p) for p in self.picks]}

    @classmethod
    def of(cls, manifest: Mapping, manifest_key: str, contact_sheet_key: str) -> SceneSummary:
        """The summary of a scene from its manifest (:func:`scene_manifest`), e.g. one a scene flow run wrote."""
        return cls(
            id=manifest["scene"],
            prompt=manifest["prompt"],
            manifest=manifest_key,
            contact_sheet=contact_sheet_key,
            keyframes=len(manifest["keyframes"]),
            picks=tuple(manifest.get("picks", ())),
            auto=manifest.get("auto"),
            motion=manifest.get("motion"),
        )


def scene_manifest(scene_id: str, prompt: str, picks: Sequence[Mapping], auto: Mapping | None,
                   records: Sequence[KeyframeRecord], motion: str | None = None) -> dict:
    """A scene's ``manifest.json``: its prompt, its ``motion`` text for the video stage, picks (``rank``, ``key``,
    ``copy``), the ``forget: auto`` decision and every keyframe record."""
    return {
        "scene": scene_id,
        "prompt": prompt,
        "motion": motion,
        "picks": [{"rank": p["rank"], "key": p["key"], "copy": p["copy"]} for p in picks],
        "auto": dict(auto) if auto is not None else None,
        "keyframes": list(records),
    }


def run_manifest(
    *,
    run_id: str,
    created: str,
    storyboard: Mapping[str, Any],
    model: Mapping[str, Any],
    resolution: tuple[int, int],
    reference: Mapping[str, Any],
    precision: Mapping[str, Any],
    prompts: SourcePrompt,
    tuning: TuningRef,
    scenes: Sequence[SceneSummary],
    records: Sequence[KeyframeRecord],
    kept: int | None,
    timings: Mapping[str, float],
) -> dict:
    """The run's ``manifest.json``, written last: the storyboard as written, the model, the size, how the reference
    was fitted (``reference``: its size and :func:`fastimagic.images.describe_fit`), the precision asked for and
    used, the caption (and how BLIP decoded it) and source prompt, the tuning, every scene and every keyframe.
    ``kept``: keyframes a resumed run verified and kept (None for a run that was not resumed). ``reference_key``
    is added where the reference copy is written."""
    return {
        "format": RUN_FORMAT,
        "status": "complete",
        "run_id": run_id,
        "created": created,
        "storyboard": dict(storyboard),
        "model": dict(model),
        "resolution": {"width": resolution[0], "height": resolution[1]},
        "reference": dict(reference),
        "precision": dict(precision),
        "caption": prompts.caption,
        "captioner": prompts.captioner,
        "source_prompt": prompts.source_prompt,
        "tuning": tuning.as_dict(),
        "resumed": None if kept is None else {"kept": kept, "rendered": len(records) - kept},
        "timings": {k: round(v, 3) for k, v in timings.items()},
        "scenes": [s.as_dict() for s in scenes],
        "keyframes": list(records),
    }
