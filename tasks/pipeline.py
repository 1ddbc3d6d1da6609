"""Prefect tasks of the storyboard pipeline: each reads its inputs, calls fastimagic once, writes its outputs.

Policy lives in the decorators:

* every task here has side effects or is cheap, so none uses Prefect 3's default input-based caching
  (``cache_policy=NO_CACHE``): a rerun always does the work it names. Fine-tunes are reused by *content key*
  through the object store instead, which also works across machines and flow runs;
* tasks that hold the GPU carry the ``gpu`` tag, so ``prefect concurrency-limit create gpu N`` caps them;
* tasks that write to storage retry with exponential backoff (S3 clients retry each request too).
"""

from __future__ import annotations

import hashlib
import io
import json
import time

from PIL import Image
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.tasks import exponential_backoff

from fastimagic import keyframes as kf
from fastimagic.caption import load_captioner, source_prompt_from_caption
from fastimagic.editor import Editor
from fastimagic.finetune import FinetuneConfig, finetune
from fastimagic.images import load_reference
from fastimagic.models import cached_base_model, model_identity
from fastimagic.store import LocalStore, NotFound, StoreError, read_uri
from fastimagic.storyboard import Scene, Storyboard
from fastimagic.tuning import META_FILE, CorruptTuning, Tuning, content_key
from tasks.storage import output_store

GPU = "gpu"
STORAGE_RETRIES = dict(retries=4, retry_delay_seconds=exponential_backoff(backoff_factor=2), retry_jitter_factor=0.3)

_TUNINGS: dict[str, Tuning] = {}  # process cache: a render worker fetches each tuning once


def _model(board: Storyboard):
    config = board.model_config_source.resolved if board.model_config_source else None
    return cached_base_model(board.model.resolved, config=config, allow_pickle=board.allow_pickle)


def _finetune_config(board: Storyboard) -> FinetuneConfig:
    return FinetuneConfig(**board.finetune.model_dump())


@task(name="fetch reference", cache_policy=NO_CACHE, **STORAGE_RETRIES)
def fetch_reference(board: Storyboard) -> dict:
    """The reference image's bytes, checked to decode; ``{"bytes", "sha256", "uri"}``."""
    uri = board.reference.resolved
    data = read_uri(uri)
    load_reference(data, uri)  # refuse a broken image before any model is loaded
    return {"bytes": data, "sha256": hashlib.sha256(data).hexdigest(), "uri": uri}


@task(name="caption", cache_policy=NO_CACHE, tags=[GPU])
def caption_reference(board: Storyboard, reference: dict) -> dict:
    """``{"source_prompt", "caption"}``: the storyboard's source prompt, or a BLIP caption (BLIP loaded only then)."""
    if board.source_prompt:
        return {"source_prompt": board.source_prompt, "caption": None}
    captioner = load_captioner("tiny" if board.model.kind == "tiny" else "Salesforce/blip-image-captioning-base")
    caption = captioner(load_reference(reference["bytes"], reference["uri"]))
    prompt = source_prompt_from_caption(caption, [s.prompt for s in board.scenes])
    get_run_logger().info("BLIP caption: %r -> source prompt %r", caption, prompt)
    return {"source_prompt": prompt, "caption": caption}


def tuning_key(board: Storyboard, reference: dict, source_prompt: str) -> str:
    """The content key of this storyboard's fine-tune, computed without loading the model."""
    return content_key(
        image_sha256=reference["sha256"],
        model_identity=model_identity(board.model.resolved, allow_pickle=board.allow_pickle),
        source_prompt=source_prompt,
        finetune=_finetune_config(board).as_dict(),
        width=board.width,
        height=board.height,
    )


def _progress(total: int):
    """A callback showing fine-tune progress as a Prefect progress artifact, a terminal bar and log lines."""
    from prefect.artifacts import create_progress_artifact, update_progress_artifact
    from tqdm.auto import tqdm

    logger = get_run_logger()
    artifact = create_progress_artifact(0.0, description="fine-tune progress (steps)")
    bar = tqdm(total=total, desc="fine-tune", unit="step", leave=True, disable=None)

    def callback(step: int, steps: int, loss: float) -> None:
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.4f}")
        update_progress_artifact(artifact, 100.0 * step / steps)
        if step == 1 or step % 10 == 0:
            logger.info("fine-tune step %d/%d loss %.4f", step, steps, loss)

    return callback, bar


@task(name="fine-tune once", cache_policy=NO_CACHE, tags=[GPU])
def finetune_once(board: Storyboard, reference: dict, prompts: dict, output: str) -> dict:
    """Reuse the stored tuning for this content key, or fine-tune and store it under ``tunings/<key>/``.

    A stored tuning that fails its checksum is reported and replaced. Returns ``{"key", "reused", ...}``.
    """
    logger = get_run_logger()
    key = tuning_key(board, reference, prompts["source_prompt"])
    store = output_store(output).child(f"tunings/{key}")
    replaced = None
    if store.exists(META_FILE):
        try:
            tuning = Tuning.read(store.get_bytes, where=store.uri)
            _TUNINGS[key] = tuning
            logger.info("reusing stored tuning %s (no fine-tune)", key)
            return {"key": key, "reused": True, "uri": store.uri, **_summary(tuning)}
        except (CorruptTuning, NotFound) as e:
            replaced = str(e)
            logger.warning("stored tuning is unusable, fine-tuning again: %s", e)
    model = _model(board)
    config = _finetune_config(board)
    callback, bar = _progress(config.steps)
    image = load_reference(reference["bytes"], reference["uri"])
    try:
        with model.lock:
            tuning = finetune(
                model,
                image,
                prompts["source_prompt"],
                config,
                width=board.width,
                height=board.height,
                image_sha256=reference["sha256"],
                callback=callback,
            )
    finally:
        bar.close()
    tuning.caption = prompts.get("caption")
    assert tuning.key == key, "content key computed before and after fine-tuning must agree"
    for name, data in tuning.to_files().items():  # metadata last: its presence means the tuning is complete
        _put(store, name, data)
    _TUNINGS[key] = tuning
    logger.info(
        "fine-tuned %s in %.1f s (%d steps, final loss %.4f)",
        key,
        tuning.seconds,
        len(tuning.losses),
        tuning.losses[-1],
    )
    result = {"key": key, "reused": False, "uri": store.uri, **_summary(tuning)}
    return result | ({"replaced_corrupt": replaced} if replaced else {})


def _summary(tuning: Tuning) -> dict:
    return {
        "losses": tuning.losses,
        "seconds": round(tuning.seconds, 3),
        "steps_run": len(tuning.losses),
        "trained_parameters": tuning.trained_parameters,
    }


def _put(store, key: str, data: bytes, content_type: str | None = None, attempts: int = 5) -> None:
    """One storage write; S3 writes back off and retry (a server restarting), local ones fail at once (a full disk
    does not heal by waiting)."""
    for attempt in range(1, attempts + 1):
        try:
            store.put_bytes(key, data, content_type)
            return
        except StoreError:
            if attempt == attempts or isinstance(store, LocalStore):
                raise
            time.sleep(min(2.0**attempt, 30.0))


def load_tuning(output: str, key: str) -> Tuning:
    """The tuning ``key`` from the output store, fetched once per process."""
    if key not in _TUNINGS:
        store = output_store(output).child(f"tunings/{key}")
        _TUNINGS[key] = Tuning.read(store.get_bytes, where=store.uri)
    return _TUNINGS[key]


def expected_names(scene: Scene, seed: int) -> list[str]:
    """The keyframe file names one (scene, seed) produces, in render order."""
    return [
        kf.keyframe_name(seed, edit, strategy, scene.sigma) for strategy in scene.forget for edit in scene.edit.combos()
    ]


def _progress_key(scene_id: str, seed: int) -> str:
    # Written after a (scene, seed)'s keyframes: the records a resumed run verifies instead of rendering again.
    return f"{kf.PROGRESS}/{scene_id}/{seed}.json"


@task(name="render", cache_policy=NO_CACHE, tags=[GPU], task_run_name="render {scene.id} seed {seed}")
def render_keyframes(board: Storyboard, scene: Scene, seed: int, key: str, output: str, run_prefix: str) -> list[dict]:
    """Render one (scene, seed): every edit setting under each of the scene's forgetting strategies, and write them.

    Each PNG is written atomically (storage writes back off and retry), then a progress record listing them with
    their SHA-256. Returns the manifest records (keys relative to the run folder).
    """
    model = _model(board)
    tuning = load_tuning(output, key)
    frames = []
    with model.lock, Editor(model, tuning) as editor:
        for strategy in scene.forget:
            frames += editor.render(
                scene.prompt,
                seeds=[seed],
                edits=scene.edit.combos(),
                forget=strategy,
                sigma=scene.sigma,
                guidance=scene.guidance,
                steps=scene.steps,
                negative_prompt=scene.negative_prompt,
                width=board.width,
                height=board.height,
            )
    store = output_store(output).child(run_prefix)
    records = []
    for f in frames:
        data = kf.png_bytes(f.image)
        rel = f"{kf.scene_prefix(scene.id)}/{kf.keyframe_name(f.seed, f.edit, f.forget, f.sigma)}"
        _put(store, rel, data, "image/png")
        records.append({"key": rel, "scene": scene.id, **f.settings(), "sha256": kf.sha256(data)})
    _put(store, _progress_key(scene.id, seed), kf.dumps(records), "application/json")
    return records


@task(name="verify written keyframes", cache_policy=NO_CACHE, **STORAGE_RETRIES)
def verify_written(scene: Scene, seed: int, output: str, run_prefix: str) -> list[dict] | None:
    """For a resumed run: the records of (scene, seed) if all its keyframes are stored intact, else None.

    Intact means: the progress record exists, names exactly the keyframes this scene asks for, and every PNG's
    SHA-256 matches it.
    """
    store = output_store(output).child(run_prefix)
    try:
        records = json.loads(store.get_bytes(_progress_key(scene.id, seed)))
    except (NotFound, ValueError):
        return None
    wanted = [f"{kf.scene_prefix(scene.id)}/{n}" for n in expected_names(scene, seed)]
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
def write_scene_outputs(scene: Scene, records: list[dict], output: str, run_prefix: str) -> dict:
    """A scene's contact sheet (from the stored keyframes) and manifest, written after its keyframes."""
    store = output_store(output).child(run_prefix)
    prefix = kf.scene_prefix(scene.id)
    tiles = [(Image.open(io.BytesIO(store.get_bytes(r["key"]))), kf.tile_label(r)) for r in records]
    _put(store, f"{prefix}/{kf.CONTACT_SHEET}", kf.contact_sheet(tiles), "image/jpeg")
    manifest = {"scene": scene.id, "prompt": scene.prompt, "keyframes": records}
    _put(store, f"{prefix}/{kf.MANIFEST}", kf.dumps(manifest), "application/json")
    return {
        "id": scene.id,
        "prompt": scene.prompt,
        "manifest": f"{prefix}/{kf.MANIFEST}",
        "contact_sheet": f"{prefix}/{kf.CONTACT_SHEET}",
        "keyframes": len(records),
    }


@task(name="run outputs", cache_policy=NO_CACHE, **STORAGE_RETRIES)
def write_run_outputs(run: dict, reference: dict, output: str, run_prefix: str) -> str:
    """The reference copy, ``index.html``, then the run ``manifest.json`` last. Returns the manifest's URI."""
    store = output_store(output).child(run_prefix)
    ext = _image_ext(reference["bytes"])
    run["reference_key"] = f"reference{ext}"
    _put(store, run["reference_key"], reference["bytes"])
    _put(store, kf.INDEX, kf.index_html(run), "text/html; charset=utf-8")
    _put(store, kf.MANIFEST, kf.dumps(run), "application/json")
    return f"{store.uri.rstrip('/')}/{kf.MANIFEST}"


def _image_ext(data: bytes) -> str:
    fmt = (Image.open(io.BytesIO(data)).format or "png").lower()
    return {"jpeg": ".jpg", "png": ".png", "webp": ".webp"}.get(fmt, f".{fmt}")
