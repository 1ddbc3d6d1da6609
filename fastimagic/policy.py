"""The operator's policy: what a storyboard from someone else (the inbox, ``fastimagic submit``) may ask a worker to do.

A storyboard names files and models by path, and the worker reads and writes them with its own credentials. A
storyboard uploaded to the inbox is written by whoever can upload there, so the operator limits it with a policy
file (``FASTIMAGIC_POLICY`` or ``--policy FILE``)::

    references: [s3://studio-inbox/refs/]        # URI or folder prefixes a storyboard's reference may use
    outputs: [s3://studio-keyframes/]            # prefixes its output may use
    models: [stable-diffusion-v1-5/stable-diffusion-v1-5, tiny]   # ids, folders or files it may name (model:,
                                                 # model_config:, vae: and the scorer alike)
    allow_pickle: false                          # pickle checkpoints (.ckpt/.bin...) even if the storyboard asks
    caps: {keyframes: 2000, seeds: 16, side: 1024, prompt_chars: 1000,
           reference_bytes: 20000000, storyboard_bytes: 1000000,
           finetune_steps: 200, finetune_batch: 16, sampling_steps: 200,   # compute: what one run may cost
           keyframe_pixels: 2097152, budget: 200000}

Every key is optional. Left out, ``references`` and ``outputs`` allow only the storyboard's *home*: the inbox's own
bucket (``s3://bucket/``) for an S3 inbox, the inbox folder for a local one, or for ``fastimagic submit`` the
bucket of an ``s3://`` storyboard (a local storyboard has no home: name its prefixes). ``models`` left out allows
the tiny models and hub repo ids, never a local path; ``allow_pickle`` is false; caps are :data:`DEFAULT_CAPS`. With no
policy file at all every key takes its default: :func:`default_policy`.

A storyboard's own caps (``max_keyframes``, ``max_seeds``, ``max_side``) can only lower the operator's: the check
below applies the policy's caps whatever the storyboard says. :func:`check` looks at text only (paths, URIs,
counts), never at the worker's files, so what it reports tells an uploader what the policy refused and nothing
about what exists on the worker.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, Strict, ValidationError, field_validator

from fastimagic import config
from fastimagic.errors import InputError

POLICY_ENV = "FASTIMAGIC_POLICY"
_MAX_POLICY_BYTES = 1_000_000

_Cap = Annotated[int, Strict(), Field(ge=1)]


class Caps(BaseModel):
    """The most a storyboard may ask for. keyframes: in the whole storyboard. seeds: per scene. side: pixels, each
    side of the keyframes. prompt_chars: characters of any one prompt. reference_bytes: size of the reference
    image. storyboard_bytes: size of the storyboard file.

    Compute (the paper's fine-tune is 40 steps at batch 10, its sampling 50 steps): finetune_steps and
    finetune_batch: the fine-tune's steps and batch size; sampling_steps: DDIM steps of any scene;
    keyframe_pixels: width x height of a keyframe; budget: the whole run in megapixel-steps, every keyframe's
    sampling steps x its megapixels plus the fine-tune's steps x batch x megapixels x 3 (a training sample costs
    about a forward and a backward pass). A one-number resolution counts as a square, an unset one as 1024 x 1024
    (64 x 64 for the tiny models)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    keyframes: _Cap = config.DEFAULT_MAX_KEYFRAMES
    seeds: _Cap = config.DEFAULT_MAX_SEEDS
    side: Annotated[int, Strict(), Field(ge=config.MIN_SIDE)] = config.DEFAULT_MAX_SIDE
    prompt_chars: _Cap = config.DEFAULT_MAX_PROMPT_CHARS
    reference_bytes: _Cap = config.DEFAULT_MAX_REFERENCE_BYTES
    storyboard_bytes: _Cap = config.DEFAULT_MAX_STORYBOARD_BYTES
    finetune_steps: _Cap = 200
    finetune_batch: _Cap = 16
    sampling_steps: _Cap = 200
    keyframe_pixels: _Cap = 2048 * 1024
    budget: _Cap = 200_000


DEFAULT_CAPS = Caps()


def _prefix(value: Any) -> str:
    """A policy prefix: ``s3://bucket[/prefix]`` or an absolute local folder (``~`` expanded)."""
    if not isinstance(value, str) or not value:
        raise ValueError("must be an s3://bucket/prefix or an absolute folder")
    if value.startswith("s3://"):
        bucket, key = config.split_s3(value)
        problem = config.s3_key_problem(key.rstrip("/"))
        if problem:
            raise ValueError(f"'{value}' {problem}")
        return f"s3://{bucket}/{key}"
    if config.URL_SCHEME.match(value):
        raise ValueError(f"'{value}': only s3:// prefixes and local folders are supported")
    path = os.path.expanduser(value)
    if not os.path.isabs(path):
        raise ValueError(f"'{value}' must be an absolute folder (start it with /) or an s3:// prefix")
    return os.path.normpath(path)


def _model_entry(value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError("must be a tiny model, a hub repo id, or an absolute folder or checkpoint file")
    if value in config.TINY_MODELS:
        return value
    path = os.path.expanduser(value)
    if os.path.isabs(path):
        return os.path.normpath(path)
    try:
        kind = config.model_kind(value)
    except ValueError as e:
        raise ValueError(str(e)) from None
    if kind != "hub":
        raise ValueError(f"'{value}': local models must be absolute paths (start it with /)")
    return value


class Policy(BaseModel):
    """An operator policy (see the module docstring). ``None`` for references/outputs/models: the defaults."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    references: tuple[str, ...] | None = None
    outputs: tuple[str, ...] | None = None
    models: tuple[str, ...] | None = None
    allow_pickle: Annotated[bool, Strict()] = False
    caps: Caps = DEFAULT_CAPS

    _source: str = PrivateAttr("")

    @property
    def source(self) -> str:
        """The policy file it was read from ("" for the default policy, or one passed as data)."""
        return self._source

    @field_validator("references", "outputs", mode="before")
    @classmethod
    def _prefixes(cls, value: Any) -> Any:
        if value is None:
            return None
        if not isinstance(value, (list, tuple)):
            raise ValueError("must be a list of s3://bucket/prefix or absolute folders")
        return tuple(_prefix(v) for v in value)

    @field_validator("models", mode="before")
    @classmethod
    def _models(cls, value: Any) -> Any:
        if value is None:
            return None
        if not isinstance(value, (list, tuple)):
            raise ValueError("must be a list of model ids, folders or files")
        return tuple(_model_entry(v) for v in value)


def default_policy() -> Policy:
    """The policy for untrusted storyboards when the operator wrote none: the storyboard's home only, tiny and hub
    models, no pickle, default caps."""
    return Policy()


class PolicyError(InputError):
    """The policy file itself is broken; ``problems`` holds one ``FILE:LINE FIELD: message`` line each."""

    def __init__(self, problems: list[str] | str):
        self.problems = [config.printable(p) for p in ([problems] if isinstance(problems, str) else problems)]
        super().__init__("\n".join(self.problems))

    def __reduce__(self):
        return (type(self), (self.problems,))


def load_policy(path: str | os.PathLike) -> Policy:
    """Read and validate a policy file; raise :class:`PolicyError` listing every problem as ``FILE:LINE FIELD``."""
    from fastimagic.store import StoreError, read_local
    from fastimagic.storyboard_yaml import _explain, _format_path, _parse

    source = os.fspath(path)
    try:
        data = read_local(Path(source).expanduser(), max_bytes=_MAX_POLICY_BYTES, shown=source)
        text = data.decode("utf-8-sig")
    except StoreError as e:
        raise PolicyError(f"policy {e}") from None
    except UnicodeDecodeError as e:
        raise PolicyError(f"{source}: not UTF-8 text (bad byte at offset {e.start})") from None
    parsed, tree, problems = _parse(text, source, empty="the policy is empty; write {} for the defaults")
    if tree is None or tree.refused_tags:
        raise PolicyError([m for _, m in sorted(problems, key=lambda p: p[0])])
    if not isinstance(parsed, dict):
        raise PolicyError(f"{source}:1: the policy must be a mapping of settings")
    try:
        policy = Policy.model_validate(parsed)
    except ValidationError as e:
        for loc, message in _explain(e.errors(), Policy):
            line = tree.line_of(loc)
            if message.startswith("Value error, "):
                message = message[len("Value error, ") :]
            problems.append((line, f"{source}:{line} {_format_path(loc)}: {message}"))
        raise PolicyError(list(dict.fromkeys(m for _, m in sorted(problems, key=lambda p: p[0])))) from None
    if problems:
        raise PolicyError([m for _, m in sorted(problems, key=lambda p: p[0])])
    policy._source = source
    return policy


def policy_from(path: str | None = None) -> Policy:
    """The operator's policy: ``path`` (``--policy``), else ``$FASTIMAGIC_POLICY``, else :func:`default_policy`."""
    path = path or os.environ.get(POLICY_ENV)
    return load_policy(path) if path else default_policy()


# --- the check ------------------------------------------------------------------------------------------------


def home_of(uri: str) -> str | None:
    """The default allowed prefix for a storyboard (or inbox) at ``uri``: its bucket for ``s3://``, else None."""
    if uri.startswith("s3://"):
        try:
            bucket, _ = config.split_s3(uri)
        except ValueError:
            return None
        return f"s3://{bucket}/"
    return None


def _under(value: str, prefix: str) -> bool:
    if prefix.startswith("s3://"):
        if not value.startswith("s3://"):
            return False
        base = prefix.rstrip("/")
        return value == base or value.startswith(base + "/") or (prefix.endswith("/") and value == prefix)
    if value.startswith("s3://"):
        return False
    from fastimagic.store import inside

    # Symlinks are followed on both sides: a link inside an allowed folder that points out of it is outside. The
    # file is checked again as it is opened (Storyboard.reference_roots), so a link swapped in later is refused.
    return inside(value, prefix)


def _shown(prefixes: tuple[str, ...]) -> str:
    return ", ".join(prefixes) if prefixes else "nothing"


def check(board: Any, policy: Policy, home: str | None = None) -> list[str]:
    """Every way ``board`` (a loaded :class:`~fastimagic.storyboard.Storyboard`) breaks ``policy``, one
    ``FILE:LINE FIELD: policy ...`` line each; empty when it complies.

    ``home``: the prefix allowed when the policy leaves ``references`` / ``outputs`` out (the inbox root; default:
    the storyboard's own bucket, see :func:`home_of`). Only text is compared: nothing on the worker is opened.
    """
    home = home if home is not None else home_of(board.source)
    homes = (home,) if home else ()
    found: list[tuple[int, str]] = []
    named = f" ({policy.source})" if policy.source else ""

    def refuse(loc: tuple, message: str) -> None:
        found.append((board.line(*loc) or 0, f"{board.where(*loc)}: refused by the policy{named}: {message}"))

    for field, allowed in (("reference", policy.references), ("output", policy.outputs)):
        prefixes = allowed if allowed is not None else homes
        value = getattr(board, field).resolved
        if not prefixes:
            refuse((field,), f"{_clean(getattr(board, field).given)}: no {field} location is allowed (a local"
                   " storyboard has no home bucket); the operator names them in a policy file (--policy FILE or"
                   f" ${POLICY_ENV}: {field}s: [...])")
        elif not any(_under(value, p) for p in prefixes):
            where = "allowed prefixes" if allowed is not None else "the storyboard's home"
            refuse((field,), f"{_clean(getattr(board, field).given)} is not under {where}: {_shown(prefixes)}")

    models = [("model", board.model)]
    if board.model_config_source is not None:
        models.append(("model_config", board.model_config_source))
    if board.vae is not None:  # weights too: a VAE override is loaded as a model is
        models.append(("vae", board.vae))
    if board.scorer not in ("auto", "none", "tiny"):
        models.append(("scorer", None))
    for field, source in models:
        kind = source.kind if source is not None else ("folder" if os.path.isabs(board.scorer) else "hub")
        resolved = source.resolved if source is not None else board.scorer
        given = source.given if source is not None else board.scorer
        if policy.models is None:
            if kind in ("folder", "single_file"):
                refuse((field,), f"{_clean(given)}: local models are not allowed; the operator lists them in models:")
            continue
        local = kind in ("folder", "single_file")
        ok = any(
            (_under(resolved, m) if local and os.path.isabs(m) else resolved == m) for m in policy.models
        )
        if not ok:
            refuse((field,), f"model {_clean(given)} is not one of the allowed models: {', '.join(policy.models)}")

    if board.allow_pickle and not policy.allow_pickle:
        refuse(("allow_pickle",), "pickle checkpoints are not allowed (allow_pickle: false)")

    caps = policy.caps
    total = board.keyframe_count()
    if total > caps.keyframes:
        refuse(("scenes",), f"{total} keyframes is more than the cap of {caps.keyframes}")
    def scene_field(i: int, field: str) -> tuple:
        # A value the scene inherits is pointed at where it is written: under defaults.
        own = ("scenes", i, field)
        return ("defaults", field) if own not in board._lines and ("defaults", field) in board._lines else own

    for i, scene in enumerate(board.scenes):
        if len(scene.seeds) > caps.seeds:
            refuse(scene_field(i, "seeds"), f"{len(scene.seeds)} seeds is more than the cap of {caps.seeds}")
        for field in ("prompt", "negative_prompt", "motion"):
            text = getattr(scene, field)
            if text is not None and len(text) > caps.prompt_chars:
                refuse(scene_field(i, field), f"{len(text)} characters is more than the cap of {caps.prompt_chars}")
    if board.source_prompt is not None and len(board.source_prompt) > caps.prompt_chars:
        refuse(("source_prompt",), f"{len(board.source_prompt)} characters is more than the cap of {caps.prompt_chars}")
    # An unset resolution is the model's own side; like a one-number one, its longer side is capped at run time.
    sides = board.resolution if isinstance(board.resolution, tuple) else (board.resolution or 0,)
    if max(sides) > caps.side:
        refuse(("resolution",), f"{max(sides)} px is more than the cap of {caps.side} px a side")
    for field, value, cap in (("steps", board.finetune.steps, caps.finetune_steps),
                              ("batch_size", board.finetune.batch_size, caps.finetune_batch)):
        if value > cap:
            refuse(("finetune", field), f"{value} is more than the cap of {cap} (caps.finetune_{field.split('_')[0]})")
    for i, scene in enumerate(board.scenes):
        if scene.steps > caps.sampling_steps:
            refuse(scene_field(i, "steps"), f"{scene.steps} sampling steps is more than the cap of"
                   f" {caps.sampling_steps} (caps.sampling_steps)")
    pixels = keyframe_pixels(board)
    if pixels > caps.keyframe_pixels:
        refuse(("resolution",), f"{pixels} pixels a keyframe is more than the cap of {caps.keyframe_pixels}"
               " (caps.keyframe_pixels)")
    cost = run_cost(board)
    if cost > caps.budget:
        refuse(("scenes",), f"the run would cost about {cost:.0f} megapixel-steps (keyframes x sampling steps x"
               f" megapixels, plus the fine-tune), more than the budget of {caps.budget} (caps.budget)")
    size = len(board.source_text.encode("utf-8", "replace"))
    if size > caps.storyboard_bytes:
        refuse((), f"the file is {size} bytes, more than the cap of {caps.storyboard_bytes}")
    return [message for _, message in sorted(found, key=lambda item: item[0])]


def keyframe_pixels(board: Any) -> int:
    """Width x height of the storyboard's keyframes as the policy counts them, before the reference is seen: a
    one-number resolution as a square, an unset one as 1024 x 1024 (the largest model family's own; 64 x 64 for the
    tiny models)."""
    if isinstance(board.resolution, tuple):
        return board.resolution[0] * board.resolution[1]
    side = board.resolution or (64 if board.model.kind == "tiny" else 1024)
    return side * side


def run_cost(board: Any) -> float:
    """The run's estimated cost in megapixel-steps: every keyframe's sampling steps x megapixels, plus the
    fine-tune's steps x batch x megapixels x 3 (forward and backward)."""
    megapixels = keyframe_pixels(board) / 1e6
    sampling = sum(scene.keyframe_count() * scene.steps for scene in board.scenes)
    return megapixels * (sampling + 3 * board.finetune.steps * board.finetune.batch_size)


def for_home(policy: Policy, home: str | None) -> Policy:
    """``policy`` with left-out ``references`` / ``outputs`` filled in with ``home`` (an inbox root), so that it
    can travel as plain data (a flow parameter) and mean the same on the worker."""
    homes = (home,) if home else ()
    return policy.model_copy(
        update={
            "references": policy.references if policy.references is not None else homes,
            "outputs": policy.outputs if policy.outputs is not None else homes,
        }
    )


def enforce(board: Any, policy: Policy, home: str | None = None) -> None:
    """:func:`check`, raising :class:`PolicyRefused` (an :class:`InputError`) with one line per problem; when it
    passes, the run-time caps (reference bytes, the longer side of a one-number resolution) are set on ``board``."""
    problems = check(board, policy, home)
    if problems:
        raise PolicyRefused(problems)
    home = home if home is not None else home_of(board.source)
    roots = policy.references if policy.references is not None else ((home,) if home else ())
    board.limit(side=policy.caps.side, reference_bytes=policy.caps.reference_bytes,
                reference_roots=tuple(r for r in roots if not r.startswith("s3://")))


_HANDED: ContextVar[Policy | None] = ContextVar("fastimagic_policy", default=None)


@contextmanager
def handed(policy: Policy | None) -> Iterator[None]:
    """Within this block, in this process only, runs obey ``policy`` (the CLI's ``--policy``, the inbox's own rules
    for a storyboard it runs as a subflow). A policy is never taken from a flow or task *parameter*: whoever can
    create a run on the Prefect server writes those (see docs/reliability.md, "Who is trusted with what")."""
    token = _HANDED.set(policy)
    try:
        yield
    finally:
        _HANDED.reset(token)


def operator_policy(*, for_others: bool) -> Policy | None:
    """The policy a run obeys, from this process only: one :func:`handed` over here, else ``$FASTIMAGIC_POLICY``,
    else, when the work is for someone else (a deployment's flow run, a warm worker's task), :func:`default_policy`;
    None for a person's own run with neither."""
    handed_over = _HANDED.get()
    if handed_over is not None:
        return handed_over
    if os.environ.get(POLICY_ENV):
        return load_policy(os.environ[POLICY_ENV])
    return default_policy() if for_others else None


class PolicyRefused(InputError):
    """A storyboard the policy refuses; ``problems``: one line each. Safe to show the uploader."""

    def __init__(self, problems: list[str] | str):
        self.problems = [config.printable(p) for p in ([problems] if isinstance(problems, str) else problems)]
        super().__init__("\n".join(self.problems))

    def __reduce__(self):
        return (type(self), (self.problems,))


def _clean(text: str) -> str:
    return config.printable(text if len(text) <= 200 else text[:197] + "...")

