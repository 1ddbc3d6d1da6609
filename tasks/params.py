"""What crosses from a submitter to a warm GPU worker: plain JSON data, read back and checked again on the worker.

A warm worker (:mod:`flows.workers`) runs tasks that anyone who can create task runs on the Prefect server may
ask for, with parameters from the shared scheduling storage. So nothing it is handed is an object: the submitter
sends the storyboard's *text* and URI, ids, keys and numbers (:func:`caption_params`, :func:`finetune_params`,
:func:`render_params`), and each GPU task starts by turning them back into a storyboard the worker validated
itself and checked against its own operator's policy (:func:`caption_args`, :func:`finetune_args`,
:func:`render_args`). Called in this process with the objects themselves (the in-process backend), the same
functions hand them through unchanged: the flow has validated and checked them already.

Everything else a task receives must agree with that storyboard: the output it writes to is the storyboard's
output, the scene is one of its scenes, the seeds some of that scene's seeds, the tuning key a content key, the
run folder one of its runs; the reference is fetched here, from the URI the storyboard names, and must have the
SHA-256 the submitter fetched.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from fastimagic.errors import InputError
from fastimagic.forgetting import STRATEGIES
from fastimagic.images import load_reference
from fastimagic.manifests import Reference, SourcePrompt
from fastimagic.policy import enforce, operator_policy
from fastimagic.storyboard import Scene, Storyboard
from fastimagic.storyboard_yaml import load_storyboard

_KEY = re.compile(r"[0-9a-f]{32}")  # a tuning's content key (fastimagic.tuning.content_key)
_RUN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
_OVERRIDES = ("output", "model")


class BadParameters(InputError):
    """Task parameters that are not what a fastimagic submitter sends; refused before anything is read."""


def _require(ok: bool, what: str) -> None:
    if not ok:
        raise BadParameters(f"task parameters refused: {what}")


# --- the submitter's side: objects -> plain data --------------------------------------------------------------


def board_data(board: Storyboard) -> dict:
    """A storyboard as plain data: its URI, its text as written and the fields given besides it."""
    return {"storyboard": board.source, "text": board.source_text, "overrides": board.overrides}


def reference_data(reference: Reference) -> dict:
    return {"uri": reference.uri, "sha256": reference.sha256}


def prompts_data(prompts: SourcePrompt) -> dict:
    return {"source_prompt": prompts.source_prompt, "caption": prompts.caption, "captioner": prompts.captioner}


def caption_params(board: Storyboard, reference: Reference) -> tuple:
    return board_data(board), reference_data(reference)


def finetune_params(board: Storyboard, reference: Reference, prompts: SourcePrompt, output: str) -> tuple:
    return board_data(board), reference_data(reference), prompts_data(prompts), output


def render_params(
    board: Storyboard, scene: Scene, seeds: list[int], key: str, output: str, run_prefix: str,
    strategies: tuple[str, ...],
) -> tuple:
    return board_data(board), scene.id, [int(s) for s in seeds], key, output, run_prefix, list(strategies)


# --- the worker's side: plain data -> objects it checked itself ------------------------------------------------


def worker_board(value: Any) -> Storyboard:
    """The storyboard of a task: as is when this process made it (a :class:`Storyboard`), else loaded from the
    plain data, validated, and checked against this worker's own policy (``$FASTIMAGIC_POLICY``, else the safe
    default), whatever the submitter checked."""
    if isinstance(value, Storyboard):
        return value
    _require(isinstance(value, Mapping) and set(value) == {"storyboard", "text", "overrides"},
             "the storyboard must be {storyboard, text, overrides}")
    source, text, overrides = value["storyboard"], value["text"], value["overrides"]
    _require(isinstance(source, str) and isinstance(text, str), "storyboard and text must be strings")
    _require(isinstance(overrides, Mapping) and set(overrides) <= set(_OVERRIDES)
             and all(isinstance(v, str) for v in overrides.values()), "overrides may set output and model only")
    policy = operator_policy(for_others=True)
    _require(len(text) <= policy.caps.storyboard_bytes, f"the storyboard is more than the cap of"
             f" {policy.caps.storyboard_bytes} bytes (caps.storyboard_bytes)")  # before it is parsed
    board = load_storyboard(source, text=text, overrides=dict(overrides) or None, caps=policy.caps)
    if source.startswith("s3://") and (policy.references is None or policy.outputs is None):
        _same_as_stored(source, text, policy.caps.storyboard_bytes)  # its bucket is its home: prove it is there
    enforce(board, policy)
    return board


def _same_as_stored(uri: str, text: str, max_bytes: int) -> None:
    """Refuse a storyboard said to be at ``uri`` unless that object holds this text: where the policy leaves the
    allowed prefixes to the storyboard's home (its bucket), a task may not name a bucket it was never in."""
    from fastimagic.store import NotFound
    from fastimagic.storyboard_yaml import decode_storyboard
    from tasks.storage import read

    try:
        same = decode_storyboard(read(uri, max_bytes=max_bytes), uri) == text
    except (NotFound, InputError):
        same = False
    if not same:
        raise BadParameters(f"task parameters refused: {uri} does not hold the storyboard this task was sent (changed"
                            " since it was submitted?); submit it again")


def _output(board: Storyboard, output: Any) -> str:
    _require(output == board.output.resolved, "the output is not the storyboard's")
    return output


def _reference(board: Storyboard, value: Any) -> Reference:
    if isinstance(value, Reference):
        return value
    _require(isinstance(value, Mapping) and set(value) == {"uri", "sha256"}, "the reference must be {uri, sha256}")
    uri = board.reference.resolved
    _require(value["uri"] == uri, "the reference is not the storyboard's")
    from tasks.storage import read

    data = read(uri, max_bytes=board.max_reference_bytes, within=board.reference_roots)  # what the policy allows
    reference = Reference.of(data, uri, load_reference(data, uri).size)
    if reference.sha256 != value["sha256"]:
        raise InputError(f"{board.where('reference')}: the reference image changed during the run (its SHA-256"
                         " differs from the one the run started with); run the storyboard again")
    return reference


def _prompts(value: Any) -> SourcePrompt:
    if isinstance(value, SourcePrompt):
        return value
    _require(isinstance(value, Mapping) and set(value) == {"source_prompt", "caption", "captioner"}
             and isinstance(value["source_prompt"], str) and isinstance(value["caption"], (str, type(None)))
             and isinstance(value["captioner"], (Mapping, type(None))), "bad source prompt")
    return SourcePrompt(value["source_prompt"], value["caption"],
                        dict(value["captioner"]) if value["captioner"] is not None else None)


def caption_args(board: Any, reference: Any) -> tuple[Storyboard, Reference]:
    """:func:`tasks.pipeline.caption_reference`'s arguments, checked (see the module docstring)."""
    board = worker_board(board)
    return board, _reference(board, reference)


def finetune_args(board: Any, reference: Any, prompts: Any, output: Any) -> tuple:
    """:func:`tasks.pipeline.finetune_once`'s arguments, checked (see the module docstring)."""
    board = worker_board(board)
    return board, _reference(board, reference), _prompts(prompts), _output(board, output)


def render_args(board: Any, scene: Any, seeds: Any, key: Any, output: Any, run_prefix: Any, strategies: Any) -> tuple:
    """:func:`tasks.pipeline.render_keyframes`' arguments, checked (see the module docstring)."""
    if isinstance(board, Storyboard):
        return board, scene, seeds, key, output, run_prefix, strategies
    board = worker_board(board)
    found = [s for s in board.scenes if s.id == scene]
    _require(len(found) == 1, "no such scene in the storyboard")
    scene = found[0]
    _require(isinstance(seeds, list) and 0 < len(seeds) == len(set(seeds))
             and all(type(s) is int and s in scene.seeds for s in seeds), "the seeds are not the scene's")
    _require(isinstance(key, str) and _KEY.fullmatch(key) is not None, "the tuning key is not a content key")
    slug, _, run_id = run_prefix.partition("/") if isinstance(run_prefix, str) else ("", "", "")
    _require(slug == board.slug and _RUN_ID.fullmatch(run_id) is not None, "the run folder is not the storyboard's")
    _require(strategies is None or (isinstance(strategies, list) and 0 < len(strategies) <= len(STRATEGIES)
                                    and all(s in STRATEGIES for s in strategies)), "unknown forgetting strategies")
    return board, scene, seeds, key, _output(board, output), run_prefix, tuple(strategies) if strategies else None
