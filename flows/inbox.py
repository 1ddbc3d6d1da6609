"""The inbox flow: storyboards dropped into a folder or bucket prefix are run, each exactly once.

Layout under the inbox root (``s3://bucket/prefix`` or a local folder)::

    <inbox>/inbox/<name>.yaml                      drop storyboards here (.yaml or .yml, directly in inbox/)
    <inbox>/claims/<name>-<sha256>/<attempt>.json  who runs which content: written create-if-absent, then its status
    <inbox>/done/<run-id>-<name>                   the storyboard as run, and beside it
    <inbox>/done/<run-id>-<name>.result.json       run id, manifest URI, flow run ids
    <inbox>/failed/<name>, <name>.error.txt        a storyboard that failed, and why

Exactly once: before running a file, a trigger *claims* its content (name + SHA-256) with a create-if-absent
write (:func:`tasks.claims.create_once`); only the trigger that created the claim runs it. So two triggers at once
run each file once, and a file already claimed is left alone while its claimant is alive. A claim records the run
id it will use, the manifest it will write and the Prefect flow runs doing the work; a later trigger that finds a
claim still "running" looks at them:

- the manifest exists: the run finished but the file was not moved (the claimant died after the run): it is moved
  to done/ without running again;
- every recorded flow run is in a final state (completed, failed, crashed, cancelled), or none can be looked up and
  the claim is older than ``stale_after_minutes``: the claimant died; the next attempt is claimed (again
  create-if-absent, so only one trigger takes over) and resumes the same run (``resume=True``): keyframes already
  written and intact are kept, the rest are rendered;
- otherwise it is still being worked on and is skipped.

A claim that is done or failed while its file is in the inbox again means the same bytes were uploaded again:
that is a new request and runs as a new attempt (to run a storyboard again, upload it again).

Whoever can upload to the inbox is not trusted: every storyboard is checked against the operator's policy
(:mod:`fastimagic.policy`: the ``policy`` parameter, else ``$FASTIMAGIC_POLICY``, else the safe default, which
allows references and outputs only under the inbox's own bucket, or the inbox folder for a local inbox) before
anything it names is opened, and the storyboard flow checks the same rules again on the text it runs. The error
beside a failed storyboard says what the policy or the schema refused; a failure on the worker is reported without
its details (they are in the flow run's logs). Each object is handled on its own: a bad name or a file that cannot
be read fails alone and the others still run.

Storyboards are loaded under their inbox URI, so relative paths in them (``reference``, ``output``) resolve against
the ``inbox/`` folder; absolute ``s3://`` URIs are the robust choice.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any
from uuid import UUID

from prefect import flow, get_run_logger

from fastimagic import keyframes as kf
from fastimagic.config import printable
from fastimagic.errors import FastImagicError, InputError
from fastimagic.policy import Policy, enforce, for_home, policy_from
from fastimagic.store import NotFound, S3Store, Store, StoreError, TooLarge, safe_key
from fastimagic.storyboard_yaml import decode_storyboard, load_storyboard
from tasks.claims import create_once
from tasks.storage import output_store, read

INBOX, CLAIMS, DONE, FAILED = "inbox/", "claims/", "done/", "failed/"
RUN_MODES = ("subflow", "deployment")
_ATTEMPT = re.compile(r"(\d{4})\.json")


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _one_line(exc: BaseException) -> str:
    """The error as the uploader may read it (it is written beside their file). What they wrote wrong (schema and
    policy problems, a missing or broken image in an allowed place) is said as written, one problem per line, with
    control characters escaped; any other failure on the worker only as its kind, since its text may name the
    worker's files: the details are in the flow run's logs."""
    if isinstance(exc, (InputError, NotFound)):
        return "\n".join(printable(line) for line in str(exc).strip().splitlines())
    return f"the run failed on the worker ({type(exc).__name__}); the operator can see why in the flow run's logs"


def _flow_run_id() -> str | None:
    from prefect.runtime import flow_run

    return flow_run.get_id()


def _flow_run_final(flow_run_id: str) -> bool | None:
    """Whether a flow run is in a final state; None if it cannot be looked up (another server, deleted)."""
    from prefect import get_client

    try:
        with get_client(sync_client=True) as client:
            state = client.read_flow_run(UUID(flow_run_id)).state
    except Exception:  # noqa: BLE001 - unknown is an answer here
        return None
    return bool(state and state.is_final())


def pending_storyboards(root: Store) -> list[str]:
    """Names of the ``.yaml`` / ``.yml`` files directly in ``<root>/inbox/``, sorted."""
    names = [k[len(INBOX):] for k in root.list(INBOX)]
    return [n for n in names if "/" not in n and n.lower().endswith((".yaml", ".yml"))]


class _Claim:
    """One claim object: ``claims/<name>-<sha256>/<attempt>.json``, owned by whoever created it."""

    def __init__(self, root: Store, name: str, sha256: str, attempt: int, record: dict[str, Any]):
        self.root, self.name, self.sha256, self.attempt, self.record = root, name, sha256, attempt, record

    @property
    def key(self) -> str:
        return f"{CLAIMS}{self.name}-{self.sha256}/{self.attempt:04d}.json"

    def save(self, **changes: Any) -> None:
        self.record.update(changes)
        self.root.put_bytes(self.key, json.dumps(self.record, indent=2).encode())


def _latest_claim(root: Store, name: str, sha256: str) -> _Claim | None:
    folder = f"{CLAIMS}{name}-{sha256}/"
    attempts = [int(m.group(1)) for k in root.list(folder) if (m := _ATTEMPT.fullmatch(k[len(folder):]))]
    if not attempts:
        return None
    attempt = max(attempts)
    key = f"{folder}{attempt:04d}.json"
    try:
        record = json.loads(root.get_bytes(key))
    except (NotFound, ValueError):
        record = {"status": "unreadable"}
    return _Claim(root, name, sha256, attempt, record)


def _manifest_written(record: dict[str, Any]) -> bool:
    if not (record.get("output") and record.get("manifest_key")):
        return False
    try:
        return output_store(record["output"]).exists(record["manifest_key"])
    except FastImagicError:
        return False


def _claimant_gone(record: dict[str, Any], stale_after: timedelta) -> bool:
    """Whether nobody is working on a "running" claim any more (see the module docstring)."""
    ids = [record[k] for k in ("child_flow_run_id", "flow_run_id") if record.get(k)]
    final = [_flow_run_final(i) for i in ids]
    if any(f is False for f in final):
        return False
    if final and all(final):
        return True
    try:
        claimed = datetime.fromisoformat(record["claimed_at"])
    except (KeyError, TypeError, ValueError):
        return True  # an unreadable claim has no owner to wait for
    return datetime.now(timezone.utc) - claimed > stale_after


def _remove_from_inbox(root: Store, name: str, sha256: str) -> None:
    """Delete ``inbox/<name>`` unless it was replaced by different content meanwhile (a new upload stays)."""
    try:
        current = root.get_bytes(INBOX + name)
    except NotFound:
        return
    if hashlib.sha256(current).hexdigest() == sha256:
        root.delete(INBOX + name)


def _finish_done(claim: _Claim, data: bytes, result: dict[str, Any]) -> dict[str, Any]:
    root, name = claim.root, claim.name
    done_key = f"{DONE}{result['run_id']}-{name}"
    root.put_bytes(done_key, data, content_type="application/yaml")
    root.put_bytes(f"{done_key}.result.json", json.dumps(result, indent=2).encode())
    _remove_from_inbox(root, name, claim.sha256)
    claim.save(status="done", finished_at=_now(), done=done_key)  # after the delete: see _plan
    return {**result, "status": "done", "done": f"{root.uri.rstrip('/')}/{done_key}"}


def _finish_failed(claim: _Claim, data: bytes, error: str) -> dict[str, Any]:
    root, name = claim.root, claim.name
    root.put_bytes(f"{FAILED}{name}", data, content_type="application/yaml")
    root.put_bytes(f"{FAILED}{name}.error.txt", (error + "\n").encode(), content_type="text/plain")
    _remove_from_inbox(root, name, claim.sha256)
    claim.save(status="failed", finished_at=_now(), error=error)
    return {"name": name, "status": "failed", "error": error, "run_id": claim.record.get("run_id"),
            "failed": f"{root.uri.rstrip('/')}/{FAILED}{name}"}


def _result_of(claim: _Claim) -> dict[str, Any]:
    r = claim.record
    return {"name": claim.name, "run_id": r.get("run_id"), "manifest": r.get("manifest"),
            "storyboard": r.get("uri"), "flow_run_id": r.get("child_flow_run_id") or r.get("flow_run_id"),
            "attempt": claim.attempt, "sha256": claim.sha256}


def _refuse_unread(root: Store, name: str, error: str) -> dict[str, Any]:
    """An inbox object too large to read: the error goes to failed/, the object is removed, nothing is copied."""
    root.put_bytes(f"{FAILED}{name}.error.txt", (error + "\n").encode(), content_type="text/plain")
    root.delete(INBOX + name)
    return {"name": name, "status": "failed", "error": error, "failed": f"{root.uri.rstrip('/')}/{FAILED}{name}"}


def _plan(
    root: Store, uri: str, name: str, stale_after: timedelta, max_bytes: int | None = None
) -> tuple[_Claim | None, bytes, dict]:
    """Claim ``inbox/<name>`` if it is ours to run. Returns (claim, bytes, summary); claim None means skip (or
    already finished, as the summary says). ``max_bytes``: a larger file is refused unread."""
    logger = get_run_logger()
    try:
        data = read(uri, max_bytes=max_bytes)
    except NotFound:
        return None, b"", {"name": name, "status": "skipped", "reason": "gone from the inbox"}
    except TooLarge:
        error = f"{uri}: refused by the policy: the file is more than the cap of {max_bytes} bytes (storyboard_bytes)"
        return None, b"", _refuse_unread(root, name, error)
    sha = hashlib.sha256(data).hexdigest()
    latest = _latest_claim(root, name, sha)
    attempt, run_id = 0, None
    if latest is not None:
        status = latest.record.get("status")
        if status == "running" and _manifest_written(latest.record):
            logger.info("%s: run %s finished but was not moved; moving it to done/", name, latest.record["run_id"])
            return None, data, _finish_done(latest, data, _result_of(latest))
        if status == "running" and not _claimant_gone(latest.record, stale_after):
            who = latest.record.get("child_flow_run_id") or latest.record.get("flow_run_id") or "another trigger"
            return None, data, {"name": name, "status": "skipped", "reason": f"being run by {who}"}
        if status in ("done", "failed") and not root.exists(INBOX + name):
            # The claimant moved it between our read and its status update (it deletes first, then updates).
            return None, data, {"name": name, "status": "skipped", "reason": f"just {status}"}
        attempt = latest.attempt + 1
        if status not in ("done", "failed"):  # taking over from a dead claimant: resume its run folder
            run_id = latest.record.get("run_id")
            logger.warning("%s: claimant of attempt %d is gone; taking over", name, latest.attempt)
    record = {
        "format": 1,
        "status": "running",
        "name": name,
        "sha256": sha,
        "uri": uri,
        "attempt": attempt,
        "run_id": run_id or kf.new_run_id(),
        "resume": bool(run_id),  # keep what the dead claimant wrote (verified) and render the rest
        "claimed_at": _now(),
        "flow_run_id": _flow_run_id(),
    }
    claim = _Claim(root, name, sha, attempt, record)
    if not create_once(root, claim.key, json.dumps(record, indent=2).encode()):
        return None, data, {"name": name, "status": "skipped", "reason": "claimed by another trigger"}
    return claim, data, {}


def _prepare(claim: _Claim, data: bytes, policy: Policy) -> None:
    """Validate the storyboard, check it against the policy (before anything it names is opened), and record where
    its manifest will be, so a later trigger can tell it finished."""
    uri = claim.record["uri"]
    board = load_storyboard(uri, text=decode_storyboard(data, uri))
    enforce(board, policy)
    output = board.output.resolved
    if claim.record["resume"] and not output_store(output).list(f"{board.slug}/{claim.record['run_id']}/"):
        claim.save(resume=False)  # the dead claimant wrote nothing: there is nothing to resume, start the run
    claim.save(output=output, manifest_key=f"{board.slug}/{claim.record['run_id']}/{kf.MANIFEST}",
               manifest=f"{output_store(output).uri.rstrip('/')}/{board.slug}/{claim.record['run_id']}/{kf.MANIFEST}")


def _wait_for(flow_run_id: str, poll_s: float) -> Any:
    from prefect import get_client

    with get_client(sync_client=True) as client:
        while True:
            run = client.read_flow_run(UUID(flow_run_id))
            if run.state and run.state.is_final():
                return run
            time.sleep(poll_s)


@flow(name="inbox", log_prints=True)
def inbox_flow(
    inbox: str = "s3://keyframes/storyboards",
    run: str = "subflow",
    deployment: str = "storyboard/storyboard",
    stale_after_minutes: float = 1440.0,
    poll_seconds: float = 10.0,
    policy: str | None = None,
) -> list[dict]:
    """Run every storyboard waiting in ``<inbox>/inbox/`` exactly once; move each to done/ or failed/.

    inbox: the inbox root, ``s3://bucket/prefix`` or a local folder. run: ``subflow`` (run the storyboard flow
    here, one file after another) or ``deployment`` (create a run of ``deployment`` per file, all at once, and
    wait for them). stale_after_minutes: a claim whose flow runs cannot be looked up is taken over after this
    long. poll_seconds: how often to check on deployment runs. policy: the operator's policy file on the worker
    (default ``$FASTIMAGIC_POLICY``; with neither, the safe default: see :mod:`fastimagic.policy`). Returns one
    summary per file seen.
    """
    if run not in RUN_MODES:
        raise ValueError(f"run must be one of {', '.join(RUN_MODES)}, got {run!r}")
    logger = get_run_logger()
    root = output_store(inbox)
    root.check()
    base = root.uri.rstrip("/")
    home = f"s3://{root.bucket}/" if isinstance(root, S3Store) else base
    rules = for_home(policy_from(policy), home)  # a broken policy file fails the trigger: the operator's to fix
    stale_after = timedelta(minutes=stale_after_minutes)
    results: list[dict] = []
    jobs: list[tuple[_Claim, bytes, Any]] = []
    for name in pending_storyboards(root):
        shown = printable(name)
        try:
            safe_key(INBOX + name)
        except StoreError:  # a TAB or other control character: not a key this store handles; leave it, go on
            logger.warning("%r: skipped: the name has a control character; rename it", name)
            results.append({"name": shown, "status": "skipped", "reason": "the name has a control character"})
            continue
        uri = f"{base}/{INBOX}{name}" if base.startswith("s3://") else str(Path(base, "inbox", name))
        try:
            claim, data, summary = _plan(root, uri, name, stale_after, rules.caps.storyboard_bytes)
        except FastImagicError as exc:  # this object only (unreadable, storage trouble); the rest still run
            logger.error("%s: skipped: %s", shown, printable(str(exc)))
            results.append({"name": shown, "status": "skipped", "reason": printable(str(exc))})
            continue
        if claim is None:
            logger.info("%s: %s", shown, summary.get("reason") or summary["status"])
            results.append(summary)
            continue
        logger.info("%s: claimed (attempt %d, run %s)", shown, claim.attempt, claim.record["run_id"])
        try:
            _prepare(claim, data, rules)
            params = {"storyboard": uri, "run_id": claim.record["run_id"], "policy": rules.model_dump()}
            if claim.record["resume"]:
                params["resume"] = True
            if run == "subflow":
                from flows.storyboard import storyboard_flow

                out = storyboard_flow(**params)
            else:
                from prefect.deployments import run_deployment

                child = run_deployment(
                    deployment,
                    parameters=params,
                    timeout=0,
                    idempotency_key=f"fastimagic-inbox/{claim.key}",
                )
                claim.save(child_flow_run_id=str(child.id), child_flow_run_name=child.name)
        except Exception as exc:  # the storyboard's own failure: record it beside the file, go on with the rest
            logger.error("%s: failed: %s", shown, printable(str(exc)), exc_info=not isinstance(exc, InputError))
            results.append(_finish_failed(claim, data, _one_line(exc)))
            continue
        if run == "subflow":
            results.append(_finish_done(claim, data, {**_result_of(claim), **out}))
        else:
            jobs.append((claim, data, child))
    for claim, data, child in jobs:
        finished = _wait_for(str(child.id), poll_seconds)
        if finished.state.is_completed() and _manifest_written(claim.record):
            results.append(_finish_done(claim, data, _result_of(claim)))
        else:
            message = (finished.state.message or "").strip().splitlines()
            logger.error("%s: flow run %s ended %s: %s", printable(claim.name), finished.name, finished.state.name,
                         printable(message[0]) if message else "")
            # The state's message may name the worker's files: the uploader gets the outcome, the logs the reason.
            error = (f"flow run {finished.name} ended {finished.state.name}; the operator can see why in its logs")
            results.append(_finish_failed(claim, data, error))
    return results
