"""The rules on the values a storyboard holds: numbers and ranges, seeds, strategy names, block names, sizes,
paths. :mod:`fastimagic.storyboard` (the schema) calls them from its validators; each returns the value as the
schema keeps it, or raises a problem at the field (``problem``/``problems``, pydantic errors the loader words as
``FILE:LINE FIELD.PATH: message``).
"""

from __future__ import annotations

import difflib
import math
import os
import posixpath
import re
from collections.abc import Iterable
from typing import Any

from pydantic import ValidationError, ValidationInfo
from pydantic_core import InitErrorDetails, PydanticCustomError

from fastimagic import config
from fastimagic.autoforget import AUTO
from fastimagic.config import (
    BLOCK_PRESETS,
    DEFAULT_MAX_KEYFRAMES,
    MAX_SEED,
    MIN_SIDE,
    UNET_BLOCKS,
    UNET_LEVELS,
    slugify,
)
from fastimagic.forgetting import ALIASES, STRATEGIES

SLUG = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}")
_RANGE_KEYS = ("from", "to", "step")
_RANGE_TOLERANCE = 1e-9
_DECIMALS = 6
_BLOCK_NAME = re.compile(r"[a-z_]+(\.[a-z0-9_]+)*")


# --- messages -------------------------------------------------------------------------------------------------


class Bad(Exception):
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


def one_of(value: str, allowed: tuple[str, ...], what: str) -> str:
    """``value`` if it is one of ``allowed``, else a problem naming the nearest and every allowed value."""
    if value in allowed:
        return value
    close = difflib.get_close_matches(value, allowed, n=1) or difflib.get_close_matches(value.lower(), allowed, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    raise problem(f"unknown {what} '{value}'{hint}; allowed: {', '.join(allowed)}")


def problem(message: str) -> PydanticCustomError:
    # The message travels in the context so that braces in user values never meet str.format.
    return PydanticCustomError("storyboard", "{message}", {"message": message})


def problems(found: list) -> ValidationError:
    """Several problems at once, at locations relative to the value being validated (pydantic prefixes them).

    Each item is ``(location, message)``, or a pydantic error dict carried over from a nested validation (see
    :func:`carried`), which keeps its own type so that the loader words it like any other.
    """
    details = []
    for item in found:
        if isinstance(item, tuple):
            loc, msg = item
            details.append(InitErrorDetails(type=problem(msg), loc=loc, input=None))
        elif item["type"] == "storyboard":
            details.append(InitErrorDetails(type=problem(item["msg"]), loc=item["loc"], input=item.get("input")))
        else:
            detail = InitErrorDetails(type=item["type"], loc=item["loc"], input=item.get("input"))
            if item.get("ctx"):
                detail["ctx"] = item["ctx"]
            details.append(detail)
    return ValidationError.from_exception_data("storyboard", details)


def carried(errors: list[dict], prefix: tuple = ()) -> list[dict]:
    """Errors of a nested validation (a scene, the defaults), moved under ``prefix``."""
    return [{**err, "loc": (*prefix, *err["loc"])} for err in errors]


# --- values ---------------------------------------------------------------------------------------------------


def _number(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise Bad(f"must be a number (got {describe_value(value)})")
    try:
        number = float(value)
    except OverflowError:
        number = math.inf
    if not math.isfinite(number):
        raise Bad(f"must be a finite number (got {describe_value(value)})")
    return number


def _rounded(number: float) -> float:
    return round(number, _DECIMALS) + 0.0  # + 0.0 turns -0.0 into 0.0


def _expand_range(spec: dict, max_count: int, limit_name: str = "max_keyframes") -> tuple[float, ...]:
    """``{from, to, step}`` as its values, ``to`` included within a 1e-9 tolerance."""
    found = [((key,), unknown_key(key, _RANGE_KEYS)) for key in spec if key not in _RANGE_KEYS]
    numbers = {}
    for key in _RANGE_KEYS:
        if key not in spec:
            found.append(((), f"a range needs '{key}': write {{from: 0.8, to: 1.5, step: 0.1}}"))
            continue
        try:
            numbers[key] = _number(spec[key])
        except Bad as e:
            found.append(((key,), str(e)))
    if found:
        raise problems(found)
    start, stop, step = numbers["from"], numbers["to"], numbers["step"]
    if step <= 0:
        raise problems([(("step",), f"must be more than 0 (got {describe_value(spec['step'])})")])
    if stop < start:
        raise problems([((), f"the range goes down (from {start!r} to {stop!r}); put the smaller number in 'from'")])
    steps = (stop - start + _RANGE_TOLERANCE) / step
    if not steps < max_count:  # also catches inf
        raise problems([((), f"the range makes more than {max_count} values ({limit_name}); use a larger step")])
    values = tuple(_rounded(start + k * step) for k in range(math.floor(steps) + 1))
    if len(set(values)) < len(values):
        raise problems([(("step",), f"step {step!r} is finer than the {_DECIMALS} decimals values are rounded to")])
    return values


def edit_values(value: Any, info: ValidationInfo) -> tuple[float, ...]:
    """LIST_OR_RANGE: one number, a list of numbers, or ``{from, to, step}``; rounded to 6 decimals."""
    if isinstance(value, tuple):  # already validated (built in Python)
        value = list(value)
    if isinstance(value, dict):
        cap = context(info, "max_keyframes", DEFAULT_MAX_KEYFRAMES)
        return _bounded(_expand_range(value, cap, limit(info.context, "max_keyframes", cap)))
    if not isinstance(value, list):
        try:
            return _bounded((_rounded(_number(value)),))
        except Bad:
            usage = "must be a number, a list of numbers or a range like {from: 0.8, to: 1.5, step: 0.1}"
            raise problem(f"{usage} (got {describe_value(value)})") from None
    cap = context(info, "max_keyframes", DEFAULT_MAX_KEYFRAMES)
    if len(value) > cap:
        raise problem(f"lists {len(value)} values, more than {limit(info.context, 'max_keyframes', cap)}; render fewer")
    if not value:
        raise problem("list at least one value")
    found, values = [], {}  # a dict keeps the order
    for i, item in enumerate(value):
        try:
            number = _rounded(_number(item))
        except Bad as e:
            found.append(((i,), str(e)))
            continue
        if number in values:
            found.append(((i,), f"value {number!r} is listed twice"))
        values[number] = None
    if found:
        raise problems(found)
    return _bounded(tuple(values))


def _bounded(values: tuple[float, ...]) -> tuple[float, ...]:
    """Refuse coefficients far outside anything that edits an image (they name files with hundreds of digits and
    render black frames), and values whose keyframe names would be the same (names keep 2 decimals)."""
    found = [((i,), f"{v!r} is outside -{MAX_COEFFICIENT}..{MAX_COEFFICIENT}; useful values are around 0-2")
             for i, v in enumerate(values) if abs(v) > MAX_COEFFICIENT]
    if found:
        raise problems(found) if len(values) > 1 else problem(found[0][1])
    first: dict[str, float] = {}
    for i, v in enumerate(values):
        label = f"{v:.2f}"
        if label in first:
            raise problems([((i,) if len(values) > 1 else (), f"{first[label]!r} and {v!r} would both name keyframes"
                              f" '{label}' (names keep 2 decimals); use values that differ in the first 2 decimals")])
        first[label] = v
    return values


# Edit coefficients (gamma, alpha, beta) beyond this are refused; the paper's are 0-2.
MAX_COEFFICIENT = 100.0


def short_text(value: str) -> str:
    if len(value) > config.DEFAULT_MAX_PROMPT_CHARS:
        raise problem(
            f"is {len(value)} characters, more than {config.DEFAULT_MAX_PROMPT_CHARS}; CLIP reads the first 77 tokens"
            " (about 300 characters)"
        )
    return value


def context(info: ValidationInfo, key: str, default: Any) -> Any:
    return (info.context or {}).get(key, default)


def base_folder(info: ValidationInfo) -> str:
    """The folder relative paths resolve against: the storyboard's folder (local or s3://), else the cwd."""
    return context(info, "base", None) or os.getcwd()


def _split_s3(uri: str) -> tuple[str, str]:
    """``s3://bucket/key`` -> (bucket, key) under the runtime's bucket rules; the key may be empty."""
    try:
        return config.split_s3(uri)
    except ValueError as e:
        raise Bad(f"s3 URI '{uri}': {e}") from None


def resolve(value: str, base: str, *, need_key: bool) -> str:
    """A path or URI from the storyboard, resolved: an absolute local path, or an s3:// URI."""
    if not value:
        raise Bad("must not be empty")
    if value.startswith("s3://"):
        bucket, key = _split_s3(value)
        if need_key and not key:
            raise Bad(f"s3 URI '{value}' names no key; write s3://{bucket}/path/to/file")
        problem = config.s3_key_problem(key if need_key else key.rstrip("/"))
        if problem:
            raise Bad(f"s3 URI '{config.printable(value)}' {problem}")
        return value
    if config.URL_SCHEME.match(value):
        raise Bad(f"'{value}': only local paths and s3:// URIs are supported")
    if value.startswith("~"):
        return os.path.normpath(os.path.expanduser(value))
    if os.path.isabs(value):
        return os.path.normpath(value)
    if not base.startswith("s3://"):
        return os.path.normpath(os.path.join(base, value))
    bucket, prefix = _split_s3(base)
    key = posixpath.normpath(posixpath.join(prefix, value))
    if key == ".." or key.startswith("../"):
        raise Bad(f"'{value}' climbs out of the bucket (relative to s3://{bucket}/{prefix})")
    key = "" if key == "." else key
    if need_key and not key:
        raise Bad(f"'{value}' names the storyboard's folder, not a file")
    return f"s3://{bucket}/{key}" if key else f"s3://{bucket}"


def forget_name(name: Any) -> str:
    if not isinstance(name, str):
        raise Bad(f"must be a strategy name (got {describe_value(name)})")
    if name in STRATEGIES:
        return name
    if name in ALIASES:
        return ALIASES[name]
    known = [*STRATEGIES, *ALIASES]
    close = difflib.get_close_matches(name, known, n=1) or difflib.get_close_matches(name.lower(), known, n=1)
    if close:
        raise Bad(f"unknown strategy '{name}' (did you mean '{close[0]}'?)")
    raise Bad(f"unknown strategy '{name}'; valid: {', '.join(STRATEGIES)} (aliases: {', '.join(ALIASES)})")


def trained_blocks(value: Any) -> str | tuple[str, ...]:
    """``finetune.trained_blocks``: a preset name, or a list of UNet block names (each once, known to SD)."""
    if isinstance(value, str):
        if value in BLOCK_PRESETS:
            return value
        close = difflib.get_close_matches(value, BLOCK_PRESETS, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise problem(
            f"unknown preset '{value}'{hint}; use {' or '.join(BLOCK_PRESETS)}, or a list of UNet blocks"
            " like [down_blocks.0, up_blocks.1]"
        )
    if not isinstance(value, (list, tuple)) or not value:
        presets = ", ".join(BLOCK_PRESETS)
        raise problem(f"must be a preset ({presets}) or a list of UNet blocks (got {describe_value(value)})")
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
        raise problems(found)
    return tuple(value)




def scene_id(value: Any) -> str:
    """A scene id: a slug (it names folders); a near miss suggests the slug to use."""
    if not isinstance(value, str):
        raise problem(f"scene id must be text like 'beach-walk' (got {describe_value(value)})")
    if not SLUG.fullmatch(value):
        slug = slugify(value, transliterate=False)  # suggest only a slug a person would recognise
        if slug:
            raise problem(f"scene id '{value}' must be a slug like '{slug}'")
        raise problem(
            f"scene id '{value}' must be a slug: lowercase a-z, 0-9, '-' and '_', starting with a letter or digit"
        )
    return value




def limit(context: dict | None, name: str, cap: int) -> str:
    """How a message names the limit ``name`` (``max_seeds``, ``max_keyframes``): the storyboard's own, or an
    operator policy's cap applied while the storyboard is read (``context["policy_limits"]``), before anything
    is expanded."""
    key = ((context or {}).get("policy_limits") or {}).get(name)
    return f"the cap of {cap} (caps.{key}), refused by the policy" if key else f"{name} ({cap})"


def seeds(value: Any, cap: int, context: dict | None = None) -> tuple[int, ...]:
    """``seeds``: a count (``4`` means 0..3) or a list of distinct seeds, at most ``cap``; counted before any is
    made."""
    named = limit(context, "max_seeds", cap)
    raise_cap = "" if "policy" in named else "; raise max_seeds at the top level if you mean it"
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 1:
            raise problem(f"must be at least 1 seed (got {value})")
        if value > cap:
            raise problem(f"{value} seeds is more than {named}{raise_cap}")
        return tuple(range(value))
    if not isinstance(value, (list, tuple)):
        raise problem(f"must be a count like 4 or a list of seeds like [0, 7, 42] (got {describe_value(value)})")
    if not value:
        raise problem("list at least one seed")
    found, seen = [], set()
    for i, seed in enumerate(value):
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
            got = describe_value(seed)
            found.append(((i,), f"a seed must be a whole number from 0 to {MAX_SEED} (got {got})"))
        elif seed in seen:
            found.append(((i,), f"seed {seed} is listed twice"))
        seen.add(seed if isinstance(seed, int) else None)
    if len(value) > cap:
        found.append(((), f"{len(value)} seeds is more than {named}{raise_cap}"))
    if found:
        raise problems(found)
    return tuple(value)




def forget(value: Any) -> tuple[str, ...]:
    """``forget``: ``auto``, a strategy name or a list of them; aliases become the canonical names."""
    if value == AUTO:
        return (AUTO,)
    if isinstance(value, (list, tuple)) and AUTO in value:
        raise problem("'auto' chooses the strategies itself: write forget: auto on its own, not in a list")
    if isinstance(value, str):
        try:
            return (forget_name(value),)
        except Bad as e:
            raise problem(str(e)) from None
    if not isinstance(value, (list, tuple)):
        raise problem(f"must be a strategy name or a list of them (got {describe_value(value)})")
    if not value:
        raise problem("list at least one strategy (none keeps every learned weight)")
    found, names = [], {}  # a dict keeps the order
    for i, name in enumerate(value):
        try:
            canonical = forget_name(name)
        except Bad as e:
            found.append(((i,), str(e)))
            continue
        if canonical in names:
            same = f" ('{name}' means '{canonical}')" if name != canonical else ""
            found.append(((i,), f"strategy '{canonical}' is listed twice{same}"))
        names[canonical] = None
    if found:
        raise problems(found)
    return tuple(names)




def resolution(value: Any, cap: int) -> int | tuple[int, int] | None:
    """``resolution``: one side (an int) or ``WxH``, multiples of 8 from MIN_SIDE to ``cap``; None: unset."""
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
        raise problem(usage)
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
        raise problem(f"{width}x{height}: " + "; ".join(issues))
    return width if labels == ("side",) else (width, height)



