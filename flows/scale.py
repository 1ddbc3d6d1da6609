"""Scale-out: the fine-tune and each scene run as flow runs of their own deployments on the GPU work pool.

The storyboard flow (``scale_out=True``, the :class:`ScaleOut` backend of :func:`flows.run.run_storyboard`) stays
light and can run on any worker:

1. it runs the ``finetune`` deployment once (skipped when the tuning for the content key is already stored) and
   waits; the fine-tune flow stores the tuning under ``tunings/<key>/`` and its summary in the run folder;
2. it starts one ``render-scene`` flow run per scene (``run_deployment``), so scenes spread over every GPU
   worker of the pool, on any machine; each pulls the tuning by key, renders, writes keyframes and its scene
   manifest, and keeps the base model loaded for all of the scene's renders (a process-level cache);
3. it waits for all of them; a scene whose flow run did not complete (a worker killed mid-scene) is submitted
   again with ``resume=True``, which keeps the keyframes it already wrote intact and renders the rest;
4. it writes the run manifest last.

Everything crosses machines through the object store (the run folder and ``tunings/``), not through Prefect
results, so no shared result storage is needed.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict

from prefect import flow, get_run_logger

from fastimagic import keyframes as kf
from fastimagic.errors import FastImagicError, InputError
from fastimagic.manifests import KeyframeRecord, Reference, SceneSummary, SourcePrompt, TuningRef
from fastimagic.storyboard import Storyboard
from fastimagic.tuning import META_FILE
from flows.run import RENDER_THREADS, read_storyboard, render_scene
from tasks.pipeline import caption_reference, fetch_reference, finetune_once, tuning_key
from tasks.storage import output_store

FINETUNE_DEPLOYMENT = "finetune/finetune"  # <flow name>/<deployment name>, as deploy/prefect.yaml names them
RENDER_DEPLOYMENT = "render-scene/render-scene"
FINETUNE_RESULT = f"{kf.PROGRESS}/finetune.json"
SCENE_ATTEMPTS = 2


@flow(name="finetune", log_prints=True)
def finetune_flow(storyboard: str, run_prefix: str, output: str | None = None, model: str | None = None) -> dict:
    """Fine-tune once for ``storyboard`` (or reuse the stored tuning) and record the result in the run folder."""
    board = read_storyboard(storyboard, output=output, model=model)
    reference = fetch_reference(board)
    prompts = caption_reference(board, reference)
    tuning = finetune_once(board, reference, prompts, board.output.resolved)
    result = {"tuning": tuning.as_dict(), "prompts": asdict(prompts)}
    output_store(board.output.resolved).child(run_prefix).put_bytes(FINETUNE_RESULT, kf.dumps(result))
    return result


@flow(name="render-scene", log_prints=True, flow_run_name="{scene_id}", task_runner=RENDER_THREADS)
def render_scene_flow(
    storyboard: str,
    scene_id: str,
    tuning_key: str,
    run_prefix: str,
    output: str | None = None,
    model: str | None = None,
    resume: bool = False,
) -> dict:
    """Render every seed of one scene with the stored tuning ``tuning_key``; write its keyframes and manifest."""
    board = read_storyboard(storyboard, output=output, model=model)
    scene = next((s for s in board.scenes if s.id == scene_id), None)
    if scene is None:
        raise InputError(f"{storyboard}: no scene '{scene_id}'")
    summary, _, _ = render_scene(board, scene, tuning_key, run_prefix, resume)
    return summary.as_dict()


def _wait(flow_run_id, poll_seconds: float = 2.0):
    """The flow run once it reaches a final state (completed, failed, crashed, cancelled)."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        while True:
            run = client.read_flow_run(flow_run_id)
            if run.state is not None and run.state.is_final():
                return run
            time.sleep(poll_seconds)


class ScaleOut:
    """Tune and render as flow runs of the ``finetune`` and ``render-scene`` deployments (the GPU work pool)."""

    def __init__(self, *, output: str | None = None, model: str | None = None):
        self.overrides = {"output": output, "model": model}

    def tune(self, board: Storyboard, reference: Reference, run_prefix: str) -> tuple[SourcePrompt, TuningRef]:
        from prefect.deployments import run_deployment

        if board.source_prompt:  # the content key is known without captioning: skip the GPU hop when stored
            key = tuning_key(board, reference, board.source_prompt)
            if output_store(board.output.resolved).child(f"tunings/{key}").exists(META_FILE):
                get_run_logger().info("tuning %s is stored: no fine-tune flow run", key)
                return SourcePrompt(board.source_prompt), TuningRef(key=key, reused=True)
        params = {"storyboard": board.source, **self.overrides, "run_prefix": run_prefix}
        ft = run_deployment(FINETUNE_DEPLOYMENT, parameters=params, timeout=None)
        if not ft.state or not ft.state.is_completed():
            raise FastImagicError(f"fine-tune flow run {ft.name} ended {ft.state.name if ft.state else 'unknown'}")
        run_store = output_store(board.output.resolved).child(run_prefix)
        stored = json.loads(run_store.get_bytes(FINETUNE_RESULT))
        return SourcePrompt(**stored["prompts"]), TuningRef.from_dict(stored["tuning"])

    def scenes(
        self, board: Storyboard, tuning_key: str, run_prefix: str, resume: bool
    ) -> tuple[list[SceneSummary], list[KeyframeRecord], int]:
        from prefect.deployments import run_deployment

        def submit(scene_id: str, resume_scene: bool):
            parameters = {
                "storyboard": board.source,
                **self.overrides,
                "scene_id": scene_id,
                "tuning_key": tuning_key,
                "run_prefix": run_prefix,
                "resume": resume_scene,
            }
            return run_deployment(RENDER_DEPLOYMENT, parameters=parameters, timeout=0)  # start all, then wait

        pending = {scene.id: submit(scene.id, resume) for scene in board.scenes}
        for attempt in range(1, SCENE_ATTEMPTS + 1):
            failed = {}
            for scene_id, fr in pending.items():
                final = _wait(fr.id)
                if not final.state.is_completed():
                    failed[scene_id] = final
            if not failed:
                break
            names = ", ".join(f"{s} ({f.state.name})" for s, f in failed.items())
            if attempt == SCENE_ATTEMPTS:
                raise FastImagicError(f"scenes did not complete after {SCENE_ATTEMPTS} attempts: {names}")
            get_run_logger().warning("scene flow runs did not complete: %s; submitting them again (resume)", names)
            pending = {scene_id: submit(scene_id, True) for scene_id in failed}

        run_store = output_store(board.output.resolved).child(run_prefix)
        summaries, records = [], []
        for scene in board.scenes:
            prefix = kf.scene_prefix(scene.id)
            manifest = json.loads(run_store.get_bytes(f"{prefix}/{kf.MANIFEST}"))
            summaries.append(SceneSummary.of(manifest, f"{prefix}/{kf.MANIFEST}", f"{prefix}/{kf.CONTACT_SHEET}"))
            records += manifest["keyframes"]
        return summaries, records, 0
