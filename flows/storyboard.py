"""The storyboard flow: load -> fetch the reference -> caption -> fine-tune once -> fan out renders -> publish.

Wiring only (the sequence itself is :func:`flows.run.run_storyboard`); each step is a task in
:mod:`tasks.pipeline`. In this process, each scene's seeds render as one unit (a sampling call per forgetting
strategy), a few scenes at once (:data:`SCENES_IN_FLIGHT`) so that one scene's writes overlap the next one's
sampling; units take turns on the one warm model, with the tuning applied once for the run, and a fresh tuning is
written while the scenes render (the run waits for the write before its manifest). With
``scale_out=True`` the same GPU tasks run on warm GPU workers instead (background tasks, :mod:`flows.workers`).
"""

from __future__ import annotations

import contextlib

from prefect import flow

from fastimagic.config import printable
from fastimagic.editor import release
from fastimagic.manifests import KeyframeRecord, Reference, SceneSummary, SourcePrompt, TuningRef
from fastimagic.policy import Policy, PolicyRefused, operator_policy
from fastimagic.store import inside
from fastimagic.storyboard import Storyboard
from flows.run import RENDER_THREADS, render_scenes, run_storyboard
from tasks.pipeline import caption_reference, finetune_once, tuning_stored, tuning_written_behind, warm_up

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
        behind = tuning_written_behind.set(True)  # the scenes render while a fresh tuning is written
        try:
            return prompts, finetune_once(board, reference, prompts, board.output.resolved)
        finally:
            tuning_written_behind.reset(behind)

    def scenes(
        self, board: Storyboard, tuning_key: str, run_prefix: str, resume: bool
    ) -> tuple[list[SceneSummary], list[KeyframeRecord], int]:
        try:
            done = render_scenes(board, tuning_key, run_prefix, resume, threads=SCENES_IN_FLIGHT)
        except BaseException:
            with contextlib.suppress(Exception):  # the scene's error is the one to report; nothing is left writing
                tuning_stored(tuning_key)
            raise
        finally:
            release()  # the tuning stayed applied for the run; the process's warm model gets its base weights back
        tuning_stored(tuning_key)  # the manifest names the stored tuning: a failed write fails the run here
        return done


def storyboard_allowed(storyboard: str, policy: Policy) -> None:
    """Someone else's storyboard is an ``s3://`` URI (its bucket then is its home) or a file under one of the
    policy's local ``references``: a run for someone else never opens another file on this worker."""
    local = [p for p in policy.references or () if not p.startswith("s3://")]
    if not storyboard.startswith("s3://") and not any(inside(storyboard, root) for root in local):
        raise PolicyRefused(f"{printable(storyboard)[:200]}: refused by the policy: a storyboard run for someone else"
                            " is an s3:// URI, or a file under the policy's local references")


def _for_someone_else() -> bool:
    """True when this flow run was created from a deployment: anyone with the Prefect API may have asked for it."""
    from prefect.context import FlowRunContext

    context = FlowRunContext.get()
    return bool(context and context.flow_run and context.flow_run.deployment_id)


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
    written complete. scale_out: run the fine-tune and every render on warm GPU workers (``fastimagic worker``)
    instead of in this process; see :mod:`flows.workers`.
    The storyboard must keep the operator's policy, taken from this process only, never from a parameter
    (:func:`fastimagic.policy.operator_policy`): one handed over in this process (the CLI's ``--policy``, the
    inbox's rules), else ``$FASTIMAGIC_POLICY``, else for a deployment's run (someone else's storyboard) the safe
    default; a local storyboard for someone else must be under the policy's local ``references``. Returns a
    summary with the manifest URI.
    """
    for_others = _for_someone_else()
    policy = operator_policy(for_others=for_others)
    if for_others:
        storyboard_allowed(storyboard, policy)
    if scale_out:
        from flows.workers import Warm

        backend = Warm()
    else:
        backend = InProcess()
    return run_storyboard(
        backend, storyboard, output=output, model=model, run_id=run_id, resume=resume, policy=policy
    )
