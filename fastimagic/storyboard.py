"""The storyboard: one YAML file naming a reference image, a base model and the scenes to render from it.

    name: beach-day
    reference: photos/dog.jpg            # relative to this file, or s3://bucket/key
    model: stable-diffusion-v1-5/stable-diffusion-v1-5
    resolution: 768x512                  # or one number for a square
    defaults:                            # every scene inherits these; a scene's own value wins
      seeds: 4                           # seeds 0..3
      forget: [encoderattn, decoderattn]
    scenes:
      - id: run
        prompt: a photo of a dog running on the beach
        edit: {subtract: {gamma: {from: 0.9, to: 1.3, step: 0.1}}}
      - id: sit
        prompt: a photo of a dog sitting
        edit: {project: {alpha: [1.0, 1.2], beta: [0.0, 0.5]}}

This module is the schema: the models a person writes, their defaults and the rules on their values. Reading a
file (YAML, line numbers, one message per problem) is :func:`fastimagic.storyboard_yaml.load_storyboard`. The
validators here raise pydantic errors at field paths; the loader turns them into ``FILE:LINE FIELD.PATH: message``.
Path, URI and model-name rules come from :mod:`fastimagic.config`, which the runtime applies too.
"""

from __future__ import annotations

import difflib
import math
import os
import posixpath
import re
from collections.abc import Iterable
from itertools import product
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    Strict,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import InitErrorDetails, PydanticCustomError

from fastimagic import config
from fastimagic.autoforget import AUTO, Thresholds
from fastimagic.config import (
    BLOCK_PRESETS,
    DEFAULT_MAX_KEYFRAMES,
    DEFAULT_MAX_SEEDS,
    DEFAULT_MAX_SIDE,
    FIT_MODES,
    MAX_SEED,
    MIN_SIDE,
    PRECISIONS,
    SIDE_MULTIPLE,
    UNET_BLOCKS,
    UNET_LEVELS,
    size_for,
    slugify,
)
from fastimagic.errors import InputError
from fastimagic.forgetting import ALIASES, STRATEGIES
from fastimagic.merge import Edit as MergeEdit
from fastimagic.merge import Project, Subtract

SLUG = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}")
_RANGE_KEYS = ("from", "to", "step")
_RANGE_TOLERANCE = 1e-9
_DECIMALS = 6
_BLOCK_NAME = re.compile(r"[a-z_]+(\.[a-z0-9_]+)*")


# --- messages -------------------------------------------------------------------------------------------------


class _Bad(Exception):
    """One problem with one value, found by a helper below; the validator that called it says where."""


def describe_value(value: Any) -> str:
    """A value as a person wrote it in YAML, for 'got ...' in messages."""
    if value is None:
        return "an empty value"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return repr(value if len(value) <= 60 else value[:57] + "...")
    if isinstance(value, (int, float)):
        text = repr(value)
        return text if len(text) <= 30 else text[:27] + "..."
    if isinstance(value, (list, tuple)):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    return f"{type(value).__name__} {str(value)[:40]}"


def unknown_key(key: Any, allowed: Iterable[str]) -> str:
    allowed = list(allowed)
    close = difflib.get_close_matches(str(key), allowed, n=1)
    if close:
        return f"unknown key '{key}' (did you mean '{close[0]}'?)"
    return f"unknown key '{key}'; allowed here: {', '.join(allowed)}"


def _one_of(value: str, allowed: tuple[str, ...], what: str) -> str:
    """``value`` if it is one of ``allowed``, else a problem naming the nearest and every allowed value."""
    if value in allowed:
        return value
    close = difflib.get_close_matches(value, allowed, n=1) or difflib.get_close_matches(value.lower(), allowed, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    raise _problem(f"unknown {what} '{value}'{hint}; allowed: {', '.join(allowed)}")


def _problem(message: str) -> PydanticCustomError:
    # The message travels in the context so that braces in user values never meet str.format.
    return PydanticCustomError("storyboard", "{message}", {"message": message})


def _problems(found: list) -> ValidationError:
    """Several problems at once, at locations relative to the value being validated (pydantic prefixes them).

    Each item is ``(location, message)``, or a pydantic error dict carried over from a nested validation (see
    :func:`_carried`), which keeps its own type so that the loader words it like any other.
    """
    details = []
    for item in found:
        if isinstance(item, tuple):
            loc, msg = item
            details.append(InitErrorDetails(type=_problem(msg), loc=loc, input=None))
        elif item["type"] == "storyboard":
            details.append(InitErrorDetails(type=_problem(item["msg"]), loc=item["loc"], input=item.get("input")))
        else:
            detail = InitErrorDetails(type=item["type"], loc=item["loc"], input=item.get("input"))
            if item.get("ctx"):
                detail["ctx"] = item["ctx"]
            details.append(detail)
    return ValidationError.from_exception_data("storyboard", details)


def _carried(errors: list[dict], prefix: tuple = ()) -> list[dict]:
    """Errors of a nested validation (a scene, the defaults), moved under ``prefix``."""
    return [{**err, "loc": (*prefix, *err["loc"])} for err in errors]


# --- values ---------------------------------------------------------------------------------------------------


def _number(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _Bad(f"must be a number (got {describe_value(value)})")
    try:
        number = float(value)
    except OverflowError:
        number = math.inf
    if not math.isfinite(number):
        raise _Bad(f"must be a finite number (got {describe_value(value)})")
    return number


def _rounded(number: float) -> float:
    return round(number, _DECIMALS) + 0.0  # + 0.0 turns -0.0 into 0.0


def _expand_range(spec: dict, max_count: int) -> tuple[float, ...]:
    """``{from, to, step}`` as its values, ``to`` included within a 1e-9 tolerance."""
    found = [((key,), unknown_key(key, _RANGE_KEYS)) for key in spec if key not in _RANGE_KEYS]
    numbers = {}
    for key in _RANGE_KEYS:
        if key not in spec:
            found.append(((), f"a range needs '{key}': write {{from: 0.8, to: 1.5, step: 0.1}}"))
            continue
        try:
            numbers[key] = _number(spec[key])
        except _Bad as e:
            found.append(((key,), str(e)))
    if found:
        raise _problems(found)
    start, stop, step = numbers["from"], numbers["to"], numbers["step"]
    if step <= 0:
        raise _problems([(("step",), f"must be more than 0 (got {describe_value(spec['step'])})")])
    if stop < start:
        raise _problems([((), f"the range goes down (from {start!r} to {stop!r}); put the smaller number in 'from'")])
    steps = (stop - start + _RANGE_TOLERANCE) / step
    if not steps < max_count:  # also catches inf
        raise _problems([((), f"the range makes more than max_keyframes ({max_count}) values; use a larger step")])
    values = tuple(_rounded(start + k * step) for k in range(math.floor(steps) + 1))
    if len(set(values)) < len(values):
        raise _problems([(("step",), f"step {step!r} is finer than the {_DECIMALS} decimals values are rounded to")])
    return values


def _edit_values(value: Any, info: ValidationInfo) -> tuple[float, ...]:
    """LIST_OR_RANGE: one number, a list of numbers, or ``{from, to, step}``; rounded to 6 decimals."""
    if isinstance(value, tuple):  # already validated (built in Python)
        value = list(value)
    if isinstance(value, dict):
        return _bounded(_expand_range(value, _context(info, "max_keyframes", DEFAULT_MAX_KEYFRAMES)))
    if not isinstance(value, list):
        try:
            return _bounded((_rounded(_number(value)),))
        except _Bad:
            usage = "must be a number, a list of numbers or a range like {from: 0.8, to: 1.5, step: 0.1}"
            raise _problem(f"{usage} (got {describe_value(value)})") from None
    if len(value) > _context(info, "max_keyframes", DEFAULT_MAX_KEYFRAMES):
        raise _problem(f"lists {len(value)} values, more than max_keyframes; render fewer")
    if not value:
        raise _problem("list at least one value")
    found, values = [], {}  # a dict keeps the order
    for i, item in enumerate(value):
        try:
            number = _rounded(_number(item))
        except _Bad as e:
            found.append(((i,), str(e)))
            continue
        if number in values:
            found.append(((i,), f"value {number!r} is listed twice"))
        values[number] = None
    if found:
        raise _problems(found)
    return _bounded(tuple(values))


def _bounded(values: tuple[float, ...]) -> tuple[float, ...]:
    """Refuse coefficients far outside anything that edits an image (they name files with hundreds of digits and
    render black frames), and values whose keyframe names would be the same (names keep 2 decimals)."""
    found = [((i,), f"{v!r} is outside -{MAX_COEFFICIENT}..{MAX_COEFFICIENT}; useful values are around 0-2")
             for i, v in enumerate(values) if abs(v) > MAX_COEFFICIENT]
    if found:
        raise _problems(found) if len(values) > 1 else _problem(found[0][1])
    first: dict[str, float] = {}
    for i, v in enumerate(values):
        label = f"{v:.2f}"
        if label in first:
            raise _problems([((i,) if len(values) > 1 else (), f"{first[label]!r} and {v!r} would both name keyframes"
                              f" '{label}' (names keep 2 decimals); use values that differ in the first 2 decimals")])
        first[label] = v
    return values


# Edit coefficients (gamma, alpha, beta) beyond this are refused; the paper's are 0-2.
MAX_COEFFICIENT = 100.0


def _short_text(value: str) -> str:
    if len(value) > config.DEFAULT_MAX_PROMPT_CHARS:
        raise _problem(
            f"is {len(value)} characters, more than {config.DEFAULT_MAX_PROMPT_CHARS}; CLIP reads the first 77 tokens"
            " (about 300 characters)"
        )
    return value


def _context(info: ValidationInfo, key: str, default: Any) -> Any:
    return (info.context or {}).get(key, default)


def _base(info: ValidationInfo) -> str:
    """The folder relative paths resolve against: the storyboard's folder (local or s3://), else the cwd."""
    return _context(info, "base", None) or os.getcwd()


def _split_s3(uri: str) -> tuple[str, str]:
    """``s3://bucket/key`` -> (bucket, key) under the runtime's bucket rules; the key may be empty."""
    try:
        return config.split_s3(uri)
    except ValueError as e:
        raise _Bad(f"s3 URI '{uri}': {e}") from None


def _resolve(value: str, base: str, *, need_key: bool) -> str:
    """A path or URI from the storyboard, resolved: an absolute local path, or an s3:// URI."""
    if not value:
        raise _Bad("must not be empty")
    if value.startswith("s3://"):
        bucket, key = _split_s3(value)
        if need_key and not key:
            raise _Bad(f"s3 URI '{value}' names no key; write s3://{bucket}/path/to/file")
        problem = config.s3_key_problem(key if need_key else key.rstrip("/"))
        if problem:
            raise _Bad(f"s3 URI '{config.printable(value)}' {problem}")
        return value
    if config.URL_SCHEME.match(value):
        raise _Bad(f"'{value}': only local paths and s3:// URIs are supported")
    if value.startswith("~"):
        return os.path.normpath(os.path.expanduser(value))
    if os.path.isabs(value):
        return os.path.normpath(value)
    if not base.startswith("s3://"):
        return os.path.normpath(os.path.join(base, value))
    bucket, prefix = _split_s3(base)
    key = posixpath.normpath(posixpath.join(prefix, value))
    if key == ".." or key.startswith("../"):
        raise _Bad(f"'{value}' climbs out of the bucket (relative to s3://{bucket}/{prefix})")
    key = "" if key == "." else key
    if need_key and not key:
        raise _Bad(f"'{value}' names the storyboard's folder, not a file")
    return f"s3://{bucket}/{key}" if key else f"s3://{bucket}"


# --- models ---------------------------------------------------------------------------------------------------


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False, protected_namespaces=())


_Int = Annotated[int, Strict()]
_Float = Annotated[float, Strict()]  # ints are accepted, bools and numeric strings are not
_Bool = Annotated[bool, Strict()]
_Str = Annotated[str, Strict()]


class Location(_Frozen):
    """A file or folder the storyboard names: as written, and resolved (absolute local path or s3:// URI)."""

    given: str
    resolved: str


def _location(value: Any, info: ValidationInfo, *, need_key: bool) -> Location:
    if isinstance(value, Location):
        return value
    if not isinstance(value, str):
        raise _problem(f"must be a path or an s3:// URI (got {describe_value(value)})")
    try:
        return Location(given=value, resolved=_resolve(value, _base(info), need_key=need_key))
    except _Bad as e:
        raise _problem(str(e)) from None


class ModelSource(_Frozen):
    """Where a base model comes from, as :func:`fastimagic.models.load_base_model` takes it in ``resolved``.

    kind: ``tiny`` (built in), ``hub`` (a repo id), ``folder`` (a diffusers folder) or ``single_file`` (one
    checkpoint). resolved: ``tiny``, the repo id, or an absolute local path.
    """

    given: str
    kind: Literal["tiny", "hub", "folder", "single_file"]
    resolved: str


TINY = ModelSource(given="tiny", kind="tiny", resolved="tiny")


def _model_source(value: Any, info: ValidationInfo, *, allow_pickle: bool) -> ModelSource:
    if isinstance(value, ModelSource):
        return value
    if not isinstance(value, str):
        raise _Bad(f"must be a hub repo id, a local path or 'tiny' (got {describe_value(value)})")
    if not value:
        raise _Bad("must not be empty")
    base = _base(info)
    try:
        kind = config.model_kind(value, base)
    except ValueError as e:
        raise _Bad(str(e)) from None
    if kind in ("tiny", "hub"):
        return ModelSource(given=value, kind=kind, resolved=value)
    resolved = _resolve(value, base, need_key=True)
    if resolved.startswith("s3://"):
        raise _Bad(f"'{value}' is relative to an s3:// storyboard; models load from local paths or hub repo ids")
    if config.is_pickle(value) and not allow_pickle:
        raise _Bad("pickle checkpoints can run code; set allow_pickle: true to load it anyway")
    return ModelSource(given=value, kind=kind, resolved=resolved)


class FinetuneSettings(_Frozen):
    """How the one fine-tune runs. Same fields as :class:`fastimagic.finetuning.FinetuneConfig`.

    The defaults are the released implementation's, which made the published numbers. steps: most optimiser steps.
    batch_size: copies of the image latent per step. min_steps / loss_threshold: once ``min_steps`` updates are
    done, a loss under ``loss_threshold`` ends the fine-tune. text_lr / unet_lr: learning rates for the source
    embedding and the UNet. trained_blocks: ``reference`` (the released code's blocks), ``paper`` (the paper's
    text) or UNet block names. seed: the noise.
    """

    steps: Annotated[_Int, Field(ge=1, le=1000)] = 40
    batch_size: Annotated[_Int, Field(ge=1, le=64)] = 10
    min_steps: Annotated[_Int, Field(ge=0, le=1000)] = 36
    loss_threshold: Annotated[_Float, Field(ge=0)] = 0.03
    text_lr: Annotated[_Float, Field(gt=0, le=1)] = 1e-3
    unet_lr: Annotated[_Float, Field(gt=0, le=1)] = 6e-5
    trained_blocks: str | tuple[str, ...] = "reference"
    seed: Annotated[_Int, Field(ge=0, le=MAX_SEED)] = 0
    gradient_checkpointing: _Bool = False

    @field_validator("trained_blocks", mode="before")
    @classmethod
    def _trained_blocks(cls, value: Any) -> str | tuple[str, ...]:
        if isinstance(value, str):
            if value in BLOCK_PRESETS:
                return value
            close = difflib.get_close_matches(value, BLOCK_PRESETS, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise _problem(
                f"unknown preset '{value}'{hint}; use {' or '.join(BLOCK_PRESETS)}, or a list of UNet blocks"
                " like [down_blocks.0, up_blocks.1]"
            )
        if not isinstance(value, (list, tuple)) or not value:
            presets = ", ".join(BLOCK_PRESETS)
            raise _problem(f"must be a preset ({presets}) or a list of UNet blocks (got {describe_value(value)})")
        found, seen = [], set()
        for i, name in enumerate(value):
            if not isinstance(name, str) or not _BLOCK_NAME.fullmatch(name):
                found.append(((i,), f"must be a UNet block name like down_blocks.0 (got {describe_value(name)})"))
                continue
            root, _, rest = name.partition(".")
            if root not in UNET_BLOCKS:
                close = difflib.get_close_matches(root, UNET_BLOCKS, n=1)
                hint = f"did you mean '{close[0]}'?" if close else f"the UNet has {', '.join(UNET_BLOCKS)}"
                found.append(((i,), f"unknown UNet block '{name}' ({hint})"))
            elif root in ("down_blocks", "up_blocks") and rest.split(".")[0].isdigit():
                # The model's own levels (SDXL: 3) are checked against its family before the run starts.
                if int(rest.split(".")[0]) >= UNET_LEVELS:
                    levels = f"{root}.0 to {root}.{UNET_LEVELS - 1}, SDXL {root}.0 to {root}.2"
                    found.append(((i,), f"'{name}': SD 1.x and 2.x have {levels}"))
            if name in seen:
                found.append(((i,), f"'{name}' is listed twice"))
            seen.add(name)
        if found:
            raise _problems(found)
        return tuple(value)


class CaptionSettings(_Frozen):
    """How BLIP captions the reference when no ``source_prompt`` is given. The defaults decode as the released
    implementation does (``generate()`` as configured: greedy). num_beams: beam search width (1: greedy).
    max_new_tokens: most words-pieces of the caption (None: the model's own limit)."""

    num_beams: Annotated[_Int, Field(ge=1, le=16)] = 1
    max_new_tokens: Annotated[_Int, Field(ge=1, le=200)] | None = None


class SubtractSweep(_Frozen):
    """Vector subtraction, ``e = e_src + gamma * (e_tgt - e_src)``, for each gamma (see :mod:`fastimagic.merge`)."""

    gamma: tuple[float, ...]

    _values = field_validator("gamma", mode="before")(_edit_values)


class ProjectSweep(_Frozen):
    """Vector projection, ``e = alpha * e_src + beta * e_edit`` (e_edit: e_tgt orthogonal to e_src), for each pair."""

    alpha: tuple[float, ...]
    beta: tuple[float, ...]

    _values = field_validator("alpha", "beta", mode="before")(_edit_values)

    @model_validator(mode="after")
    def _pairs(self, info: ValidationInfo) -> ProjectSweep:
        # Counted, never expanded: two ranges under the cap can still make 100 million pairs.
        cap = _context(info, "max_keyframes", DEFAULT_MAX_KEYFRAMES)
        pairs = len(self.alpha) * len(self.beta)
        if pairs > cap:
            raise _problem(
                f"{len(self.alpha)} alpha x {len(self.beta)} beta values make {pairs} pairs, more than max_keyframes"
                f" ({cap}); use fewer values"
            )
        return self


class Edit(_Frozen):
    """How a scene merges e_src with its prompt's embedding: exactly one of ``subtract`` or ``project``."""

    subtract: SubtractSweep | None = None
    project: ProjectSweep | None = None

    @model_validator(mode="before")
    @classmethod
    def _one_mode(cls, data: Any) -> Any:
        if isinstance(data, dict):
            if "subtract" in data and "project" in data:
                raise _problem("choose one of subtract or project, not both")
            for mode, needs in (("subtract", "gamma"), ("project", "alpha and beta")):
                if mode in data and data[mode] is None:
                    raise _problems([((mode,), f"needs {needs}")])
        return data

    @model_validator(mode="after")
    def _has_mode(self) -> Edit:
        if self.subtract is None and self.project is None:
            raise _problem("choose subtract: {gamma: ...} or project: {alpha: ..., beta: ...}")
        return self

    @property
    def mode(self) -> Literal["subtract", "project"]:
        return "subtract" if self.subtract is not None else "project"

    def count(self) -> int:
        """How many merges :meth:`combos` makes, without making them."""
        if self.subtract is not None:
            return len(self.subtract.gamma)
        assert self.project is not None
        return len(self.project.alpha) * len(self.project.beta)

    def combos(self) -> list[MergeEdit]:
        """Every merge this edit asks for, in render order: a :class:`~fastimagic.merge.Subtract` per gamma, or a
        :class:`~fastimagic.merge.Project` per (alpha, beta) pair."""
        if self.subtract is not None:
            return [Subtract(g) for g in self.subtract.gamma]
        assert self.project is not None
        return [Project(a, b) for a, b in product(self.project.alpha, self.project.beta)]


DEFAULT_EDIT = Edit.model_validate({"subtract": {"gamma": {"from": 0.8, "to": 1.5, "step": 0.1}}})


class Select(_Frozen):
    """Which keyframes of a scene to pick for the video stage, by score (see :mod:`fastimagic.picking`).

    top: how many picks. min_clip: least CLIP text alignment (0-100). max_lpips: most LPIPS distance to the
    reference (when LPIPS is the fidelity metric). min_fidelity: least CLIP image similarity to the reference
    (when that is the metric).
    """

    top: Annotated[_Int, Field(ge=1, le=1000)] = 1
    min_clip: Annotated[_Float, Field(ge=0, le=100)] | None = None
    max_lpips: Annotated[_Float, Field(ge=0)] | None = None
    min_fidelity: Annotated[_Float, Field(ge=-1, le=1)] | None = None


def _forget_name(name: Any) -> str:
    if not isinstance(name, str):
        raise _Bad(f"must be a strategy name (got {describe_value(name)})")
    if name in STRATEGIES:
        return name
    if name in ALIASES:
        return ALIASES[name]
    known = [*STRATEGIES, *ALIASES]
    close = difflib.get_close_matches(name, known, n=1) or difflib.get_close_matches(name.lower(), known, n=1)
    if close:
        raise _Bad(f"unknown strategy '{name}' (did you mean '{close[0]}'?)")
    raise _Bad(f"unknown strategy '{name}'; valid: {', '.join(STRATEGIES)} (aliases: {', '.join(ALIASES)})")


class Scene(_Frozen):
    """One scene: a prompt rendered for every seed x edit combo x forgetting strategy (defaults merged in).

    seeds: the seeds (``4`` in YAML means 0..3). forget: canonical strategy names. sigma: how much of the learned
    weights a forgotten tensor keeps (0 forgets completely). guidance: classifier-free guidance scale. steps: DDIM.
    """

    id: str
    prompt: _Str
    negative_prompt: _Str | None = None
    motion: _Str | None = None  # for the video stage: how this scene moves (sequence.json carries it)
    seeds: tuple[int, ...] = (0, 1)
    edit: Edit = DEFAULT_EDIT
    forget: tuple[str, ...] = ("none",)
    sigma: Annotated[_Float, Field(ge=0, le=1)] = 0.0
    guidance: Annotated[_Float, Field(ge=1, le=30)] = 7.5
    steps: Annotated[_Int, Field(ge=1, le=1000)] = 50
    select: Select | None = None
    auto: Thresholds = Thresholds()  # when forget: auto counts a scene as overfitted

    @property
    def auto_forget(self) -> bool:
        return self.forget == (AUTO,)

    @field_validator("id", mode="before")
    @classmethod
    def _id(cls, value: Any) -> str:
        if not isinstance(value, str):
            raise _problem(f"scene id must be text like 'beach-walk' (got {describe_value(value)})")
        if not SLUG.fullmatch(value):
            slug = slugify(value, transliterate=False)  # suggest only a slug a person would recognise
            if slug:
                raise _problem(f"scene id '{value}' must be a slug like '{slug}'")
            raise _problem(
                f"scene id '{value}' must be a slug: lowercase a-z, 0-9, '-' and '_', starting with a letter or digit"
            )
        return value

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, value: str) -> str:
        if not value.strip():
            raise _problem("must not be empty")
        return _short_text(value)

    @field_validator("negative_prompt", "motion")
    @classmethod
    def _texts(cls, value: str | None) -> str | None:
        return None if value is None else _short_text(value)

    @field_validator("seeds", mode="before")
    @classmethod
    def _seeds(cls, value: Any, info: ValidationInfo) -> tuple[int, ...]:
        cap = _context(info, "max_seeds", DEFAULT_MAX_SEEDS)
        raise_cap = "; raise max_seeds at the top level if you mean it"
        if isinstance(value, int) and not isinstance(value, bool):
            if value < 1:
                raise _problem(f"must be at least 1 seed (got {value})")
            if value > cap:
                raise _problem(f"{value} seeds is more than max_seeds ({cap}){raise_cap}")
            return tuple(range(value))
        if not isinstance(value, (list, tuple)):
            raise _problem(f"must be a count like 4 or a list of seeds like [0, 7, 42] (got {describe_value(value)})")
        if not value:
            raise _problem("list at least one seed")
        found, seen = [], set()
        for i, seed in enumerate(value):
            if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
                got = describe_value(seed)
                found.append(((i,), f"a seed must be a whole number from 0 to {MAX_SEED} (got {got})"))
            elif seed in seen:
                found.append(((i,), f"seed {seed} is listed twice"))
            seen.add(seed if isinstance(seed, int) else None)
        if len(value) > cap:
            found.append(((), f"{len(value)} seeds is more than max_seeds ({cap}){raise_cap}"))
        if found:
            raise _problems(found)
        return tuple(value)

    @field_validator("forget", mode="before")
    @classmethod
    def _forget(cls, value: Any) -> tuple[str, ...]:
        if value == AUTO:
            return (AUTO,)
        if isinstance(value, (list, tuple)) and AUTO in value:
            raise _problem("'auto' chooses the strategies itself: write forget: auto on its own, not in a list")
        if isinstance(value, str):
            try:
                return (_forget_name(value),)
            except _Bad as e:
                raise _problem(str(e)) from None
        if not isinstance(value, (list, tuple)):
            raise _problem(f"must be a strategy name or a list of them (got {describe_value(value)})")
        if not value:
            raise _problem("list at least one strategy (none keeps every learned weight)")
        found, names = [], {}  # a dict keeps the order
        for i, name in enumerate(value):
            try:
                canonical = _forget_name(name)
            except _Bad as e:
                found.append(((i,), str(e)))
                continue
            if canonical in names:
                same = f" ('{name}' means '{canonical}')" if name != canonical else ""
                found.append(((i,), f"strategy '{canonical}' is listed twice{same}"))
            names[canonical] = None
        if found:
            raise _problems(found)
        return tuple(names)

    def keyframe_count(self) -> int:
        """Keyframes this scene renders: seeds x edit combos x forgetting strategies (``auto``: at most 3 passes)."""
        passes = 3 if self.auto_forget else len(self.forget)
        return len(self.seeds) * self.edit.count() * passes


class Storyboard(_Frozen):
    """A validated storyboard. Build it with :func:`load_storyboard`, which also records where it came from.

    Scenes have ``defaults`` merged in. ``reference`` and ``output`` keep the path as written and its resolved
    form; ``model`` says what kind of model source it is; ``vae``: a VAE replacing the model's (a hub id or a
    diffusers folder, e.g. a float16-safe SDXL VAE). ``resolution`` is (width, height) in pixels, or one number:
    the shorter side, the other following the reference's aspect ratio; unset, the model's own side (512 for SD 1.x,
    768 for SD 2.x, 1024 for SDXL; see :meth:`size_for`).
    ``fit``: how the reference meets that size (:data:`~fastimagic.config.FIT_MODES`). ``precision``: the UNet's
    compute precision (:data:`~fastimagic.config.PRECISIONS`; checked against the device when the run starts).
    """

    name: _Str
    allow_pickle: _Bool = False
    max_side: Annotated[_Int, Field(ge=MIN_SIDE)] = DEFAULT_MAX_SIDE
    max_seeds: Annotated[_Int, Field(ge=1)] = DEFAULT_MAX_SEEDS
    max_keyframes: Annotated[_Int, Field(ge=1)] = DEFAULT_MAX_KEYFRAMES
    reference: Location
    model: ModelSource = TINY
    model_config_source: ModelSource | None = Field(None, alias="model_config")
    resolution: int | tuple[int, int] | None = None
    vae: ModelSource | None = None
    fit: _Str = "crop"
    precision: _Str = "auto"
    source_prompt: _Str | None = None
    caption: CaptionSettings = CaptionSettings()
    finetune: FinetuneSettings = FinetuneSettings()
    output: Location = Field("./keyframes", validate_default=True)
    scorer: _Str = "auto"
    scenes: tuple[Scene, ...] = ()

    _source: str = PrivateAttr("")
    _source_text: str = PrivateAttr("")
    _lines: dict = PrivateAttr(default_factory=dict)  # field path -> line in the file, for later checks' messages
    _max_reference_bytes: int = PrivateAttr(config.DEFAULT_MAX_REFERENCE_BYTES)
    _side_cap: int | None = PrivateAttr(None)  # an operator's policy may lower max_side (see fastimagic.policy)

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not slugify(value):
            raise _problem(f"name '{value}' needs letters or digits: its slug names the run's folder")
        return value

    @field_validator("reference", mode="before")
    @classmethod
    def _reference(cls, value: Any, info: ValidationInfo) -> Location:
        return _location(value, info, need_key=True)

    @field_validator("output", mode="before")
    @classmethod
    def _output(cls, value: Any, info: ValidationInfo) -> Location:
        return _location(value, info, need_key=False)

    @field_validator("model", mode="before")
    @classmethod
    def _model(cls, value: Any, info: ValidationInfo) -> ModelSource:
        try:
            return _model_source(value, info, allow_pickle=info.data.get("allow_pickle", False))
        except _Bad as e:
            raise _problem(str(e)) from None

    @field_validator("model_config_source", mode="before")
    @classmethod
    def _model_config(cls, value: Any, info: ValidationInfo) -> ModelSource | None:
        if value is None:
            return None
        try:
            source = _model_source(value, info, allow_pickle=False)
        except _Bad as e:
            raise _problem(str(e)) from None
        if source.kind not in ("hub", "folder"):
            raise _problem("must be a hub repo id or a diffusers folder: it supplies configs and the tokenizer")
        model = info.data.get("model")
        if model is not None and model.kind != "single_file":
            raise _problem("only applies when model is a single-file checkpoint (.safetensors); remove it")
        return source

    @field_validator("vae", mode="before")
    @classmethod
    def _vae(cls, value: Any, info: ValidationInfo) -> ModelSource | None:
        if value is None:
            return None
        try:
            source = _model_source(value, info, allow_pickle=False)
        except _Bad as e:
            raise _problem(str(e)) from None
        if source.kind not in ("hub", "folder"):
            raise _problem("must be a hub repo id or a diffusers VAE folder (with config.json)")
        return source

    @field_validator("resolution", mode="before")
    @classmethod
    def _resolution(cls, value: Any, info: ValidationInfo) -> int | tuple[int, int] | None:
        if value is None:
            return None
        usage = f"must be a size like 512 or '768x512' (got {describe_value(value)})"
        if isinstance(value, tuple) and len(value) == 2 and all(type(v) is int for v in value):
            (width, height), labels = value, ("width", "height")
        elif isinstance(value, int) and not isinstance(value, bool):
            width = height = value
            labels = ("side",)
        elif isinstance(value, str) and (m := re.fullmatch(r"\s*(\d+)\s*[xX×]\s*(\d+)\s*", value)):
            (width, height), labels = (int(m[1]), int(m[2])), ("width", "height")
        else:
            raise _problem(usage)
        cap = info.data.get("max_side", DEFAULT_MAX_SIDE)
        issues = []
        for label, side in zip(labels, (width, height)):
            if side < MIN_SIDE:
                issues.append(f"{label} {side} is less than {MIN_SIDE}")
            elif side > cap:
                issues.append(f"{label} {side} is more than max_side {cap} (raise max_side if you mean it)")
            if side % 8:
                below = side // 8 * 8
                near = f"{below} or {below + 8}" if below >= MIN_SIDE else f"{max(below + 8, MIN_SIDE)}"
                issues.append(f"{label} {side} is not a multiple of 8 (try {near})")
        if issues:
            raise _problem(f"{width}x{height}: " + "; ".join(issues))
        return width if labels == ("side",) else (width, height)

    @field_validator("fit")
    @classmethod
    def _fit(cls, value: str) -> str:
        return _one_of(value, FIT_MODES, "mode")

    @field_validator("precision")
    @classmethod
    def _precision(cls, value: str) -> str:
        return _one_of(value, PRECISIONS, "precision")

    @field_validator("scorer")
    @classmethod
    def _scorer(cls, value: str, info: ValidationInfo) -> str:
        if value in ("auto", "none", "tiny"):
            return value
        try:
            source = _model_source(value, info, allow_pickle=False)
        except _Bad as e:
            raise _problem(str(e).replace("'tiny'", "'auto', 'none' or 'tiny'")) from None
        if source.kind not in ("hub", "folder"):
            raise _problem("must be 'auto', 'none', 'tiny', a CLIP hub repo id or a local CLIP folder")
        return source.resolved

    @property
    def scorer_name(self) -> str | None:
        """The CLIP scorer to load, or None when scoring is off. ``auto``: tiny for the tiny model, else CLIP L/14."""
        if self.scorer == "none":
            return None
        if self.scorer == "auto":
            return "tiny" if self.model.kind == "tiny" else "openai/clip-vit-large-patch14"
        return self.scorer

    @field_validator("source_prompt")
    @classmethod
    def _source_prompt(cls, value: str | None) -> str | None:
        if value is not None and not value.strip():
            raise _problem("must not be empty; leave it out to caption the reference image with BLIP")
        return None if value is None else _short_text(value)

    @model_validator(mode="wrap")
    @classmethod
    def _with_scenes(cls, data: Any, handler: Any, info: ValidationInfo) -> Storyboard:
        # Scenes are validated here, one by one, rather than by the field machinery: defaults merge into them,
        # limits set at the top level apply to them, and every broken scene is reported even when the top level
        # or another scene is broken too.
        if not isinstance(data, dict):
            return handler(data)
        found: list = []
        top = {k: v for k, v in data.items() if k not in ("scenes", "defaults")}
        board = None
        try:
            board = handler(top)  # first the top level alone: the scenes need its limits
        except ValidationError as e:
            found += _carried(e.errors())
        limits = {
            name: getattr(board, name) if board else _raw_limit(data, name, default)
            for name, default in (("max_seeds", DEFAULT_MAX_SEEDS), ("max_keyframes", DEFAULT_MAX_KEYFRAMES))
        }
        scenes = _scenes(data, {**(info.context or {}), **limits}, found)
        needs_scores = [s.id for s in scenes if s.auto_forget or s.select is not None]
        if board is not None and board.scorer == "none" and needs_scores:
            found.append(
                (
                    ("scorer",),
                    f"none, but scenes {', '.join(needs_scores)} use forget: auto or select, which need"
                    " scores; set scorer: auto",
                )
            )
        if found:
            raise _problems(found)
        # Once more with the scenes, so that Storyboard(...) fills in itself (validated Scenes are kept as they are).
        return handler({**top, "scenes": scenes})

    @property
    def slug(self) -> str:
        """The run's folder name, from ``name``."""
        return slugify(self.name)

    def size_for(self, image_size: tuple[int, int], model_side: int) -> tuple[int, int]:
        """The (width, height) the fine-tune and keyframes use for a reference of ``image_size``: the resolution as
        given, or for one number (``model_side``, the model's own, when none is given) the reference's aspect ratio
        with that shorter side (both sides rounded to a multiple of 8). Raises :class:`InputError` when the longer
        side comes out over ``max_side``."""
        if isinstance(self.resolution, tuple):
            return self.resolution
        side = self.resolution or model_side
        width, height = size_for(image_size, side, SIDE_MULTIPLE)
        cap = min(self.max_side, self._side_cap or self.max_side)
        if max(width, height) > cap:
            w, h = image_size
            raise InputError(
                f"{self.source or 'storyboard'} resolution: {side} on a {w}x{h} reference gives"
                f" {width}x{height}, over max_side {cap}; give a size such as"
                f" '{min(width, cap)}x{min(height, cap)}'" + (" or raise max_side" if cap == self.max_side else "")
            )
        return width, height

    def describe_resolution(self) -> str:
        """The resolution as a person reads it: ``768x512``, or ``512 (shorter side, the reference's aspect)``."""
        if isinstance(self.resolution, tuple):
            return f"{self.resolution[0]}x{self.resolution[1]}"
        if self.resolution is None:
            return "the model's own resolution (shorter side, the reference's aspect)"
        return f"{self.resolution} (shorter side, the reference's aspect)"

    @property
    def source(self) -> str:
        """Where the storyboard was read from (path or URI as given to :func:`load_storyboard`)."""
        return self._source

    def limit(self, *, side: int | None = None, reference_bytes: int | None = None) -> None:
        """Lower the run-time caps (an operator's policy does): the longest side a one-number resolution may
        reach, and the reference image's size in bytes. Raising them has no effect."""
        if side is not None:
            self._side_cap = min(side, self._side_cap or side)
        if reference_bytes is not None:
            self._max_reference_bytes = min(reference_bytes, self._max_reference_bytes)

    @property
    def max_reference_bytes(self) -> int:
        """The most bytes the reference image may have (default 50 MB, lower under a policy)."""
        return self._max_reference_bytes

    def line(self, *loc: str | int) -> int | None:
        """The line of a field of this storyboard's file (or of its nearest written parent), None when unknown."""
        return next((self._lines[loc[:n]] for n in range(len(loc), -1, -1) if loc[:n] in self._lines), None)

    def where(self, *loc: str | int) -> str:
        """``FILE:LINE FIELD.PATH`` for a field of this storyboard, as the loader words its problems."""
        line = self.line(*loc)
        path = ""
        for part in loc:
            path += f"[{part}]" if isinstance(part, int) else f".{part}" if path else str(part)
        at = f"{self.source or 'storyboard'}:{line}" if line else self.source or "storyboard"
        return f"{at} {path}" if path else at

    @property
    def source_text(self) -> str:
        """The YAML exactly as written, for the manifest."""
        return self._source_text

    def keyframe_count(self) -> int:
        """Keyframes the whole storyboard renders."""
        return sum(scene.keyframe_count() for scene in self.scenes)


def _raw_limit(data: dict, name: str, default: int) -> int:
    # Used only when the top level failed to validate: the value as written if it is usable, else the default.
    value = data.get(name, default)
    return value if type(value) is int and value >= 1 else default


def _scenes(data: dict, context: dict, found: list) -> tuple[Scene, ...]:
    """Validate ``defaults`` and ``scenes``; append problems to ``found``; return the scenes that validated."""
    defaults = data.get("defaults", {})
    if not isinstance(defaults, dict):
        found.append((("defaults",), f"must be a mapping of scene fields (got {describe_value(defaults)})"))
        defaults = {}
    if "id" in defaults:
        found.append((("defaults", "id"), "a default id makes no sense; give each scene its own"))
    inherited = {k: v for k, v in defaults.items() if k != "id"}
    if inherited:
        try:
            Scene.model_validate({"id": "defaults", "prompt": "defaults", **inherited}, context=context)
        except ValidationError as e:
            found += _carried(e.errors(), ("defaults",))

    raw = data.get("scenes")
    if raw is None:
        found.append((("scenes",), "is required: list at least one scene, each with an id and a prompt"))
        return ()
    if not isinstance(raw, (list, tuple)):
        found.append((("scenes",), f"must be a list of scenes (got {describe_value(raw)})"))
        return ()
    if not raw:
        found.append((("scenes",), "list at least one scene"))
        return ()
    scenes, first_index = [], {}
    for i, item in enumerate(raw):
        if isinstance(item, Scene):
            scenes.append(item)
        elif not isinstance(item, dict):
            got = describe_value(item)
            found.append((("scenes", i), f"a scene must be a mapping with an id and a prompt (got {got})"))
        else:
            try:
                scenes.append(Scene.model_validate({**inherited, **item}, context=context))
            except ValidationError as e:
                # A problem in an inherited value is reported once, under defaults.
                own = [
                    err for err in e.errors() if not (err["loc"] and err["loc"][0] in inherited.keys() - item.keys())
                ]
                found += _carried(own, ("scenes", i))
        scene_id = item.id if isinstance(item, Scene) else item.get("id") if isinstance(item, dict) else None
        if isinstance(scene_id, str) and SLUG.fullmatch(scene_id):
            if scene_id in first_index:
                used = f"scene id '{scene_id}' is already used by scenes[{first_index[scene_id]}]"
                found.append((("scenes", i, "id"), used))
            else:
                first_index[scene_id] = i

    # With broken scenes left out the count is a lower bound, so going over is still worth saying now.
    total, cap = sum(s.keyframe_count() for s in scenes), context["max_keyframes"]
    if total > cap:
        big = max(scenes, key=Scene.keyframe_count)
        found.append(
            (
                ("scenes",),
                f"the storyboard makes {total} keyframes, more than max_keyframes ({cap}); the largest scene,"
                f" '{big.id}', makes {big.keyframe_count()} ({len(big.seeds)} seeds x {big.edit.count()} edits"
                f" x {len(big.forget)} forget strategies). Render fewer, or raise max_keyframes",
            )
        )
    return tuple(scenes)
