"""Prefect tasks of the storyboard pipeline: each reads its inputs, calls fastimagic once, writes its outputs.

Policy lives in the decorators:

* every task here has side effects or is cheap, so none uses Prefect 3's default input-based caching
  (``cache_policy=NO_CACHE``): a rerun always does the work it names. Fine-tunes are reused by *content key*
  through the object store instead, which also works across machines and flow runs;
* tasks that hold the GPU carry the ``gpu`` tag, so ``prefect concurrency-limit create gpu N`` caps them;
* retries live in two layers only: botocore retries each S3 request (:mod:`fastimagic.store`), and tasks that
  use storage retry with exponential backoff when an object store still fails them (:data:`STORAGE_RETRIES`); bad
  input, a bad model and a full local disk fail at once (they do not heal by waiting).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from contextvars import ContextVar
from dataclasses import dataclass, replace

from PIL import Image
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.tasks import exponential_backoff

from fastimagic import devices, progress
from fastimagic import keyframes as kf
from fastimagic.cache import LruCache
from fastimagic.caption import load_captioner, source_prompt_from_caption
from fastimagic.config import PRECISIONS, printable, slugify
from fastimagic.editor import applied, release
from fastimagic.errors import InputError
from fastimagic.families import Family
from fastimagic.finetuning import FinetuneConfig, finetune
from fastimagic.images import fit, load_reference
from fastimagic.manifests import (
    KeyframeRecord,
    Reference,
    SceneSummary,
    SourcePrompt,
    TuningRef,
    keyframe_record,
    records_are_data,
    scene_manifest,
)
from fastimagic.models import (
    TINY_FAMILIES,
    Components,
    cached_base_model,
    load_base_model,
    model_family,
    model_identity,
)
from fastimagic.picking import scene_picks
from fastimagic.runs import PLAN, plan_record
from fastimagic.sampler import auto_batch_size, chunks, sample
from fastimagic.scoring import load_scorer, prefetch_scorer
from fastimagic.sequence import SEQUENCE, index_page, write_sequence
from fastimagic.store import NotFound, StoreError
from fastimagic.storyboard import Scene, Storyboard
from fastimagic.tiny import TINY_RESOLUTION
from fastimagic.tuning import META_FILE, CorruptTuning, Tuning, content_key
from tasks.params import caption_args, finetune_args, render_args
from tasks.storage import output_store, read

GPU = "gpu"


def _heals(error: BaseException) -> bool:
    """Whether waiting may heal ``error``: an object store's trouble (after botocore's own retries of each request),
    not bad input and not a local disk (a full disk does not heal by waiting)."""
    return isinstance(error, StoreError) and not isinstance(error.__cause__, OSError)


def _storage_trouble(task, task_run, state) -> bool:
    """Retry a task only when waiting may heal what failed it (:func:`_heals`)."""
    try:
        state.result()
    except Exception as e:
        return _heals(e)
    return False


STORAGE_RETRIES = dict(
    retries=4,
    retry_delay_seconds=exponential_backoff(backoff_factor=2),
    retry_jitter_factor=0.3,
    retry_condition_fn=_storage_trouble,
)

# Tunings a process keeps, least recently used out, by bytes (an SD 1.5 tuning is ~1 GB): a worker fetches each
# once. Two tasks asking for the same tuning at once share one fetch.
TUNING_CACHE_ENV = "FASTIMAGIC_TUNING_CACHE_BYTES"
_TUNINGS: LruCache[Tuning] = LruCache(
    int(os.environ.get(TUNING_CACHE_ENV) or 4 * 2**30),
    size=lambda t: t.source_embedding.nbytes + sum(d.nbytes for d in t.deltas.values()),
)
_log = logging.getLogger("fastimagic.worker")


def _model(board: Storyboard):
    config = board.model_config_source.resolved if board.model_config_source else None
    vae = board.vae.resolved if board.vae else None
    return cached_base_model(
        board.model.resolved, config=config, precision=board.precision, allow_pickle=board.allow_pickle, vae=vae
    )


def preload_model(board: Storyboard) -> None:
    """Load the storyboard's base model into this process's cache ahead of the fine-tune, on a GPU :func:`prime` it
    for this storyboard, then load its scorer ahead (:func:`fastimagic.scoring.prefetch_scorer`; on a GPU into host
    memory). `fastimagic run` does this while Prefect's server starts, the flow while the reference is fetched and
    captioned: the fine-tune finds the model loaded and its kernels ready, and the first render unit, which holds
    the device, does not load the scorer."""
    model = _model(board)
    if _cold_start(model):  # else nothing to prime: no reference to read for its size
        size = expected_size(board, model.family)
        prime(model, size, render_batches(board, model, size), _finetune_config(board))
    if board.scorer_name:
        prefetch_scorer(board.scorer_name, device=model.device, allow_pickle=board.allow_pickle)


def _cold_start(model: Components) -> bool:
    """Whether a first fine-tune on ``model``'s device pays a start worth paying ahead: on a GPU."""
    return model.device.type == "cuda"


def prime(
    model: Components,
    size: tuple[int, int],
    batches: tuple[int, ...] | list[int] = (1,),
    config: FinetuneConfig | None = None,
) -> None:
    """On a GPU, one fine-tune step at ``size`` (width, height) with ``config``'s batch and trained blocks, and one
    sampling step for each of ``batches`` (images per sampling call), thrown away, on the device's thread
    (:mod:`fastimagic.devices`), where the work that follows runs: the device context, library handles and kernels
    a first fine-tune otherwise loads on the critical path (16.6 s on SD 1.5, measured), and the plans cuDNN builds
    per shape and thread. What is primed is not primed again (``model.primed``). Nothing on CPU, where there is no
    such start to pay, nor once the model is at work (that work pays it)."""
    if _cold_start(model):
        devices.run(model.device, _prime, model, tuple(size), tuple(batches), config or FinetuneConfig())


def _tune_shape(config: FinetuneConfig, model: Components, width: int, height: int) -> tuple:
    """What a fine-tune's plans depend on: its size, batch, trained blocks and checkpointing (``model.primed``)."""
    return ("finetune", width, height, config.batch_size, config.blocks(model.family), config.gradient_checkpointing)


def _prime(model: Components, size: tuple[int, int], batches: tuple[int, ...], config: FinetuneConfig) -> None:
    width, height = size
    config = replace(config, steps=1, min_steps=1)
    wanted = [_tune_shape(config, model, width, height)] + [("sample", width, height, n) for n in batches]
    todo = [w for w in wanted if w not in model.primed]
    if not todo or model.applied is not None or not model.lock.acquire(blocking=False):
        return  # primed, or renders have started (they paid), or the model is at work
    try:
        started = time.perf_counter()
        if todo[0][0] == "finetune":
            image = Image.new("RGB", (width, height), (127, 127, 127))
            finetune(model, image, "a photo", config, width=width, height=height)
        prompt = model.encode_prompts(["a photo"])
        for n in [w[3] for w in todo if w[0] == "sample"]:
            sample(model, prompt.expand(n, -1, -1), [0] * n, width=width, height=height, steps=1)
        model.primed.update(todo)
        _log.info(
            "primed %s on %s at %dx%d (sampling %s at a time) in %.1f s",
            model.identity, model.device, width, height, ", ".join(str(n) for n in batches),
            time.perf_counter() - started,
        )
    finally:
        model.lock.release()


def expected_size(board: Storyboard, family: Family) -> tuple[int, int]:
    """The run's (width, height) as far as it is known before the reference is fetched: from a local reference
    (read under the policy, as the fetch reads it), else the model's own side, square. What a warm-up primes."""
    if not board.reference.resolved.startswith("s3://"):
        with contextlib.suppress(Exception):  # the fetch reports what is wrong with it
            data = read(board.reference.resolved, max_bytes=board.max_reference_bytes, within=board.reference_roots)
            return run_size(board, load_reference(data, board.reference.resolved).size)
    side = own_side(board, family)
    return run_size(board, (side, side))  # the reference's aspect not known yet: a square one's size


def render_batches(board: Storyboard, model: Components, size: tuple[int, int], most: int = 3) -> list[int]:
    """The images per sampling call this storyboard's renders start with (first used first, at most ``most``):
    each scene's seeds x edits, cut as :func:`fastimagic.sampler.sample` cuts them on ``model``."""
    batch = auto_batch_size(model, *size)
    out: list[int] = []
    for scene in board.scenes:
        for _, _, padded in chunks(len(scene.seeds) * scene.edit.count(), batch, model.compiled != "off"):
            if padded not in out:
                out.append(padded)
    return out[:most]


def warm_up(board: Storyboard) -> None:
    """Start :func:`preload_model` in the background: loading (and on a GPU priming) the storyboard's base model,
    once per process (:func:`fastimagic.models.cached_base_model`), and its scorer, so that the cold start overlaps
    fetching and captioning the reference. A load that fails here fails again, and is reported, when the fine-tune
    or a render needs it."""

    def load() -> None:
        try:
            preload_model(board)
        except Exception as e:  # reported by the task that needs the model
            _log.debug("warm-up failed: %s", e)

    threading.Thread(target=load, name="fastimagic-warm-up", daemon=True).start()


WORKER_MODEL_SETTING = "FASTIMAGIC_WORKER_MODEL"


def warm_worker(spec: str | None) -> None:
    """A worker's cold start, paid before it takes any work: the model libraries' imports and the model's load, and
    on a GPU :func:`prime`. ``spec``: the model to keep warm (``$FASTIMAGIC_WORKER_MODEL``, loaded with a
    storyboard's default options, so that its first fine-tune or render finds it loaded); without one, the tiny
    model, thrown away afterwards."""
    model = cached_base_model(spec) if spec else load_base_model("tiny")  # a model that does not load: refused
    try:
        side = TINY_RESOLUTION if (spec or "tiny") in TINY_FAMILIES else model.family.resolution
        prime(model, (side, side), (auto_batch_size(model, side, side),))  # a scene's full sampling calls
    except Exception as e:  # the first task pays the start instead: no reason to refuse work
        _log.warning("warm-up on %s failed (%s: %s); serving all the same", model.identity, type(e).__name__, e)


def identity(board: Storyboard) -> str:
    """The identity of the storyboard's weights (model and VAE override), as content keys and manifests name it."""
    vae = board.vae.resolved if board.vae else None
    return model_identity(board.model.resolved, allow_pickle=board.allow_pickle, vae=vae)


def _family(board: Storyboard):
    return model_family(board.model.resolved, allow_pickle=board.allow_pickle)


def own_side(board: Storyboard, family: Family) -> int:
    """The side the storyboard's model of ``family`` was trained at (the tiny models': 64): the shorter side of a
    run that gives no ``resolution``, and the side a warm-up primes at."""
    return TINY_RESOLUTION if board.model.kind == "tiny" else family.resolution


def run_size(board: Storyboard, reference_size: tuple[int, int]) -> tuple[int, int]:
    """(width, height) of this storyboard's fine-tune and keyframes for a reference of ``reference_size``; with no
    ``resolution``, the shorter side is the model's own (:func:`own_side`)."""
    return board.size_for(reference_size, own_side(board, _family(board)))


def _finetune_config(board: Storyboard, **changes) -> FinetuneConfig:
    settings = board.finetune.model_dump() | {"precision": board.precision, "fit": board.fit}
    return FinetuneConfig(**(settings | changes))


@task(name="fetch reference", cache_policy=NO_CACHE, **STORAGE_RETRIES)
def fetch_reference(board: Storyboard) -> Reference:
    """The reference image's bytes, checked to decode."""
    uri = board.reference.resolved
    data = read(uri, max_bytes=board.max_reference_bytes, within=board.reference_roots)  # as opened: the policy's
    image = load_reference(data, uri)  # refuse a broken image before any model is loaded
    return Reference.of(data, uri, image.size)


@task(name="caption", cache_policy=NO_CACHE, tags=[GPU])
def caption_reference(board: Storyboard, reference: Reference) -> SourcePrompt:
    """The storyboard's source prompt, or a BLIP caption of the reference (BLIP is loaded only then)."""
    board, reference = caption_args(board, reference)  # plain data from a submitter: validated, the policy kept
    if board.source_prompt:
        return SourcePrompt(board.source_prompt)
    captioner = load_captioner(
        "tiny" if board.model.kind == "tiny" else "Salesforce/blip-image-captioning-base",
        num_beams=board.caption.num_beams,
        max_new_tokens=board.caption.max_new_tokens,
        allow_pickle=board.allow_pickle,
    )
    caption = captioner(load_reference(reference.data, reference.uri))
    prompt = source_prompt_from_caption(caption, [s.prompt for s in board.scenes])
    get_run_logger().info("BLIP caption: %r -> source prompt %r", caption, prompt)
    return SourcePrompt(prompt, caption, captioner.settings())


def tuning_key(board: Storyboard, reference: Reference, source_prompt: str, **changes) -> str:
    """The content key of this storyboard's fine-tune, computed without loading the model. ``changes``: fine-tune
    settings to replace (e.g. another ``precision``), to find a sibling tuning."""
    width, height = run_size(board, reference.size)
    return content_key(
        image_sha256=reference.sha256,
        model_identity=identity(board),
        source_prompt=source_prompt,
        finetune=_finetune_config(board, **changes).as_dict(family=_family(board)),
        width=width,
        height=height,
    )


def _other_precision_note(board: Storyboard, reference: Reference, source_prompt: str, output: str) -> str | None:
    """When no tuning is stored for this key but one made at another precision is: a line saying why it is not
    reused (precision is part of the content key)."""
    store = output_store(output)
    for other in PRECISIONS[1:]:
        if other == board.precision:
            continue
        try:
            key = tuning_key(board, reference, source_prompt, precision=other)
        except InputError:  # a precision this device cannot run: no key to look for
            continue
        if store.child(f"tunings/{key}").exists(META_FILE):
            return (
                f"a tuning of this reference made at precision {other} is stored ({key}); precision"
                f" {board.precision} is a different content key, so this fine-tunes afresh"
            )
    return None


def _finetune_progress():
    """A fine-tune callback: a Prefect progress artifact, a log line every 10 steps, and the process's progress
    listeners (the CLI's display, see :mod:`fastimagic.progress`)."""
    from prefect.artifacts import create_progress_artifact, update_progress_artifact

    logger = get_run_logger()
    artifact = create_progress_artifact(0.0, description="fine-tune progress (steps)")

    def callback(step: int, steps: int, loss: float) -> None:
        progress.finetune_step(step, steps, loss)
        update_progress_artifact(artifact, 100.0 * step / steps)
        if step == 1 or step % 10 == 0:
            logger.info("fine-tune step %d/%d loss %.4f", step, steps, loss)

    return callback


@task(name="fine-tune once", cache_policy=NO_CACHE, tags=[GPU], **STORAGE_RETRIES)
def finetune_once(board: Storyboard, reference: Reference, prompts: SourcePrompt, output: str) -> TuningRef:
    """Reuse the stored tuning for this content key, or fine-tune and store it under ``tunings/<key>/``.

    A stored tuning that fails its checksum is reported and replaced. In a run that renders in this process
    (:data:`tuning_written_behind`) the fresh tuning is written while the scenes render.
    """
    board, reference, prompts, output = finetune_args(board, reference, prompts, output)  # see tasks.params
    logger = get_run_logger()
    key = tuning_key(board, reference, prompts.source_prompt)
    store = output_store(output).child(f"tunings/{key}")
    replaced = None
    if store.exists(META_FILE):
        try:
            tuning = Tuning.read(store.get_bytes, where=store.uri)  # verified on every reuse: it may have rotted
            _log.info("fetched tuning %s (stored: reused)", key)
            _TUNINGS.put(key, tuning)
            logger.info("reusing stored tuning %s (no fine-tune)", key)
            return _tuning_ref(tuning, store.uri, reused=True)
        except (CorruptTuning, NotFound) as e:
            replaced = str(e)
            logger.warning("stored tuning is unusable, fine-tuning again: %s", e)
    note = _other_precision_note(board, reference, prompts.source_prompt, output)
    if note:
        logger.info(note)
    model = _model(board)
    config = _finetune_config(board)
    width, height = run_size(board, reference.size)
    callback = _finetune_progress()
    image = load_reference(reference.data, reference.uri)

    def tune() -> Tuning:  # on the device's thread, where the warm-up built its plans (fastimagic.devices)
        with model.lock:
            release(model)  # a tuning kept applied from earlier renders: the fine-tune starts from the base weights
            tuning = finetune(
                model,
                image,
                prompts.source_prompt,
                config,
                width=width,
                height=height,
                image_sha256=reference.sha256,
                callback=callback,
            )
            model.primed.add(_tune_shape(config, model, width, height))  # a later warm-up: nothing left to pay
            return tuning

    tuning = devices.run(model.device, tune)
    tuning.caption = prompts.caption
    assert tuning.key == key, "content key computed before and after fine-tuning must agree"
    if tuning_written_behind.get():
        _TUNINGS.put(key, tuning)  # the renders of this process take it from here while it is written
        _write_behind(store, tuning)
    else:
        put_tuning(store, tuning)
        _TUNINGS.put(key, tuning)
    logger.info(
        "fine-tuned %s in %.1f s (%d steps, final loss %.4f)",
        key,
        tuning.seconds,
        len(tuning.losses),
        tuning.losses[-1],
    )
    return _tuning_ref(tuning, store.uri, reused=False, replaced_corrupt=replaced)


# Set by a run that renders in this process (flows.storyboard.InProcess): its fresh tuning is written while its
# scenes render, not before (SD 1.5 `reference`: 1.2 GB to serialise, hash and write, 3-8 s measured on a 2-core
# machine), and the run waits for the write before its manifest (:func:`tuning_stored`). Warm workers never set
# it: the other workers fetch the tuning from the store as soon as the fine-tune task ends.
tuning_written_behind: ContextVar[bool] = ContextVar("fastimagic_tuning_written_behind", default=False)
_WRITING: dict[str, Future] = {}  # tuning key -> its write behind, until the run has waited for it
_WRITING_LOCK = threading.Lock()


def _on_a_thread(name: str, fn: Callable[[], object]) -> Future:
    """Call ``fn()`` on a daemon thread of its own (a pool's non-daemon threads would keep a stopped run's process
    alive) and return a future of its result, or of what it raised."""
    done: Future = Future()

    def call() -> None:
        try:
            result = fn()
        except BaseException as e:  # noqa: BLE001 - whoever waits for the future raises it
            done.set_exception(e)
        else:
            done.set_result(result)

    threading.Thread(target=call, name=name, daemon=True).start()
    return done


def put_tuning(store, tuning: Tuning) -> None:
    """Store ``tuning``'s files (:meth:`~fastimagic.tuning.Tuning.to_files`) in ``store`` (its ``tunings/<key>/``)."""
    for name, data in tuning.to_files().items():  # metadata last: its presence means the tuning is complete
        store.put_bytes(name, data)


def _write_behind(store, tuning: Tuning) -> None:
    """Write ``tuning`` to ``store`` in a thread of its own; an object store's trouble is retried as the tasks
    retry it (:data:`STORAGE_RETRIES`: the write again, not the fine-tune). :func:`tuning_stored` waits for it."""
    delays = STORAGE_RETRIES["retry_delay_seconds"](STORAGE_RETRIES["retries"])

    def write() -> None:
        for delay in (*delays, None):
            try:
                put_tuning(store, tuning)
                return
            except StoreError as e:
                if delay is None or not _heals(e):
                    raise
                _log.warning("writing tuning %s failed (%s); again in %.0f s", tuning.key, e, delay)
                time.sleep(delay)

    with _WRITING_LOCK:  # the run waits for it (tuning_stored), and raises what it raised
        _WRITING[tuning.key] = _on_a_thread("fastimagic-tuning-write", write)


def tuning_stored(key: str) -> None:
    """Wait for this process's write behind of tuning ``key`` (:data:`tuning_written_behind`), if one was started;
    raise what failed it (a :class:`~fastimagic.store.StoreError`: the run fails, and ``--resume`` fine-tunes
    again). A run calls it before its manifest, which names the stored tuning."""
    with _WRITING_LOCK:
        done = _WRITING.pop(key, None)
    if done is not None:
        done.result()


def _tuning_ref(tuning: Tuning, uri: str, *, reused: bool, replaced_corrupt: str | None = None) -> TuningRef:
    return TuningRef(
        key=tuning.key,
        reused=reused,
        uri=uri,
        precision=tuning.finetune.get("precision"),
        losses=tuple(tuning.losses),
        seconds=round(tuning.seconds, 3),
        steps_run=len(tuning.losses),
        trained_parameters=tuning.trained_parameters,
        replaced_corrupt=replaced_corrupt,
    )


def load_tuning(output: str, key: str) -> Tuning:
    """The tuning ``key`` from the output store, fetched once per process while it stays in the bounded cache (two
    tasks asking at once share one fetch)."""

    def fetch() -> Tuning:
        with _WRITING_LOCK:
            writing = _WRITING.get(key)
        if writing is not None:  # this process made it and it left the cache: read it once it is written
            writing.result()
        store = output_store(output).child(f"tunings/{key}")
        tuning = Tuning.read(store.get_bytes, where=store.uri)
        _log.info("fetched tuning %s", key)
        return tuning

    return _TUNINGS.get(key, fetch)


def expected_names(scene: Scene, seed: int, strategies: tuple[str, ...]) -> list[str]:
    """The keyframe file names one (scene, seed) produces under ``strategies``, in render order."""
    return [
        kf.keyframe_name(seed, edit, strategy, scene.sigma) for strategy in strategies for edit in scene.edit.combos()
    ]


def _progress_key(scene_id: str, seed: int, strategies: tuple[str, ...]) -> str:
    # Written after a (scene, seed, strategies) unit's keyframes: what a resumed run verifies instead of rendering.
    return f"{kf.PROGRESS}/{scene_id}/{seed}-{'-'.join(strategies).replace('+', '_')}.json"


def render_settings(board: Storyboard, scene: Scene, tuning_key: str) -> dict:
    """What a scene's keyframes depend on besides the seed: the tuning (reference, model, source prompt, fine-tune
    settings, size: its content key) and the scene's render settings. Recorded beside each progress record, so that
    a resume keeps only keyframes made with the settings it is asked to finish with."""
    rendering = scene.model_dump(mode="json", exclude={"id", "select", "motion", "auto"})
    return {"tuning": tuning_key, "scene": rendering}


SETTINGS = ".settings"  # <run>/.settings/<scene>/<seed>-<forget>.json: how that unit's keyframes were made


def _settings_key(scene_id: str, seed: int, strategies: tuple[str, ...]) -> str:
    return SETTINGS + _progress_key(scene_id, seed, strategies).removeprefix(kf.PROGRESS)


def kept_settings_match(
    scene: Scene, seed: int, output: str, run_prefix: str, strategies: tuple[str, ...], settings: dict
) -> bool:
    """For a resumed run: True when (scene, seed)'s keyframes were rendered with ``settings``; False when nothing
    records how they were made (they are rendered again). Raises :class:`InputError` saying what changed when the
    recorded settings differ: a resume finishes the run it was, it does not mix two storyboards in one manifest."""
    store = output_store(output).child(run_prefix)
    try:
        recorded = json.loads(store.get_bytes(_settings_key(scene.id, seed, tuple(strategies))))
    except (NotFound, ValueError, RecursionError):
        return False
    if not isinstance(recorded, dict) or not isinstance(recorded.get("scene"), dict):
        return False  # damaged: rendered again
    if recorded == settings:
        return True
    changed = []
    if recorded.get("tuning") != settings["tuning"]:
        changed.append("the fine-tune (reference, model, source prompt, resolution or finetune settings)")
    old_scene, new_scene = recorded.get("scene") or {}, settings["scene"]
    changed += [k for k in new_scene if old_scene.get(k) != new_scene[k]]
    raise InputError(
        f"{run_prefix}: scene {scene.id} seed {seed} was rendered with other settings (changed: {', '.join(changed)});"
        " --resume only finishes an interrupted run of the same storyboard: run it without --resume for a new run"
    )


def _reference_image(board: Storyboard, width: int, height: int):
    """The reference image fitted as the fine-tune saw it, read once per process (fidelity scores need it)."""
    key = (board.reference.resolved, width, height, board.fit)
    if key not in _REFERENCES:
        image = load_reference(read(key[0], board.max_reference_bytes, board.reference_roots), key[0])
        _REFERENCES[key] = fit(image, width, height, board.fit)
    return _REFERENCES[key]


_REFERENCES: dict = {}


class _WritingBehind:
    """How many render units of this process are past their device work and still writing their keyframes."""

    def __init__(self):
        self._count = 0
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def unit(self):
        with self._lock:
            self._count += 1
        try:
            yield
        finally:
            with self._lock:
                self._count -= 1

    def __call__(self) -> int:
        with self._lock:
            return self._count


# A warm worker takes its next unit while these write (flows.workers.may_take_next): the device is free.
units_writing = _WritingBehind()


def _render_run_name() -> str:
    # the scene is an object in this process and its id in a warm worker's plain parameters
    from prefect.runtime import task_run

    scene, seeds = task_run.parameters.get("scene"), task_run.parameters.get("seeds")
    seeds = list(seeds) if isinstance(seeds, (list, tuple)) else [seeds]
    named = f"seed{'s' if len(seeds) != 1 else ''} {', '.join(str(s) for s in seeds)}"
    return f"render {printable(str(getattr(scene, 'id', scene)))[:100]} {printable(named)[:100]}"


def _load_scorer_meanwhile(board: Storyboard, model: Components) -> Future:
    """Read and build the storyboard's scorer (:func:`fastimagic.scoring.prefetch_scorer`) on a thread of its own
    while the unit fetches its tuning and samples (a thread that finds it loaded, by the warm-up or an earlier unit,
    ends at once). The unit's scoring waits for the returned future, so it never loads the scorer on the device's
    thread, holding the model (a warm worker's first scored unit, say; CLIP ViT-L/14: 2.5-4.2 s measured on a CPU
    host). The future raises what the load raised."""
    return _on_a_thread(
        "fastimagic-scorer",
        lambda: prefetch_scorer(board.scorer_name, device=model.device, allow_pickle=board.allow_pickle),
    )


@task(name="render", cache_policy=NO_CACHE, tags=[GPU], task_run_name=_render_run_name, **STORAGE_RETRIES)
def render_keyframes(
    board: Storyboard,
    scene: Scene,
    seeds: list[int],
    key: str,
    output: str,
    run_prefix: str,
    strategies: tuple[str, ...] | None = None,
) -> list[KeyframeRecord]:
    """Render a scene's ``seeds`` (one unit of GPU work): every edit setting under each forgetting strategy, score
    them, write them.

    One sampling call per strategy covers every seed and edit (the sampler chunks it at its batch size), on the
    tuning this process keeps applied (:func:`fastimagic.editor.applied`: applied once per process and tuning).
    ``strategies`` defaults to the scene's. The model is held only for the GPU work: the writes that follow overlap
    the next unit's sampling (in-process, scenes run side by side; a warm worker takes its next unit while this one
    writes, :data:`units_writing`). Each PNG is written atomically (a failed write retries the task); after each seed's
    PNGs, a progress record of that (scene, seed) lists them with their SHA-256 (what ``--resume`` verifies), so a
    unit that fails part way keeps the seeds it finished. With a scorer, each record carries ``scores`` (CLIP text
    alignment and fidelity to the reference), computed in one batch with the scorer loaded once per process.
    Returns the manifest records (keys relative to the run folder), seed by seed, each seed's in render order
    (:func:`expected_names`).
    """
    board, scene, seeds, key, output, run_prefix, strategies = render_args(  # see tasks.params
        board, scene, seeds, key, output, run_prefix, strategies
    )
    strategies = tuple(strategies or scene.forget)
    seeds = [int(s) for s in seeds]
    model = _model(board)
    scorer_loaded = _load_scorer_meanwhile(board, model) if board.scorer_name else None
    tuning = load_tuning(output, key)

    def device_work() -> tuple[list, list | None, float]:  # on the device's thread (fastimagic.devices)
        per_strategy = []
        with model.lock:
            started = time.perf_counter()
            editor = applied(model, tuning)
            for strategy in strategies:
                per_strategy.append(editor.render(
                    scene.prompt,
                    seeds=seeds,
                    edits=scene.edit.combos(),
                    forget=strategy,
                    sigma=scene.sigma,
                    guidance=scene.guidance,
                    steps=scene.steps,
                    negative_prompt=scene.negative_prompt,
                ))  # at the tuning's size; seed-major
            edits = len(scene.edit.combos())
            frames = [f for i in range(len(seeds)) for made in per_strategy for f in made[i * edits : (i + 1) * edits]]
            scores = None
            if scorer_loaded is not None:
                scorer_loaded.result()  # read and built on its own thread; on a GPU, copied to it here
                scorer = load_scorer(board.scorer_name, device=model.device, allow_pickle=board.allow_pickle)
                reference = _reference_image(board, tuning.width, tuning.height)
                scores = scorer.score([f.image for f in frames], scene.prompt, reference)
            return frames, scores, time.perf_counter() - started  # the images are on the CPU: the device is done

    frames, scores, device_seconds = devices.run(model.device, device_work)
    written_at = time.perf_counter()
    rendered = Rendered(board, scene, seeds, key, output, run_prefix, strategies, frames, scores, model.precision.name)
    with units_writing.unit():  # the device is free for the next unit meanwhile (a warm worker takes it)
        records = _write_unit(rendered)
    _log.info(
        "rendered %s seeds %s: %d keyframes, %.2f s on the device, %.2f s writing",
        scene.id, seeds, len(records), device_seconds, time.perf_counter() - written_at,
    )
    return records


@dataclass(frozen=True)
class Rendered:
    """A render unit whose device work is done: :func:`render_keyframes`' arguments and its keyframes on the host,
    what :func:`_write_unit` writes. ``frames``: seed-major, each seed's in render order; ``scores``: one per frame
    (with a scorer); ``precision``: the name of the precision they were sampled in."""

    board: Storyboard
    scene: Scene
    seeds: list[int]
    key: str
    output: str
    run_prefix: str
    strategies: tuple[str, ...]
    frames: list
    scores: list | None
    precision: str


def _write_unit(unit: Rendered) -> list[KeyframeRecord]:
    """:func:`render_keyframes`'s writes, seed by seed: each PNG, then that seed's settings and progress records."""
    scene, frames, scores = unit.scene, unit.frames, unit.scores
    store = output_store(unit.output).child(unit.run_prefix)
    settings_record = kf.dumps(render_settings(unit.board, scene, unit.key))
    records = []
    per_seed = len(frames) // len(unit.seeds)
    for start, seed in zip(range(0, len(frames), per_seed), unit.seeds):
        written = []
        for i in range(start, start + per_seed):
            f = frames[i]
            data = kf.png_bytes(f.image)
            rel = f"{kf.scene_prefix(scene.id)}/{kf.keyframe_name(f.seed, f.edit, f.forget, f.sigma)}"
            store.put_bytes(rel, data, "image/png")
            settings = f.settings() | {"precision": unit.precision}
            written.append(keyframe_record(rel, scene.id, settings, kf.sha256(data), scores[i] if scores else None))
        store.put_bytes(_settings_key(scene.id, seed, unit.strategies), settings_record)
        store.put_bytes(_progress_key(scene.id, seed, unit.strategies), kf.dumps(written), "application/json")
        progress.keyframes_written(len(written))
        records += written
    return records


@task(name="verify written keyframes", cache_policy=NO_CACHE, **STORAGE_RETRIES)
def verify_written(
    scene: Scene, seed: int, output: str, run_prefix: str, strategies: tuple[str, ...] | None = None
) -> list[KeyframeRecord] | None:
    """For a resumed run: the records of (scene, seed) if all its keyframes are stored intact, else None.

    Intact means: the progress record exists, names exactly the keyframes this scene asks for, and every PNG's
    SHA-256 matches it.
    """
    records = stored_intact(scene, seed, output, run_prefix, strategies)
    if records is not None:
        progress.keyframes_written(len(records))
    return records


def stored_intact(
    scene: Scene, seed: int, output: str, run_prefix: str, strategies: tuple[str, ...] | None = None
) -> list[KeyframeRecord] | None:
    """:func:`verify_written`'s check, outside a task and reporting no progress."""
    strategies = tuple(strategies or scene.forget)
    store = output_store(output).child(run_prefix)
    try:
        records = json.loads(store.get_bytes(_progress_key(scene.id, seed, strategies)))
    except (NotFound, ValueError, RecursionError):
        return None
    if not records_are_data(records, scene.id, (seed,), strategies):  # a record edited by anyone: damaged
        return None
    wanted = [f"{kf.scene_prefix(scene.id)}/{n}" for n in expected_names(scene, seed, strategies)]
    if [r.get("key") for r in records] != wanted:
        return None
    for r in records:
        try:
            if kf.sha256(store.get_bytes(r["key"])) != r["sha256"]:
                return None
        except NotFound:
            return None
    return records


@task(name="scene outputs", cache_policy=NO_CACHE, **STORAGE_RETRIES)
def write_scene_outputs(
    scene: Scene, records: list[KeyframeRecord], output: str, run_prefix: str, auto: dict | None = None
) -> SceneSummary:
    """After a scene's keyframes: pick the best (``select``, from the strategy ``forget: auto`` chose), copy picks to
    ``picks/<scene>/``, write the labelled contact sheet and the scene manifest. ``auto``: the decision as made."""
    store = output_store(output).child(run_prefix)
    prefix = kf.scene_prefix(scene.id)
    picks = scene_picks(records, scene.select, auto["chosen"] if auto else None)
    ranks = {p["key"]: p["rank"] for p in picks}
    if scene.select is not None and all("scores" in r for r in records):
        for r in records:
            r["pick"] = ranks.get(r["key"])
    for p in picks:
        dest = f"{kf.PICKS}/{scene.id}/{p['rank']:02d}-{p['key'].rsplit('/', 1)[-1]}"
        store.put_bytes(dest, store.get_bytes(p["key"]), "image/png")
        p["copy"] = dest
    tiles = [
        (Image.open(io.BytesIO(store.get_bytes(r["key"]))), kf.tile_label(r), r.get("pick") is not None)
        for r in records
    ]
    store.put_bytes(f"{prefix}/{kf.CONTACT_SHEET}", kf.contact_sheet(tiles), "image/jpeg")
    manifest = scene_manifest(scene.id, scene.prompt, picks, auto, records, scene.motion)
    store.put_bytes(f"{prefix}/{kf.MANIFEST}", kf.dumps(manifest), "application/json")
    return SceneSummary.of(manifest, f"{prefix}/{kf.MANIFEST}", f"{prefix}/{kf.CONTACT_SHEET}")


@task(name="run plan", cache_policy=NO_CACHE, **STORAGE_RETRIES)
def write_plan(board: Storyboard, run_id: str, output: str, run_prefix: str) -> None:
    """``run.json``: what the run sets out to render, so ``fastimagic runs`` can say how far an interrupted run got.
    A resumed run keeps the plan it started with."""
    store = output_store(output).child(run_prefix)
    if not store.exists(PLAN):
        store.put_bytes(PLAN, kf.dumps(plan_record(board, run_id)), "application/json")


@task(name="run outputs", cache_policy=NO_CACHE, **STORAGE_RETRIES)
def write_run_outputs(run: dict, reference: Reference, output: str, run_prefix: str) -> str:
    """The reference copy, the sequence (``sequence/`` and ``sequence.json``, see :mod:`fastimagic.sequence`),
    ``index.html``, then the run ``manifest.json`` last. Returns the manifest's URI."""
    store = output_store(output).child(run_prefix)
    ext = _image_ext(reference.data)
    run["reference_key"] = f"reference{ext}"
    store.put_bytes(run["reference_key"], reference.data)
    write_sequence(store, run)
    run["sequence"] = SEQUENCE
    store.put_bytes(kf.INDEX, index_page(run), "text/html; charset=utf-8")
    store.put_bytes(kf.MANIFEST, kf.dumps(run), "application/json")
    return f"{store.uri.rstrip('/')}/{kf.MANIFEST}"


def _image_ext(data: bytes) -> str:
    fmt = (Image.open(io.BytesIO(data)).format or "png").lower()
    return {"jpeg": ".jpg", "png": ".png", "webp": ".webp"}.get(fmt, f".{fmt}")


@task(name="summary artifact", cache_policy=NO_CACHE)
def publish_summary(run: dict, output: str, run_prefix: str, expires: int) -> None:
    """A markdown artifact on the flow run: each scene, its picks and contact sheet, as links that expire."""
    from prefect.artifacts import create_markdown_artifact

    store = output_store(output).child(run_prefix)

    def link(label: str, key: str) -> str:
        return f"[{label}]({store.url(key, expires=expires)})"

    lines = [
        f"# {run['storyboard']['name']} · run {run['run_id']}",
        "",
        f"{len(run['keyframes'])} keyframes · {link('index.html', kf.INDEX)} · {link('manifest.json', kf.MANIFEST)}"
        f" · links expire after {expires // 3600} h",
        "",
        "| scene | prompt | keyframes | picks | contact sheet |",
        "| --- | --- | --- | --- | --- |",
    ]
    for sc in run["scenes"]:
        picks = " ".join(link(f"#{p['rank']}", p["key"]) for p in sc["picks"]) or "–"
        prompt = sc["prompt"].replace("|", "\\|").replace("\n", " ")
        lines.append(f"| {sc['id']} | {prompt} | {sc['keyframes']} | {picks} | {link('sheet', sc['contact_sheet'])} |")
    # artifact keys allow lowercase letters, digits and dashes only
    key = "keyframes-" + slugify(run["storyboard"]["name"], max_length=40).replace("_", "-")
    create_markdown_artifact("\n".join(lines), key=key, description="keyframes of this run")
