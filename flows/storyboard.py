"""The storyboard flow: load -> fetch the reference -> caption -> fine-tune once -> fan out renders -> publish.

Wiring only; each step is a task in :mod:`tasks.pipeline`. Renders fan out per (scene, seed) and are bounded by
the ``gpu`` tag's concurrency limit when one is set; in one process they also take turns on the one warm model.
Manifests are written last, so a manifest only ever lists keyframes that exist.
"""

from __future__ import annotations

import time
from datetime import datetime, timezone

from prefect import flow, get_run_logger
from prefect.task_runners import ThreadPoolTaskRunner

from fastimagic import keyframes as kf
from fastimagic.errors import InputError
from fastimagic.images import load_reference
from fastimagic.models import model_identity
from fastimagic.selection import choose_best
from fastimagic.store import NotFound
from fastimagic.storyboard import Scene, Storyboard
from fastimagic.storyboard_yaml import load_storyboard
from tasks.pipeline import (
    caption_reference,
    decide_forgetting,
    fetch_reference,
    finetune_once,
    publish_summary,
    render_keyframes,
    verify_written,
    write_run_outputs,
    write_scene_outputs,
)
from tasks.storage import output_store, read

# Presigned links handed to people (CLI output, artifacts) expire after this many seconds.
LINK_EXPIRES_SECONDS = 24 * 3600


def read_storyboard(storyboard: str, *, output: str | None = None, model: str | None = None) -> Storyboard:
    """Load and validate a storyboard from a local path or ``s3://`` URI, with optional overrides."""
    text = read(storyboard).decode("utf-8", errors="replace") if storyboard.startswith("s3://") else None
    overrides = {k: v for k, v in (("output", output), ("model", model)) if v}
    board = load_storyboard(storyboard, text=text, overrides=overrides or None)
    if board.scorer_name is None:
        needs = [s.id for s in board.scenes if s.auto_forget or s.select is not None]
        if needs:
            raise InputError(
                f"{storyboard}: scorer: none, but scenes {', '.join(needs)} use forget: auto or select,"
                " which need scores; set scorer: auto"
            )
    return board


def _records(item) -> list[dict]:
    return item if isinstance(item, list) else item.result()


def preflight(board: Storyboard) -> None:
    """Check what can be checked before any model loads or anything is written: the model path, the reference
    image (exists, decodes, sane size) and the output store (reachable, credentials, bucket).

    Raises :class:`InputError` for bad input (CLI exit 2) and :class:`StoreError` for storage trouble (exit 1).
    """
    model_identity(board.model.resolved, allow_pickle=board.allow_pickle)
    uri = board.reference.resolved
    try:
        data = read(uri)
    except NotFound as e:
        raise InputError(f"{board.source} reference: {e}") from None
    load_reference(data, uri)
    output_store(board.output.resolved).check()


class SceneRenders:
    """The renders of one run: launches (scene, seed) units, verifies written ones on resume, and finishes each
    scene (the ``forget: auto`` second pass, picks, contact sheet, scene manifest)."""

    def __init__(self, board: Storyboard, tuning_key: str, output: str, run_prefix: str, resume: bool):
        self.board, self.key, self.out, self.prefix, self.resume = board, tuning_key, output, run_prefix, resume
        self.kept = 0  # keyframes found written and intact (resume)
        self._first: dict = {}

    def _launch(self, scene: Scene, seed: int, strategies: tuple[str, ...]):
        if self.resume:
            done = verify_written(scene, seed, self.out, self.prefix, strategies)
            if done is not None:
                self.kept += len(done)
                return done
        return render_keyframes.submit(self.board, scene, seed, self.key, self.out, self.prefix, strategies)

    def start(self, scene: Scene) -> None:
        """Queue the first pass of ``scene`` (all seeds); renders run concurrently, bounded by the gpu tag."""
        first = ("none",) if scene.auto_forget else scene.forget
        self._first[scene.id] = [self._launch(scene, seed, first) for seed in scene.seeds]

    def finish(self, scene: Scene) -> tuple[dict, list[dict]]:
        """Wait for ``scene``'s renders, run its auto-forgetting pass if needed, write its outputs."""
        records = [r for item in self._first.pop(scene.id) for r in _records(item)]
        auto = None
        if scene.auto_forget:
            auto = decide_forgetting(scene, records)
            auto["chosen"] = "none"
            if auto["strategies"]:
                strategies = tuple(auto["strategies"])
                again = [r for seed in scene.seeds for r in _records(self._launch(scene, seed, strategies))]
                by_strategy = {"none": records} | {n: [r for r in again if r["forget"] == n] for n in strategies}
                auto["chosen"] = choose_best(by_strategy)
                records = records + again
        return write_scene_outputs(scene, records, self.out, self.prefix, auto), records


def start_run(storyboard: str, output: str | None, model: str | None, run_id: str | None, resume: bool):
    """Validate, check the store, and name the run folder: ``(board, store, run_id, run_prefix)``."""
    board = read_storyboard(storyboard, output=output, model=model)
    store = output_store(board.output.resolved)
    store.check()  # fail fast on an unreachable endpoint, wrong credentials or a missing bucket
    if resume and not run_id:
        raise InputError("resume needs the run id of the run to continue")
    run_id = run_id or kf.new_run_id()
    run_prefix = f"{board.slug}/{run_id}"
    if not resume and store.list(run_prefix + "/"):
        raise InputError(f"run {run_id} already exists under {store.uri}; resume it or choose another run id")
    return board, store, run_id, run_prefix


def finish_run(
    board: Storyboard,
    storyboard: str,
    store,
    run_id: str,
    run_prefix: str,
    *,
    reference: dict,
    prompts: dict,
    tuning: dict,
    scenes: list[dict],
    records: list[dict],
    kept: int | None,
    timings: dict,
) -> dict:
    """Write the run's reference copy, index.html and manifest (last), the summary artifact; return the summary."""
    out = board.output.resolved
    run = {
        "format": 1,
        "status": "complete",
        "run_id": run_id,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "storyboard": {"name": board.name, "uri": storyboard, "source": board.source_text},
        "model": {
            "given": board.model.given,
            "identity": model_identity(board.model.resolved, allow_pickle=board.allow_pickle),
        },
        "resolution": {"width": board.width, "height": board.height},
        "caption": prompts["caption"],
        "source_prompt": prompts["source_prompt"],
        "tuning": tuning,
        "resumed": None if kept is None else {"kept": kept, "rendered": len(records) - kept},
        "timings": {k: round(v, 3) for k, v in timings.items()},
        "scenes": scenes,
        "keyframes": records,
    }
    manifest_uri = write_run_outputs(run, reference, out, run_prefix)
    publish_summary(run, out, run_prefix, LINK_EXPIRES_SECONDS)
    get_run_logger().info("wrote %d keyframes; manifest %s", len(records), manifest_uri)
    return {
        "run_id": run_id,
        "run_uri": manifest_uri.rsplit("/", 1)[0],
        # what a person opens: a local path, or for S3 a presigned link that expires
        "index_url": store.url(f"{run_prefix}/{kf.INDEX}", expires=LINK_EXPIRES_SECONDS),
        "manifest": manifest_uri,
        "keyframes": len(records),
        "tuning_key": tuning["key"],
        "tuning_reused": tuning["reused"],
        "kept": kept or 0,
    }


# Renders in one process take turns on the one warm model (its lock), so two threads (one rendering, one writing)
# lose nothing; Prefect's default pool would start a thread per submitted render, and each thread that has run
# torch keeps ~2-3 MiB of native memory until the flow ends (measured: +128 MiB over 40 scenes, +3 MiB with 2).
RENDER_THREADS = ThreadPoolTaskRunner(max_workers=2)


@flow(name="storyboard", log_prints=True, task_runner=RENDER_THREADS)
def storyboard_flow(
    storyboard: str,
    output: str | None = None,
    model: str | None = None,
    run_id: str | None = None,
    resume: bool = False,
    scale_out: bool = False,
) -> dict:
    """Render a storyboard's keyframes.

    storyboard: a local YAML path or ``s3://bucket/key``. output / model: override the storyboard's.
    run_id: the run folder name (default: a new timestamped id). resume: continue the run ``run_id``: keyframes
    already written and intact (SHA-256 verified) are kept, the rest are rendered, and the manifests are
    written complete. scale_out: run the fine-tune and each scene as flow runs of the ``finetune`` and
    ``render-scene`` deployments (GPU work pool) instead of in this process; see :mod:`flows.scale`.
    Returns a summary with the manifest URI.
    """
    if scale_out:
        from flows.scale import scaled_out_run

        return scaled_out_run(storyboard, output=output, model=model, run_id=run_id, resume=resume)
    logger = get_run_logger()
    started = time.perf_counter()
    timings: dict[str, float] = {}
    board, store, run_id, run_prefix = start_run(storyboard, output, model, run_id, resume)
    out = board.output.resolved
    logger.info(
        "run %s: %d scenes, up to %d keyframes -> %s/%s",
        run_id,
        len(board.scenes),
        board.keyframe_count(),
        store.uri.rstrip("/"),
        run_prefix,
    )

    t = time.perf_counter()
    reference = fetch_reference(board)
    prompts = caption_reference(board, reference)
    timings["prepare_seconds"] = time.perf_counter() - t

    t = time.perf_counter()
    tuning = finetune_once(board, reference, prompts, out)
    timings["finetune_seconds"] = time.perf_counter() - t

    t = time.perf_counter()
    renders = SceneRenders(board, tuning["key"], out, run_prefix, resume)
    for scene in board.scenes:
        renders.start(scene)
    scenes, records = [], []
    for scene in board.scenes:
        summary, scene_records = renders.finish(scene)
        scenes.append(summary)
        records += scene_records
    timings["render_seconds"] = time.perf_counter() - t
    timings["total_seconds"] = time.perf_counter() - started
    return finish_run(
        board,
        storyboard,
        store,
        run_id,
        run_prefix,
        reference=reference,
        prompts=prompts,
        tuning=tuning,
        scenes=scenes,
        records=records,
        kept=renders.kept if resume else None,
        timings=timings,
    )
