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

:func:`load_storyboard` reads it and checks everything before any model is loaded. It reports every problem at
once, one line each, as ``FILE:LINE FIELD.PATH: message``, and raises :class:`StoryboardError` carrying them.

YAML is read with the safe loader only (``yaml.safe_load``'s constructors; tags that could build Python objects
are refused), plus one change: a number written without a dot such as ``1e-3`` is a float, as in YAML 1.2, and
not the string YAML 1.1 makes of it. Line numbers come from the composed node tree.
"""

from __future__ import annotations

import difflib
import math
import os
import posixpath
import re
import typing
import unicodedata
from collections.abc import Mapping
from itertools import product
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
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

from fastimagic.errors import InputError
from fastimagic.forgetting import ALIASES, STRATEGIES

FORGET_STRATEGIES: tuple[str, ...] = tuple(STRATEGIES)
FORGET_ALIASES: dict[str, str] = dict(ALIASES)

DEFAULT_MAX_SEEDS = 64
DEFAULT_MAX_KEYFRAMES = 10_000
DEFAULT_MAX_SIDE = 2048
MIN_SIDE = 64  # the smallest image whose latent keeps a spatial extent at every UNet level
MAX_SEED = 2**32 - 1
SLUG = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}")
# Same list as fastimagic.models.PICKLE_SUFFIXES, written out because that module imports torch.
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
CHECKPOINT_SUFFIXES = (".safetensors", *PICKLE_SUFFIXES)
# fastimagic.finetuning.BLOCK_PRESETS holds what each preset trains; its module imports torch.
BLOCK_PRESETS = ("paper", "reference")
# UNet2DConditionModel children that hold parameters, and how many down/up blocks SD 1.x has.
_UNET_BLOCKS = ("conv_in", "time_embedding", "down_blocks", "mid_block", "up_blocks", "conv_norm_out", "conv_out")
_UNET_LEVELS = 4
_RANGE_KEYS = ("from", "to", "step")
_RANGE_TOLERANCE = 1e-9
_DECIMALS = 6
_MAX_YAML_NODES = 100_000  # anchors and aliases can make a small file expand to billions of values

_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}")
_BUCKET = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,254}")  # AWS's rules are stricter; S3-compatible stores vary
_URL_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")
_BLOCK_NAME = re.compile(r"[a-z_]+(\.[a-z0-9_]+)*")


class StoryboardError(InputError):
    """The storyboard has problems. ``problems`` holds one ``FILE:LINE FIELD.PATH: message`` line for each."""

    def __init__(self, problems: list[str] | str):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("\n".join(self.problems))

    def __reduce__(self):  # keep the lines separate across pickling (orchestrators ship exceptions)
        return (type(self), (self.problems,))


def slugify(text: str, max_length: int = 64) -> str:
    """``text`` as a folder-safe slug (ASCII lowercase, digits, ``-``, ``_``): 'Beach Walk' -> 'beach-walk'."""
    ascii_text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode().lower()
    slug = re.sub(r"[^a-z0-9_]+", "-", ascii_text).strip("-_")
    return slug[:max_length].rstrip("-_")


# --- messages -------------------------------------------------------------------------------------------------


class _Bad(Exception):
    """One problem with one value, found by a helper below; the validator that called it says where."""


def _describe(value: Any) -> str:
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


def _unknown_key(key: Any, allowed: typing.Iterable[str]) -> str:
    allowed = list(allowed)
    close = difflib.get_close_matches(str(key), allowed, n=1)
    if close:
        return f"unknown key '{key}' (did you mean '{close[0]}'?)"
    return f"unknown key '{key}'; allowed here: {', '.join(allowed)}"


def _problem(message: str) -> PydanticCustomError:
    # The message travels in the context so that braces in user values never meet str.format.
    return PydanticCustomError("storyboard", "{message}", {"message": message})


def _problems(found: list[tuple[tuple, str]]) -> ValidationError:
    """Several problems at once, at locations relative to the value being validated (pydantic prefixes them)."""
    return ValidationError.from_exception_data(
        "storyboard", [InitErrorDetails(type=_problem(msg), loc=loc, input=None) for loc, msg in found]
    )


def _model_in(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        if found := _model_in(arg):
            return found
    return None


def _keys_at(model: type[BaseModel], loc: tuple) -> list[str]:
    """The keys a person may write in the mapping at ``loc`` inside ``model``."""
    for part in loc:
        if isinstance(part, int):
            continue
        field = next((f for n, f in model.model_fields.items() if (f.alias or n) == part), None)
        inner = _model_in(field.annotation) if field else None
        if inner is None:
            return []
        model = inner
    keys = [f.alias or n for n, f in model.model_fields.items()]
    return [*keys, "defaults"] if model is Storyboard else keys


def _explain(errors: list[dict], root: type[BaseModel], prefix: tuple = ()) -> list[tuple[tuple, str]]:
    """Pydantic errors as (location, sentence), leaving out 'is required' where a misspelt key already says it."""
    misspelt = set()
    for err in errors:
        if err["type"] == "extra_forbidden":
            parent = tuple(err["loc"][:-1])
            misspelt.update(
                (*parent, k) for k in difflib.get_close_matches(str(err["loc"][-1]), _keys_at(root, parent), n=1)
            )
    return [_located(e, root, prefix) for e in errors if not (e["type"] == "missing" and tuple(e["loc"]) in misspelt)]


def _located(err: dict, root: type[BaseModel], prefix: tuple = ()) -> tuple[tuple, str]:
    """One pydantic error as (location, sentence); ``root`` is the model the error's location starts from."""
    loc = tuple(err["loc"])
    if err["type"] == "invalid_key":  # the location ends with the offending key itself
        return (*prefix, *loc[:-1]), f"key {_describe(loc[-1])} must be text; put it in quotes"
    return (*prefix, *loc), _message(err, root)


_BOUNDS = {
    "greater_than_equal": ("at least", "ge"),
    "greater_than": ("more than", "gt"),
    "less_than_equal": ("at most", "le"),
    "less_than": ("less than", "lt"),
}


def _message(err: dict, root: type[BaseModel]) -> str:
    kind, ctx, got = err["type"], err.get("ctx") or {}, _describe(err.get("input"))
    if kind == "storyboard":
        return err["msg"]
    if kind == "missing":
        return "is required"
    if kind == "extra_forbidden":
        return _unknown_key(err["loc"][-1], _keys_at(root, tuple(err["loc"][:-1])))
    if kind in ("int_type", "int_parsing", "int_from_float"):
        return f"must be a whole number (got {got})"
    if kind in ("float_type", "float_parsing"):
        return f"must be a number (got {got})"
    if kind == "finite_number":
        return f"must be a finite number (got {got})"
    if kind == "string_type":
        hint = "; put it in quotes to mean the text" if isinstance(err.get("input"), (int, float)) else ""
        return f"must be text (got {got}){hint}"
    if kind in ("bool_type", "bool_parsing"):
        return f"must be true or false (got {got})"
    if kind in _BOUNDS:
        word, key = _BOUNDS[kind]
        bound = ctx[key]
        bound = int(bound) if isinstance(bound, float) and bound.is_integer() else bound
        return f"must be {word} {bound} (got {got})"
    if kind in ("model_type", "model_attributes_type", "dict_type"):
        return f"must be a mapping of settings (got {got})"
    if kind in ("tuple_type", "list_type"):
        return f"must be a list (got {got})"
    if kind == "string_too_short":
        return "must not be empty"
    if kind == "recursion_loop":
        return "contains itself (a YAML alias inside its own anchor)"
    return err["msg"]


# --- values ---------------------------------------------------------------------------------------------------


def _number(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _Bad(f"must be a number (got {_describe(value)})")
    try:
        number = float(value)
    except OverflowError:
        number = math.inf
    if not math.isfinite(number):
        raise _Bad(f"must be a finite number (got {_describe(value)})")
    return number


def _rounded(number: float) -> float:
    return round(number, _DECIMALS) + 0.0  # + 0.0 turns -0.0 into 0.0


def _expand_range(spec: dict, max_count: int) -> tuple[float, ...]:
    """``{from, to, step}`` as its values, ``to`` included within a 1e-9 tolerance."""
    found = [((key,), _unknown_key(key, _RANGE_KEYS)) for key in spec if key not in _RANGE_KEYS]
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
        raise _problems([(("step",), f"must be more than 0 (got {_describe(spec['step'])})")])
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
        return _expand_range(value, _context(info, "max_keyframes", DEFAULT_MAX_KEYFRAMES))
    if not isinstance(value, list):
        try:
            return (_rounded(_number(value)),)
        except _Bad:
            usage = "must be a number, a list of numbers or a range like {from: 0.8, to: 1.5, step: 0.1}"
            raise _problem(f"{usage} (got {_describe(value)})") from None
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
    return tuple(values)


def _context(info: ValidationInfo, key: str, default: Any) -> Any:
    return (info.context or {}).get(key, default)


def _base(info: ValidationInfo) -> str:
    """The folder relative paths resolve against: the storyboard's folder (local or s3://), else the cwd."""
    return _context(info, "base", None) or os.getcwd()


def _split_s3(uri: str) -> tuple[str, str]:
    """``s3://bucket/key`` -> (bucket, key); the key may be empty."""
    bucket, _, key = uri[len("s3://") :].partition("/")
    if not bucket:
        raise _Bad(f"s3 URI '{uri}' names no bucket; write s3://BUCKET/KEY")
    if not _BUCKET.fullmatch(bucket):
        raise _Bad(f"s3 bucket name '{bucket}' is not valid (letters, digits, '.', '-' and '_')")
    return bucket, key


def _resolve(value: str, base: str, *, need_key: bool) -> str:
    """A path or URI from the storyboard, resolved: an absolute local path, or an s3:// URI."""
    if not value:
        raise _Bad("must not be empty")
    if value.startswith("s3://"):
        bucket, key = _split_s3(value)
        if need_key and not key:
            raise _Bad(f"s3 URI '{value}' names no key; write s3://{bucket}/path/to/file")
        return value
    if _URL_SCHEME.match(value):
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

    @property
    def is_s3(self) -> bool:
        return self.resolved.startswith("s3://")


def _location(value: Any, info: ValidationInfo, *, need_key: bool) -> Location:
    if isinstance(value, Location):
        return value
    if not isinstance(value, str):
        raise _problem(f"must be a path or an s3:// URI (got {_describe(value)})")
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
        raise _Bad(f"must be a hub repo id, a local path or 'tiny' (got {_describe(value)})")
    if not value:
        raise _Bad("must not be empty")
    if value == "tiny":
        return TINY
    if _URL_SCHEME.match(value):
        raise _Bad(f"'{value}': models load from a hub repo id, a local folder or a local checkpoint file, not a URL")
    base = _base(info)
    suffix = os.path.splitext(value)[1].lower()
    looks_local = value.startswith((".", "/", "~")) or suffix in CHECKPOINT_SUFFIXES or value.count("/") > 1
    if not looks_local and not base.startswith("s3://"):
        looks_local = os.path.exists(os.path.join(base, value))
    if not looks_local:
        if _HUB_ID.fullmatch(value) and ".." not in value:
            return ModelSource(given=value, kind="hub", resolved=value)
        raise _Bad(
            f"'{value}' is not a hub repo id like 'org/name', a local path (start it with ./ or /),"
            " a .safetensors checkpoint or 'tiny'"
        )
    resolved = _resolve(value, base, need_key=True)
    if resolved.startswith("s3://"):
        raise _Bad(f"'{value}' is relative to an s3:// storyboard; models load from local paths or hub repo ids")
    if suffix in PICKLE_SUFFIXES and not allow_pickle:
        raise _Bad("pickle checkpoints can run code; set allow_pickle: true to load it anyway")
    kind = "single_file" if suffix in CHECKPOINT_SUFFIXES else "folder"
    return ModelSource(given=value, kind=kind, resolved=resolved)


class FinetuneSettings(_Frozen):
    """How the one fine-tune runs; the defaults are the paper's. Same fields as ``fastimagic.finetuning.FinetuneConfig``.

    steps: most optimiser steps. batch_size: copies of the image latent per step. min_steps / loss_threshold: stop
    early after ``min_steps`` once the loss is below ``loss_threshold``. text_lr / unet_lr: learning rates for the
    source embedding and the UNet. trained_blocks: ``paper``, ``reference`` or UNet block names. seed: the noise.
    """

    steps: Annotated[_Int, Field(ge=1, le=1000)] = 40
    batch_size: Annotated[_Int, Field(ge=1, le=64)] = 10
    min_steps: Annotated[_Int, Field(ge=0, le=1000)] = 35
    loss_threshold: Annotated[_Float, Field(ge=0)] = 0.03
    text_lr: Annotated[_Float, Field(gt=0, le=1)] = 1e-3
    unet_lr: Annotated[_Float, Field(gt=0, le=1)] = 6e-5
    trained_blocks: str | tuple[str, ...] = "paper"
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
            raise _problem(f"must be a preset ({presets}) or a list of UNet blocks (got {_describe(value)})")
        found, seen = [], set()
        for i, name in enumerate(value):
            if not isinstance(name, str) or not _BLOCK_NAME.fullmatch(name):
                found.append(((i,), f"must be a UNet block name like down_blocks.0 (got {_describe(name)})"))
                continue
            root, _, rest = name.partition(".")
            if root not in _UNET_BLOCKS:
                close = difflib.get_close_matches(root, _UNET_BLOCKS, n=1)
                hint = f"did you mean '{close[0]}'?" if close else f"the UNet has {', '.join(_UNET_BLOCKS)}"
                found.append(((i,), f"unknown UNet block '{name}' ({hint})"))
            elif root in ("down_blocks", "up_blocks") and rest.split(".")[0].isdigit():
                if int(rest.split(".")[0]) >= _UNET_LEVELS:
                    found.append(((i,), f"'{name}': SD 1.x has {root}.0 to {root}.{_UNET_LEVELS - 1}"))
            if name in seen:
                found.append(((i,), f"'{name}' is listed twice"))
            seen.add(name)
        if found:
            raise _problems(found)
        return tuple(value)


class Subtract(_Frozen):
    """Vector subtraction, ``e = e_src + gamma * (e_tgt - e_src)``, for each gamma (see :mod:`fastimagic.merge`)."""

    gamma: tuple[float, ...]

    _values = field_validator("gamma", mode="before")(_edit_values)


class Project(_Frozen):
    """Vector projection, ``e = alpha * e_src + beta * e_edit`` (e_edit: e_tgt orthogonal to e_src), for each pair."""

    alpha: tuple[float, ...]
    beta: tuple[float, ...]

    _values = field_validator("alpha", "beta", mode="before")(_edit_values)


class Edit(_Frozen):
    """How a scene merges e_src with its prompt's embedding: exactly one of ``subtract`` or ``project``."""

    subtract: Subtract | None = None
    project: Project | None = None

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

    def combos(self) -> list[dict]:
        """Every merge this edit asks for: ``{"mode": "subtract", "gamma": g}`` or ``{"mode": "project", ...}``."""
        if self.subtract is not None:
            return [{"mode": "subtract", "gamma": g} for g in self.subtract.gamma]
        assert self.project is not None
        return [{"mode": "project", "alpha": a, "beta": b} for a, b in product(self.project.alpha, self.project.beta)]


DEFAULT_EDIT = Edit.model_validate({"subtract": {"gamma": {"from": 0.8, "to": 1.5, "step": 0.1}}})


AUTO = "auto"  # forget: auto — render without forgetting, re-render with a strategy if the result overfits


class Select(_Frozen):
    """Which keyframes of a scene to pick for the video stage, by score (see :mod:`fastimagic.selection`).

    top: how many picks. min_clip: least CLIP text alignment (0-100). max_lpips: most LPIPS distance to the
    reference (when LPIPS is the fidelity metric). min_fidelity: least CLIP image similarity to the reference
    (when that is the metric).
    """

    top: Annotated[_Int, Field(ge=1, le=1000)] = 1
    min_clip: Annotated[_Float, Field(ge=0, le=100)] | None = None
    max_lpips: Annotated[_Float, Field(ge=0)] | None = None
    min_fidelity: Annotated[_Float, Field(ge=-1, le=1)] | None = None


class AutoForget(_Frozen):
    """Thresholds of ``forget: auto``: a first pass overfits when its best CLIP score is under ``clip`` while it
    stays close to the reference (CLIP image similarity at least ``clip_image``, or LPIPS at most ``lpips``)."""

    clip: Annotated[_Float, Field(ge=0, le=100)] = 27.0
    clip_image: Annotated[_Float, Field(ge=-1, le=1)] = 0.9
    lpips: Annotated[_Float, Field(ge=0)] = 0.2


def _forget_name(name: Any) -> str:
    if not isinstance(name, str):
        raise _Bad(f"must be a strategy name (got {_describe(name)})")
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
    seeds: tuple[int, ...] = (0, 1)
    edit: Edit = DEFAULT_EDIT
    forget: tuple[str, ...] = ("none",)
    sigma: Annotated[_Float, Field(ge=0, le=1)] = 0.0
    guidance: Annotated[_Float, Field(ge=1, le=30)] = 7.5
    steps: Annotated[_Int, Field(ge=1, le=1000)] = 50
    select: Select | None = None
    auto: AutoForget = AutoForget()

    @property
    def auto_forget(self) -> bool:
        return self.forget == (AUTO,)

    @field_validator("id", mode="before")
    @classmethod
    def _id(cls, value: Any) -> str:
        if not isinstance(value, str):
            raise _problem(f"scene id must be text like 'beach-walk' (got {_describe(value)})")
        if not SLUG.fullmatch(value):
            slug = slugify(value)
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
        return value

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
            raise _problem(f"must be a count like 4 or a list of seeds like [0, 7, 42] (got {_describe(value)})")
        if not value:
            raise _problem("list at least one seed")
        found, seen = [], set()
        for i, seed in enumerate(value):
            if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
                found.append(((i,), f"a seed must be a whole number from 0 to {MAX_SEED} (got {_describe(seed)})"))
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
            raise _problem(f"must be a strategy name or a list of them (got {_describe(value)})")
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
        return len(self.seeds) * len(self.edit.combos()) * passes


class Storyboard(_Frozen):
    """A validated storyboard. Build it with :func:`load_storyboard`, which also records where it came from.

    Scenes have ``defaults`` merged in. ``reference`` and ``output`` keep the path as written and its resolved
    form; ``model`` says what kind of model source it is. ``resolution`` is (width, height) in pixels.
    """

    name: _Str
    allow_pickle: _Bool = False
    max_side: Annotated[_Int, Field(ge=MIN_SIDE)] = DEFAULT_MAX_SIDE
    max_seeds: Annotated[_Int, Field(ge=1)] = DEFAULT_MAX_SEEDS
    max_keyframes: Annotated[_Int, Field(ge=1)] = DEFAULT_MAX_KEYFRAMES
    reference: Location
    model: ModelSource = TINY
    model_config_source: ModelSource | None = Field(None, alias="model_config")
    resolution: tuple[int, int] = Field(512, validate_default=True)
    source_prompt: _Str | None = None
    finetune: FinetuneSettings = FinetuneSettings()
    output: Location = Field("./keyframes", validate_default=True)
    scorer: _Str = "auto"
    scenes: tuple[Scene, ...] = ()

    _source: str = PrivateAttr("")
    _source_text: str = PrivateAttr("")

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

    @field_validator("resolution", mode="before")
    @classmethod
    def _resolution(cls, value: Any, info: ValidationInfo) -> tuple[int, int]:
        usage = f"must be a size like 512 or '768x512' (got {_describe(value)})"
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
        return width, height

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
        return value

    @model_validator(mode="wrap")
    @classmethod
    def _with_scenes(cls, data: Any, handler: Any, info: ValidationInfo) -> Storyboard:
        # Scenes are validated here, one by one, rather than by the field machinery: defaults merge into them,
        # limits set at the top level apply to them, and every broken scene is reported even when the top level
        # or another scene is broken too.
        if not isinstance(data, dict):
            return handler(data)
        found: list[tuple[tuple, str]] = []
        top = {k: v for k, v in data.items() if k not in ("scenes", "defaults")}
        board = None
        try:
            board = handler(top)  # first the top level alone: the scenes need its limits
        except ValidationError as e:
            found += _explain(e.errors(), cls)
        limits = {
            name: getattr(board, name) if board else _raw_limit(data, name, default)
            for name, default in (("max_seeds", DEFAULT_MAX_SEEDS), ("max_keyframes", DEFAULT_MAX_KEYFRAMES))
        }
        scenes = _scenes(data, {**(info.context or {}), **limits}, found)
        if found:
            raise _problems(found)
        # Once more with the scenes, so that Storyboard(...) fills in itself (validated Scenes are kept as they are).
        return handler({**top, "scenes": scenes})

    @property
    def slug(self) -> str:
        """The run's folder name, from ``name``."""
        return slugify(self.name)

    @property
    def width(self) -> int:
        return self.resolution[0]

    @property
    def height(self) -> int:
        return self.resolution[1]

    @property
    def source(self) -> str:
        """Where the storyboard was read from (path or URI as given to :func:`load_storyboard`)."""
        return self._source

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


def _scenes(data: dict, context: dict, found: list[tuple[tuple, str]]) -> tuple[Scene, ...]:
    """Validate ``defaults`` and ``scenes``; append problems to ``found``; return the scenes that validated."""
    defaults = data.get("defaults", {})
    if not isinstance(defaults, dict):
        found.append((("defaults",), f"must be a mapping of scene fields (got {_describe(defaults)})"))
        defaults = {}
    if "id" in defaults:
        found.append((("defaults", "id"), "a default id makes no sense; give each scene its own"))
    inherited = {k: v for k, v in defaults.items() if k != "id"}
    if inherited:
        try:
            Scene.model_validate({"id": "defaults", "prompt": "defaults", **inherited}, context=context)
        except ValidationError as e:
            found += _explain(e.errors(), Scene, ("defaults",))

    raw = data.get("scenes")
    if raw is None:
        found.append((("scenes",), "is required: list at least one scene, each with an id and a prompt"))
        return ()
    if not isinstance(raw, (list, tuple)):
        found.append((("scenes",), f"must be a list of scenes (got {_describe(raw)})"))
        return ()
    if not raw:
        found.append((("scenes",), "list at least one scene"))
        return ()
    scenes, first_index = [], {}
    for i, item in enumerate(raw):
        if isinstance(item, Scene):
            scenes.append(item)
        elif not isinstance(item, dict):
            found.append((("scenes", i), f"a scene must be a mapping with an id and a prompt (got {_describe(item)})"))
        else:
            try:
                scenes.append(Scene.model_validate({**inherited, **item}, context=context))
            except ValidationError as e:
                # A problem in an inherited value is reported once, under defaults.
                own = [
                    err for err in e.errors() if not (err["loc"] and err["loc"][0] in inherited.keys() - item.keys())
                ]
                found += _explain(own, Scene, ("scenes", i))
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
                f" '{big.id}', makes {big.keyframe_count()} ({len(big.seeds)} seeds x {len(big.edit.combos())} edits"
                f" x {len(big.forget)} forget strategies). Render fewer, or raise max_keyframes",
            )
        )
    return tuple(scenes)


# --- YAML -----------------------------------------------------------------------------------------------------


class _Loader(yaml.SafeLoader):
    """``yaml.safe_load``'s loader, reading ``1e-3`` (no dot) as a float like YAML 1.2 instead of as text."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)

_MERGE_TAG = "tag:yaml.org,2002:merge"
_SAFE_TAGS = {tag for tag in _Loader.yaml_constructors if tag} | {_MERGE_TAG, "tag:yaml.org,2002:value"}


def _format_path(loc: tuple) -> str:
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else f".{part}" if text else str(part)
    return text


def _short_tag(tag: str) -> str:
    return "!!" + tag[len("tag:yaml.org,2002:") :] if tag.startswith("tag:yaml.org,2002:") else tag


class _TooBig(Exception):
    pass


class _Tree:
    """Walks the composed YAML: line of every field path, refused tags, duplicate keys."""

    def __init__(self, source: str):
        self.source = source
        self.lines: dict[tuple, int] = {}
        self.problems: list[tuple[int, str]] = []
        self.refused_tags = False
        self._seen: set[int] = set()
        self._visits = 0

    def visit(self, node: yaml.Node, path: tuple | None, on_path: frozenset = frozenset()) -> None:
        self._visits += 1
        if self._visits > _MAX_YAML_NODES:
            raise _TooBig
        if id(node) in on_path:  # a recursive alias
            return
        first = id(node) not in self._seen
        self._seen.add(id(node))
        line = node.start_mark.line + 1
        if path is not None:
            self.lines.setdefault(path, line)
        if first and node.tag not in _SAFE_TAGS:
            self.refused_tags = True
            tag = _short_tag(node.tag)
            self.problems.append((line, f"{self.source}:{line}: YAML tag '{tag}' is not allowed (plain YAML only)"))
        on_path = on_path | {id(node)}
        if isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                self.visit(item, None if path is None else (*path, i), on_path)
        elif isinstance(node, yaml.MappingNode):
            keys: dict[tuple[str, str], int] = {}
            merged = []
            for key, value in node.value:
                self.visit(key, None, on_path)
                if key.tag == _MERGE_TAG:
                    merged.append(value)
                    continue
                child = None
                if isinstance(key, yaml.ScalarNode):
                    child = None if path is None else (*path, key.value)
                    key_line = key.start_mark.line + 1
                    if child is not None:
                        self.lines.setdefault(child, key_line)
                    if first and (key.tag, key.value) in keys:
                        where = _format_path(child) if child else key.value
                        self.problems.append(
                            (
                                key_line,
                                f"{self.source}:{key_line} {where}: duplicate key '{key.value}'"
                                f" (first at line {keys[key.tag, key.value]})",
                            )
                        )
                    keys.setdefault((key.tag, key.value), key_line)
                self.visit(value, child, on_path)
            for value in merged:  # merged keys count only where the mapping does not set them itself
                for part in value.value if isinstance(value, yaml.SequenceNode) else [value]:
                    self.visit(part, path, on_path)

    def line_of(self, loc: tuple) -> int:
        for n in range(len(loc), -1, -1):
            if loc[:n] in self.lines:
                return self.lines[loc[:n]]
        return 1


def _yaml_problem(source: str, text: str, err: yaml.YAMLError) -> tuple[int, str]:
    if isinstance(err, yaml.MarkedYAMLError) and (err.problem_mark or err.context_mark):
        mark = err.problem_mark or err.context_mark
        what = err.problem or err.context or "not valid YAML"
        if err.problem and err.context:
            where = f" at line {err.context_mark.line + 1}" if err.context_mark else ""
            what = f"{err.problem} ({err.context}{where})"
        line = mark.line + 1
    else:
        position = getattr(err, "position", None)
        line = text[:position].count("\n") + 1 if isinstance(position, int) else 1
        what = str(err).splitlines()[0] if str(err) else "not valid YAML"
    return line, f"{source}:{line}: YAML syntax error: {what}"


def _parse(text: str, source: str) -> tuple[Any, _Tree | None, list[tuple[int, str]]]:
    """YAML text -> (data, the walked node tree, problems). Data is None when the problems stop validation."""
    try:
        loader = _Loader(text)  # checks the characters already
    except yaml.YAMLError as e:
        return None, None, [_yaml_problem(source, text, e)]
    try:
        root = loader.get_single_node()
        if root is None:
            return None, None, [(1, f"{source}:1: the storyboard is empty; it needs name, reference and scenes")]
        tree = _Tree(source)
        try:
            tree.visit(root, ())
        except _TooBig:
            message = f"expands to more than {_MAX_YAML_NODES} values through aliases; write it out plainly"
            return None, None, [(1, f"{source}:1: {message}")]
        if tree.refused_tags:
            return None, tree, tree.problems
        return loader.construct_document(root), tree, tree.problems
    except yaml.YAMLError as e:
        return None, None, [_yaml_problem(source, text, e)]
    except RecursionError:
        return None, None, [(1, f"{source}:1: the YAML is nested too deeply")]
    finally:
        loader.dispose()


def _folder_of(source: str) -> str:
    if source.startswith("s3://"):
        bucket, key = _split_s3(source)
        folder = posixpath.dirname(key)
        return f"s3://{bucket}/{folder}" if folder else f"s3://{bucket}"
    return os.path.dirname(os.path.abspath(os.path.expanduser(source)))


def load_storyboard(
    path: str | os.PathLike, *, text: str | None = None, overrides: Mapping[str, Any] | None = None
) -> Storyboard:
    """Read and validate a storyboard; raise :class:`StoryboardError` listing every problem found.

    ``path`` is a local file, or (with ``text``) any name, typically the ``s3://`` URI the text was fetched from:
    it names the file in messages and relative paths resolve against its folder (local or s3). ``text``: the YAML
    itself, when the caller already has it. ``overrides``: top-level fields that replace the file's (a CLI's
    ``--output``, say; make relative paths absolute first, or they resolve against the storyboard's folder).
    ``source_text`` stays the file as written. Nothing is downloaded and no referenced file is opened here.
    """
    source = os.fspath(path)
    try:
        base = _folder_of(source)
    except _Bad as e:
        raise StoryboardError([f"{source}: {e}"]) from None
    if text is None:
        if source.startswith("s3://"):
            raise StoryboardError([f"{source}: fetch the text first and pass it as text=; only local files are read"])
        try:
            text = Path(source).read_text(encoding="utf-8-sig")
        except UnicodeDecodeError as e:
            raise StoryboardError([f"{source}: not UTF-8 text (bad byte at offset {e.start})"]) from None
        except OSError as e:
            raise StoryboardError([f"{source}: cannot read the storyboard: {e.strerror or e}"]) from None

    data, tree, problems = _parse(text, source)
    board = None
    if tree is not None and not tree.refused_tags:
        if not isinstance(data, dict):
            problems.append((1, f"{source}:1: the storyboard must be a mapping of settings (got {_describe(data)})"))
        else:
            overrides = dict(overrides or {})
            try:
                board = Storyboard.model_validate({**data, **overrides}, context={"base": base})
            except ValidationError as e:
                for loc, message in _explain(e.errors(), Storyboard):
                    line, where = tree.line_of(loc), _format_path(loc)
                    if loc and loc[0] in overrides:  # not the file's fault: no line to point at
                        problems.append((0, f"{source}: overridden {where}: {message}"))
                    else:
                        problems.append((line, f"{source}:{line}{' ' + where if where else ''}: {message}"))
    if problems or board is None:
        ordered = [message for _, message in sorted(problems, key=lambda p: p[0])]
        raise StoryboardError(list(dict.fromkeys(ordered)))
    board._source = source
    board._source_text = text
    return board
