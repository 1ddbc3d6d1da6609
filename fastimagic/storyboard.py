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

from fastimagic import config
from fastimagic import storyboard_values as values
from fastimagic.autoforget import AUTO, Thresholds
from fastimagic.config import (
    DEFAULT_MAX_KEYFRAMES,
    DEFAULT_MAX_SEEDS,
    DEFAULT_MAX_SIDE,
    FIT_MODES,
    MAX_KEYFRAMES_CEILING,
    MAX_SEED,
    MAX_SEEDS_CEILING,
    MIN_SIDE,
    PRECISIONS,
    SIDE_MULTIPLE,
    size_for,
    slugify,
)
from fastimagic.errors import InputError
from fastimagic.merge import Edit as MergeEdit
from fastimagic.merge import Project, Subtract

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
        raise values.problem(f"must be a path or an s3:// URI (got {values.describe_value(value)})")
    try:
        return Location(given=value, resolved=values.resolve(value, values.base_folder(info), need_key=need_key))
    except values.Bad as e:
        raise values.problem(str(e)) from None


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
        raise values.Bad(f"must be a hub repo id, a local path or 'tiny' (got {values.describe_value(value)})")
    if not value:
        raise values.Bad("must not be empty")
    base = values.base_folder(info)
    try:
        kind = config.model_kind(value, base)
    except ValueError as e:
        raise values.Bad(str(e)) from None
    if kind in ("tiny", "hub"):
        return ModelSource(given=value, kind=kind, resolved=value)
    resolved = values.resolve(value, base, need_key=True)
    if resolved.startswith("s3://"):
        raise values.Bad(f"'{value}' is relative to an s3:// storyboard; models load from local paths or hub repo ids")
    if config.is_pickle(value) and not allow_pickle:
        raise values.Bad("pickle checkpoints can run code; set allow_pickle: true to load it anyway")
    return ModelSource(given=value, kind=kind, resolved=resolved)


def _hub_or_folder(value: Any, info: ValidationInfo, folder: str) -> ModelSource | None:
    """A field that names a hub repo id or a local diffusers ``folder`` (no single files), or None when unset."""
    if value is None:
        return None
    try:
        source = _model_source(value, info, allow_pickle=False)
    except values.Bad as e:
        raise values.problem(str(e)) from None
    if source.kind not in ("hub", "folder"):
        raise values.problem(f"must be a hub repo id or {folder}")
    return source


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
        return values.trained_blocks(value)


class CaptionSettings(_Frozen):
    """How BLIP captions the reference when no ``source_prompt`` is given. The defaults decode as the released
    implementation does (``generate()`` as configured: greedy). num_beams: beam search width (1: greedy).
    max_new_tokens: most words-pieces of the caption (None: the model's own limit)."""

    num_beams: Annotated[_Int, Field(ge=1, le=16)] = 1
    max_new_tokens: Annotated[_Int, Field(ge=1, le=200)] | None = None


class SubtractSweep(_Frozen):
    """Vector subtraction, ``e = e_src + gamma * (e_tgt - e_src)``, for each gamma (see :mod:`fastimagic.merge`)."""

    gamma: tuple[float, ...]

    _values = field_validator("gamma", mode="before")(values.edit_values)


class ProjectSweep(_Frozen):
    """Vector projection, ``e = alpha * e_src + beta * e_edit`` (e_edit: e_tgt orthogonal to e_src), for each pair."""

    alpha: tuple[float, ...]
    beta: tuple[float, ...]

    _values = field_validator("alpha", "beta", mode="before")(values.edit_values)

    @model_validator(mode="after")
    def _pairs(self, info: ValidationInfo) -> ProjectSweep:
        # Counted, never expanded: two ranges under the cap can still make 100 million pairs.
        cap = values.context(info, "max_keyframes", DEFAULT_MAX_KEYFRAMES)
        pairs = len(self.alpha) * len(self.beta)
        if pairs > cap:
            raise values.problem(
                f"{len(self.alpha)} alpha x {len(self.beta)} beta values make {pairs} pairs, more than"
                f" {values.limit(info.context, 'max_keyframes', cap)}; use fewer values"
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
                raise values.problem("choose one of subtract or project, not both")
            for mode, needs in (("subtract", "gamma"), ("project", "alpha and beta")):
                if mode in data and data[mode] is None:
                    raise values.problems([((mode,), f"needs {needs}")])
        return data

    @model_validator(mode="after")
    def _has_mode(self) -> Edit:
        if self.subtract is None and self.project is None:
            raise values.problem("choose subtract: {gamma: ...} or project: {alpha: ..., beta: ...}")
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
        return values.scene_id(value)

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, value: str) -> str:
        if not value.strip():
            raise values.problem("must not be empty")
        return values.short_text(value)

    @field_validator("negative_prompt", "motion")
    @classmethod
    def _texts(cls, value: str | None) -> str | None:
        return None if value is None else values.short_text(value)

    @field_validator("seeds", mode="before")
    @classmethod
    def _seeds(cls, value: Any, info: ValidationInfo) -> tuple[int, ...]:
        return values.seeds(value, values.context(info, "max_seeds", DEFAULT_MAX_SEEDS), info.context)

    @field_validator("forget", mode="before")
    @classmethod
    def _forget(cls, value: Any) -> tuple[str, ...]:
        return values.forget(value)

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
    max_seeds: Annotated[_Int, Field(ge=1, le=MAX_SEEDS_CEILING)] = DEFAULT_MAX_SEEDS
    max_keyframes: Annotated[_Int, Field(ge=1, le=MAX_KEYFRAMES_CEILING)] = DEFAULT_MAX_KEYFRAMES
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
    _overrides: dict = PrivateAttr(default_factory=dict)  # top-level fields given besides the file (a CLI's --output)
    _max_reference_bytes: int = PrivateAttr(config.DEFAULT_MAX_REFERENCE_BYTES)
    _side_cap: int | None = PrivateAttr(None)  # an operator's policy may lower max_side (see fastimagic.policy)
    _reference_roots: tuple[str, ...] | None = PrivateAttr(None)  # and name where a local reference may be

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not slugify(value):
            raise values.problem(f"name '{value}' needs letters or digits: its slug names the run's folder")
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
        except values.Bad as e:
            raise values.problem(str(e)) from None

    @field_validator("model_config_source", mode="before")
    @classmethod
    def _model_config(cls, value: Any, info: ValidationInfo) -> ModelSource | None:
        source = _hub_or_folder(value, info, "a diffusers folder: it supplies configs and the tokenizer")
        model = info.data.get("model")
        if source is not None and model is not None and model.kind != "single_file":
            raise values.problem("only applies when model is a single-file checkpoint (.safetensors); remove it")
        return source

    @field_validator("vae", mode="before")
    @classmethod
    def _vae(cls, value: Any, info: ValidationInfo) -> ModelSource | None:
        return _hub_or_folder(value, info, "a diffusers VAE folder (with config.json)")

    @field_validator("resolution", mode="before")
    @classmethod
    def _resolution(cls, value: Any, info: ValidationInfo) -> int | tuple[int, int] | None:
        return values.resolution(value, info.data.get("max_side", DEFAULT_MAX_SIDE))

    @field_validator("fit")
    @classmethod
    def _fit(cls, value: str) -> str:
        return values.one_of(value, FIT_MODES, "mode")

    @field_validator("precision")
    @classmethod
    def _precision(cls, value: str) -> str:
        return values.one_of(value, PRECISIONS, "precision")

    @field_validator("scorer")
    @classmethod
    def _scorer(cls, value: str, info: ValidationInfo) -> str:
        if value in ("auto", "none", "tiny"):
            return value
        try:
            source = _model_source(value, info, allow_pickle=False)
        except values.Bad as e:
            raise values.problem(str(e).replace("'tiny'", "'auto', 'none' or 'tiny'")) from None
        if source.kind not in ("hub", "folder"):
            raise values.problem("must be 'auto', 'none', 'tiny', a CLIP hub repo id or a local CLIP folder")
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
            raise values.problem("must not be empty; leave it out to caption the reference image with BLIP")
        return None if value is None else values.short_text(value)

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
            found += values.carried(e.errors())
        limits = {
            name: getattr(board, name) if board else _raw_limit(data, name, default)
            for name, default in (("max_seeds", DEFAULT_MAX_SEEDS), ("max_keyframes", DEFAULT_MAX_KEYFRAMES))
        }
        # An operator's caps (load_storyboard(caps=...)) apply here, before any seed or range is expanded.
        caps, by_policy = (info.context or {}).get("caps") or {}, {}
        for name, key in (("max_seeds", "seeds"), ("max_keyframes", "keyframes")):
            if key in caps and caps[key] < limits[name]:
                limits[name], by_policy[name] = caps[key], key
        scenes = _scenes(data, {**(info.context or {}), **limits, "policy_limits": by_policy}, found)
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
            raise values.problems(found)
        # Once more with the scenes, so that Storyboard(...) fills in itself (validated Scenes are kept as they are).
        return handler({**top, "scenes": scenes})

    def local_problems(self) -> list[str]:
        """What is wrong with the local files and folders this storyboard names, known without reading them:
        each must exist and be of its kind (``model``: a diffusers folder or a checkpoint file; ``model_config``,
        ``vae`` and ``scorer``: folders; ``reference``: a regular file). One ``FILE:LINE field: ...`` line each;
        hub ids, ``s3://`` URIs and the tiny models are checked when the run starts. ``[]`` when all is well."""
        import os
        import stat

        found = []

        def check(field: str, given: str, resolved: str, kind: str, what: str) -> None:
            try:
                mode = os.stat(resolved).st_mode
            except FileNotFoundError:
                at = f" ({resolved})" if resolved != given else ""
                found.append(f"{self.where(field)}: {given}: no such {kind}{at}; expected {what}")
                return
            except OSError as e:
                found.append(f"{self.where(field)}: {given}: cannot be read ({e.strerror}); expected {what}")
                return
            if kind == "folder" and not stat.S_ISDIR(mode):
                found.append(f"{self.where(field)}: {given}: is a file, expected a folder: {what}")
            elif kind == "file" and not stat.S_ISREG(mode):
                # worded as the store words it when the run reads the file
                other = ("a folder, expected a file" if stat.S_ISDIR(mode)
                         else f"{config.special_file(mode)}, expected a regular file")
                found.append(f"{self.where(field)}: {given}: is {other}: {what}")
            elif field == "model" and kind == "folder" and not any(
                os.path.exists(os.path.join(resolved, part)) for part in ("model_index.json", "unet")
            ):
                found.append(f"{self.where(field)}: {given}: not a diffusers model folder (no model_index.json or"
                             " unet/)")

        if self.model.kind == "single_file":
            check("model", self.model.given, self.model.resolved, "file", "a .safetensors checkpoint file")
        elif self.model.kind == "folder":
            check("model", self.model.given, self.model.resolved, "folder", "a diffusers model folder")
        for field, source in (("model_config", self.model_config_source), ("vae", self.vae)):
            if source is not None and source.kind == "folder":
                check(field, source.given, source.resolved, "folder", "a local diffusers folder or a hub repo id")
        if self.scorer not in ("auto", "none", "tiny") and os.path.isabs(self.scorer):
            check("scorer", self.scorer, self.scorer, "folder", "a local CLIP folder or a hub repo id")
        if not self.reference.resolved.startswith("s3://"):
            check("reference", self.reference.given, self.reference.resolved, "file",
                  "the reference image (relative paths start at the storyboard's folder)")
        return found

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
            ours = cap == self.max_side  # else the operator's policy set it (caps.side)
            raise InputError(
                f"{self.where('resolution')}: {side} on a {w}x{h} reference gives {width}x{height}, over"
                f" {'max_side' if ours else 'the policy cap (caps.side)'} {cap}; give a size such as"
                f" '{min(width, cap)}x{min(height, cap)}'" + (" or raise max_side" if ours else "")
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

    def limit(
        self, *, side: int | None = None, reference_bytes: int | None = None,
        reference_roots: tuple[str, ...] | None = None,
    ) -> None:
        """Lower the run-time caps (an operator's policy does): the longest side a one-number resolution may
        reach, the reference image's size in bytes, and the local folders a local reference must be in as it is
        opened (:attr:`reference_roots`). Raising them has no effect."""
        if reference_roots is not None:
            self._reference_roots = reference_roots if self._reference_roots is None else tuple(
                r for r in reference_roots if r in self._reference_roots)
        if side is not None:
            self._side_cap = min(side, self._side_cap or side)
        if reference_bytes is not None:
            self._max_reference_bytes = min(reference_bytes, self._max_reference_bytes)

    @property
    def reference_roots(self) -> tuple[str, ...] | None:
        """The local folders a policy allows the reference in, checked on the file as opened; None: no policy."""
        return self._reference_roots

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

    @property
    def overrides(self) -> dict:
        """The top-level fields given to :func:`load_storyboard` besides the file's (``output``, ``model``)."""
        return dict(self._overrides)

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
        found.append((("defaults",), f"must be a mapping of scene fields (got {values.describe_value(defaults)})"))
        defaults = {}
    if "id" in defaults:
        found.append((("defaults", "id"), "a default id makes no sense; give each scene its own"))
    inherited = {k: v for k, v in defaults.items() if k != "id"}
    if inherited:
        try:
            Scene.model_validate({"id": "defaults", "prompt": "defaults", **inherited}, context=context)
        except ValidationError as e:
            found += values.carried(e.errors(), ("defaults",))

    raw = data.get("scenes")
    if raw is None:
        found.append((("scenes",), "is required: list at least one scene, each with an id and a prompt"))
        return ()
    if not isinstance(raw, (list, tuple)):
        found.append((("scenes",), f"must be a list of scenes (got {values.describe_value(raw)})"))
        return ()
    if not raw:
        found.append((("scenes",), "list at least one scene"))
        return ()
    scenes, first_index, total, stopped = [], {}, 0, False
    for i, item in enumerate(raw):
        if total > context["max_keyframes"]:  # counted as they come: no further scene is expanded
            stopped = True
            break
        if isinstance(item, Scene):
            scenes.append(item)
        elif not isinstance(item, dict):
            got = values.describe_value(item)
            found.append((("scenes", i), f"a scene must be a mapping with an id and a prompt (got {got})"))
        else:
            try:
                scenes.append(Scene.model_validate({**inherited, **item}, context=context))
                total += scenes[-1].keyframe_count()
            except ValidationError as e:
                # A problem in an inherited value is reported once, under defaults.
                own = [
                    err for err in e.errors() if not (err["loc"] and err["loc"][0] in inherited.keys() - item.keys())
                ]
                found += values.carried(own, ("scenes", i))
        scene_id = item.id if isinstance(item, Scene) else item.get("id") if isinstance(item, dict) else None
        if isinstance(scene_id, str) and values.SLUG.fullmatch(scene_id):
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
                f"the storyboard makes {total}{' or more' if stopped else ''} keyframes, more than"
                f" {values.limit(context, 'max_keyframes', cap)}; the largest scene,"
                f" '{big.id}', makes {big.keyframe_count()} ({len(big.seeds)} seeds x {big.edit.count()} edits"
                f" x {len(big.forget)} forget strategies). Render fewer"
                + ("" if "policy" in values.limit(context, "max_keyframes", cap) else ", or raise max_keyframes"),
            )
        )
    return tuple(scenes)
