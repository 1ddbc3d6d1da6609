"""One run of a storyboard, whoever does the GPU work: the wiring both the in-process and the scaled-out flow use.

    read + check -> name the run folder -> fetch the reference -> tune once -> render each scene -> manifests

:func:`run_storyboard` is that sequence. What differs between running in this process and scaling out over GPU
workers is only *who* tunes and renders: a :class:`Backend` (``flows.storyboard.InProcess`` or
``flows.workers.Warm``). :func:`render_scene` renders one scene with the ``forget: auto`` workflow
(:func:`fastimagic.autoforget.render_scene`) and writes its outputs; both backends call it.
"""

from __future__ import annotations

import contextvars
import time
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from datetime import datetime, timezone
from typing import Protocol

from prefect import get_run_logger
from prefect.task_runners import ThreadPoolTaskRunner

from fastimagic import autoforget
from fastimagic import keyframes as kf
from fastimagic.config import DEFAULT_MAX_STORYBOARD_BYTES
from fastimagic.errors import InputError
from fastimagic.finetuning import FinetuneConfig
from fastimagic.images import describe_fit, load_reference
from fastimagic.manifests import KeyframeRecord, Reference, SceneSummary, SourcePrompt, TuningRef, run_manifest
from fastimagic.models import default_device, model_family
from fastimagic.policy import Policy, enforce
from fastimagic.precision import resolve_precision
from fastimagic.scoring import scorer_problem
from fastimagic.store import LocalStore, NotFound, TooLarge
from fastimagic.storyboard import Scene, Storyboard
from fastimagic.storyboard_yaml import decode_storyboard, load_storyboard
from tasks.pipeline import (
    SETTINGS,
    fetch_reference,
    identity,
    kept_settings_match,
    publish_summary,
    render_keyframes,
    render_settings,
    run_size,
    verify_written,
    write_plan,
    write_run_outputs,
    write_scene_outputs,
)
from tasks.storage import output_store, read

# Presigned links handed to people (CLI output, artifacts) expire after this many seconds.
LINK_EXPIRES_SECONDS = 24 * 3600

# Renders in one process take turns on the one warm model (its lock), so two threads (one rendering, one writing)
# lose nothing; Prefect's default pool would start a thread per submitted render, and each thread that has run
# torch keeps ~2-3 MiB of native memory until the flow ends (measured: +128 MiB over 40 scenes, +3 MiB with 2).
RENDER_THREADS = ThreadPoolTaskRunner(max_workers=2)


def read_storyboard(
    storyboard: str, *, output: str | None = None, model: str | None = None, policy: Policy | None = None
) -> Storyboard:
    """Load and validate a storyboard from a local path or ``s3://`` URI, with optional overrides, and check it
    against the operator's ``policy`` when one is given (:func:`fastimagic.policy.enforce`).

    A storyboard fetched from S3 is decoded as strictly as a local file (UTF-8, a BOM allowed).
    """
    text = None
    if storyboard.startswith("s3://"):
        text = decode_storyboard(read(storyboard, max_bytes=DEFAULT_MAX_STORYBOARD_BYTES), storyboard)
    overrides = {k: v for k, v in (("output", output), ("model", model)) if v}
    caps = policy.caps if policy is not None else None  # counted against the policy before anything is expanded
    board = load_storyboard(storyboard, text=text, overrides=overrides or None, caps=caps)
    if policy is not None:
        enforce(board, policy)
    return board


def preflight(board: Storyboard) -> None:
    """Check what can be checked before any model loads or anything is written: the model path, the reference
    image (exists, decodes, sane size) and the output store (reachable, credentials, bucket).

    Raises :class:`InputError` for bad input (CLI exit 2) and :class:`StoreError` for storage trouble (exit 1).
    """
    family = model_family(board.model.resolved, allow_pickle=board.allow_pickle)  # refuses what model_identity does
    identity(board)  # a vae override that is not there
    try:
        FinetuneConfig(trained_blocks=board.finetune.trained_blocks).blocks(family)  # blocks this model has
    except InputError as e:
        raise InputError(f"{board.source} finetune.{e}") from None
    try:
        resolve_precision(board.precision, default_device())
    except InputError as e:
        raise InputError(f"{board.source} {e}") from None
    if board.scorer_name and (why := scorer_problem(board.scorer_name, allow_pickle=board.allow_pickle)):
        raise InputError(f"{board.source} scorer: {why}")
    uri = board.reference.resolved
    try:
        data = read(uri, max_bytes=board.max_reference_bytes, within=board.reference_roots)
    except NotFound as e:
        raise InputError(f"{board.source} reference: {e}") from None
    except TooLarge as e:  # the storyboard's default cap, or the operator's policy (caps.reference_bytes)
        raise InputError(f"{board.where('reference')}: {e}") from None
    run_size(board, load_reference(data, uri).size)
    output_store(board.output.resolved).check()


class Backend(Protocol):
    """Who does the GPU work of a run."""

    def warm_up(self, board: Storyboard) -> None:
        """Start what the GPU work needs (a model load) while the reference is fetched and captioned."""

    def tune(self, board: Storyboard, reference: Reference, run_prefix: str) -> tuple[SourcePrompt, TuningRef]:
        """Caption (unless the storyboard gives the source prompt) and fine-tune once, or reuse the stored tuning."""

    def scenes(
        self, board: Storyboard, tuning_key: str, run_prefix: str, resume: bool
    ) -> tuple[list[SceneSummary], list[KeyframeRecord], int]:
        """Render every scene: ``(scene summaries, keyframe records, keyframes kept from an interrupted run)``."""


def render_scene(
    board: Storyboard, scene: Scene, tuning_key: str, run_prefix: str, resume: bool, submit=None
) -> tuple[SceneSummary, list[KeyframeRecord], int]:
    """Render one scene, run its ``forget: auto`` workflow, and write its picks, contact sheet and manifest.

    Each pass renders every seed the scene still needs as one unit of GPU work (``render_keyframes``: one sampling
    call per strategy). With ``resume``, a (scene, seed) whose keyframes are stored intact is kept, and only the
    other seeds are rendered. ``submit``: how a unit starts, with ``render_keyframes``' arguments, returning a
    future (default ``render_keyframes.submit``, in this process; warm workers pass their own).
    Returns ``(summary, records, kept)``."""
    output = board.output.resolved
    submit = submit or render_keyframes.submit
    kept = 0

    def render(strategies: tuple[str, ...]) -> list[KeyframeRecord]:
        nonlocal kept
        settings = render_settings(board, scene, tuning_key)
        stored = {}
        for seed in scene.seeds:
            proven = resume and kept_settings_match(scene, seed, output, run_prefix, strategies, settings)
            done = verify_written(scene, seed, output, run_prefix, strategies) if proven else None
            if done is not None:
                kept += len(done)
                stored[seed] = done
        missing = [seed for seed in scene.seeds if seed not in stored]
        rendered = submit(board, scene, missing, tuning_key, output, run_prefix, strategies).result() if missing else []
        per_seed = len(rendered) // max(1, len(missing))
        for i, seed in enumerate(missing):
            stored[seed] = rendered[i * per_seed : (i + 1) * per_seed]
        return [r for seed in scene.seeds for r in stored[seed]]

    records, auto = autoforget.render_scene(scene.forget, scene.prompt, scene.auto, render)
    if auto is not None:
        get_run_logger().info("scene %s: %s", scene.id, auto["reason"])
    return write_scene_outputs(scene, records, output, run_prefix, auto), records, kept


def render_scenes(
    board: Storyboard, tuning_key: str, run_prefix: str, resume: bool, *, threads: int, submit=None
) -> tuple[list[SceneSummary], list[KeyframeRecord], int]:
    """:func:`render_scene` for every scene, up to ``threads`` scenes at once, so that one scene's CPU work (writes,
    contact sheet, manifest) overlaps the next scene's GPU work. The first scene (in storyboard order) that fails
    fails the run, once the scenes already started have ended; scenes not started yet are not started.
    Returns ``(summaries, records, kept)`` in storyboard order."""

    def one(scene: Scene):
        return render_scene(board, scene, tuning_key, run_prefix, resume, submit)

    pool = ThreadPoolExecutor(max(1, min(len(board.scenes), threads)), thread_name_prefix="fastimagic-scene")
    try:
        futures = [pool.submit(contextvars.copy_context().run, one, scene) for scene in board.scenes]
        wait(futures, return_when=FIRST_EXCEPTION)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    failed = [f for f in futures if not f.cancelled() and f.exception() is not None]
    if failed:
        failed[0].result()  # raises it
    done = [f.result() for f in futures]
    return [d[0] for d in done], [r for d in done for r in d[1]], sum(d[2] for d in done)


def start_run(
    storyboard: str, output: str | None, model: str | None, run_id: str | None, resume: bool,
    policy: Policy | None = None,
):
    """Validate, check the policy and the store, and name the run folder: ``(board, store, run_id, run_prefix)``."""
    board = read_storyboard(storyboard, output=output, model=model, policy=policy)
    store = output_store(board.output.resolved)
    store.check()  # fail fast on an unreachable endpoint, wrong credentials or a missing bucket
    if resume and not run_id:
        raise InputError("resume needs the run id of the run to continue")
    run_id = run_id or kf.new_run_id()
    run_prefix = f"{board.slug}/{run_id}"
    written = store.list(run_prefix + "/")
    if not resume and written:
        raise InputError(f"run {run_id} already exists under {store.uri}; resume it or choose another run id")
    if resume:
        check_resumable(board, store, run_prefix, written)
    return board, store, run_id, run_prefix


def check_resumable(board: Storyboard, store, run_prefix: str, written: list[str]) -> None:
    """Refuse (exit 2) to resume a run that does not exist, or one with scenes this storyboard no longer lists
    (its files would stay in the run folder, listed by no manifest)."""
    if not written:
        raise InputError(
            f"no run {run_prefix.rsplit('/', 1)[-1]} of '{board.name}' under {store.uri} to resume;"
            f" `fastimagic runs {store.uri}` lists the runs there"
        )
    if isinstance(store, LocalStore):
        store.remove_temporaries(run_prefix)  # half-written files of the killed run
    ids = {s.id for s in board.scenes}
    parts = [k.split("/") for k in written]  # <slug>/<run>/scenes|picks|.progress/<scene>/...
    gone = sorted({p[3] for p in parts if len(p) >= 5 and p[2] in ("scenes", kf.PICKS, kf.PROGRESS, SETTINGS)} - ids)
    if gone:
        raise InputError(
            f"run {run_prefix} has scenes the storyboard no longer lists ({', '.join(gone)}); --resume finishes"
            " an interrupted run of the same storyboard: run it without --resume for a new run"
        )


def run_storyboard(
    backend: Backend,
    storyboard: str,
    *,
    output: str | None = None,
    model: str | None = None,
    run_id: str | None = None,
    resume: bool = False,
    policy: Policy | None = None,
) -> dict:
    """Run a storyboard with ``backend`` doing the GPU work; write the run's manifest last. ``policy``: the
    operator's rules (:func:`fastimagic.policy.operator_policy`, never a parameter), for storyboards someone else
    wrote. Returns a summary:
    ``run_id``, ``run_uri``, ``index_url``, ``manifest``, ``keyframes``, ``tuning_key``, ``tuning_reused``,
    ``kept``."""
    logger = get_run_logger()
    started = time.perf_counter()
    timings: dict[str, float] = {}
    board, store, run_id, run_prefix = start_run(storyboard, output, model, run_id, resume, policy)
    logger.info(
        "run %s: %d scenes, up to %d keyframes -> %s/%s",
        run_id,
        len(board.scenes),
        board.keyframe_count(),
        store.uri.rstrip("/"),
        run_prefix,
    )
    write_plan(board, run_id, board.output.resolved, run_prefix)
    t = time.perf_counter()
    backend.warm_up(board)
    reference = fetch_reference(board)
    prompts, tuning = backend.tune(board, reference, run_prefix)
    timings["finetune_seconds"] = time.perf_counter() - t

    t = time.perf_counter()
    scenes, records, kept = backend.scenes(board, tuning.key, run_prefix, resume)
    timings["render_seconds"] = time.perf_counter() - t
    timings["total_seconds"] = time.perf_counter() - started

    width, height = run_size(board, reference.size)
    run = run_manifest(
        run_id=run_id,
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        storyboard={"name": board.name, "uri": storyboard, "source": board.source_text},
        model={
            "given": board.model.given,
            "identity": identity(board),
            "family": model_family(board.model.resolved, allow_pickle=board.allow_pickle).name,
        },
        resolution=(width, height),
        reference={"size": list(reference.size), "fit": describe_fit(reference.size, width, height, board.fit)},
        precision={
            "requested": board.precision,
            "finetune": tuning.precision,
            "sampling": sorted({r["precision"] for r in records if "precision" in r}),
        },
        prompts=prompts,
        tuning=tuning,
        scenes=scenes,
        records=records,
        kept=kept if resume else None,
        timings=timings,
    )
    out = board.output.resolved
    manifest_uri = write_run_outputs(run, reference, out, run_prefix)
    publish_summary(run, out, run_prefix, LINK_EXPIRES_SECONDS)
    logger.info("wrote %d keyframes; manifest %s", len(records), manifest_uri)
    return {
        "run_id": run_id,
        "run_uri": manifest_uri.rsplit("/", 1)[0],
        # what a person opens: a local path, or for S3 a presigned link that expires
        "index_url": store.url(f"{run_prefix}/{kf.INDEX}", expires=LINK_EXPIRES_SECONDS),
        "manifest": manifest_uri,
        "keyframes": len(records),
        "tuning_key": tuning.key,
        "tuning_reused": tuning.reused,
        "kept": kept,
    }
