"""The storyboard flow: load -> fetch the reference -> caption -> fine-tune once -> fan out renders -> publish.

Wiring only (the sequence itself is :func:`flows.run.run_storyboard`); each step is a task in
:mod:`tasks.pipeline`. In this process, each scene's seeds render as one unit (a sampling call per forgetting
strategy), a few scenes at once (:data:`SCENES_IN_FLIGHT`) so that one scene's writes overlap the next one's
sampling; units take turns on the one warm model, with the tuning applied once for the run. With
``scale_out=True`` the same GPU tasks run on warm GPU workers instead (background tasks, :mod:`flows.workers`).
"""

from __future__ import annotations

from prefect import flow

from fastimagic.editor import release
from fastimagic.manifests import KeyframeRecord, Reference, SceneSummary, SourcePrompt, TuningRef
from fastimagic.storyboard import Storyboard
from flows.run import RENDER_THREADS, render_scenes, run_storyboard
from tasks.pipeline import caption_reference, finetune_once, warm_up

# Scenes rendered at once in this process. Their units take turns on the one warm model (its lock), and at most
# RENDER_THREADS (2) units run at once, one sampling while the other writes: the bound on keyframes held in
# memory, and the back-pressure on scenes waiting (their units queue, holding no images).
SCENES_IN_FLIGHT = 3


class InProcess:
    """Tune and render in this process, on the process's warm model."""

    def warm_up(self, board: Storyboard) -> None:
        warm_up(board)  # the base model loads while the reference is fetched and captioned

    def tune(self, board: Storyboard, reference: Reference, run_prefix: str) -> tuple[SourcePrompt, TuningRef]:
        prompts = caption_reference(board, reference)
        return prompts, finetune_once(board, reference, prompts, board.output.resolved)

    def scenes(
        self, board: Storyboard, tuning_key: str, run_prefix: str, resume: bool
    ) -> tuple[list[SceneSummary], list[KeyframeRecord], int]:
        try:
            return render_scenes(board, tuning_key, run_prefix, resume, threads=SCENES_IN_FLIGHT)
        finally:
            release()  # the tuning stayed applied for the run; the process's warm model gets its base weights back


@flow(name="storyboard", log_prints=True, task_runner=RENDER_THREADS)
def storyboard_flow(
    storyboard: str,
    output: str | None = None,
    model: str | None = None,
    run_id: str | None = None,
    resume: bool = False,
    scale_out: bool = False,
    policy: dict | None = None,
) -> dict:
    """Render a storyboard's keyframes.

    storyboard: a local YAML path or ``s3://bucket/key``. output / model: override the storyboard's.
    run_id: the run folder name (default: a new timestamped id). resume: continue the run ``run_id``: keyframes
    already written and intact (SHA-256 verified) are kept, the rest are rendered, and the manifests are
    written complete. scale_out: run the fine-tune and every render on warm GPU workers (``fastimagic worker``)
    instead of in this process; see :mod:`flows.workers`.
    policy: the operator's rules (:class:`fastimagic.policy.Policy` as data) the storyboard must keep; the inbox
    passes them. Without it, ``$FASTIMAGIC_POLICY`` applies where the worker sets it.
    Returns a summary with the manifest URI.
    """
    if scale_out:
        from flows.workers import Warm

        backend = Warm()
    else:
        backend = InProcess()
    return run_storyboard(
        backend, storyboard, output=output, model=model, run_id=run_id, resume=resume, policy=policy
    )
