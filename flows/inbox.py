"""The inbox flow: storyboards dropped into a folder or bucket prefix are run, each exactly once.

Layout under the inbox root (``s3://bucket/prefix`` or a local folder)::

    <inbox>/inbox/<name>.yaml                 drop storyboards here (.yaml or .yml, directly in inbox/)
    <inbox>/runs/<name>-<sha256>.json         the flow run running this content, and how it ended
    <inbox>/done/<run-id>-<name>              the storyboard as run, and beside it
    <inbox>/done/<run-id>-<name>.result.json  run id, manifest URI, flow run id
    <inbox>/failed/<name>, <name>.error.txt   a storyboard that failed, and why

Exactly once rests on Prefect, not on the storage: each storyboard object version (name + SHA-256 of its bytes,
and an attempt number) gets one storyboard flow run created with that as its **idempotency key**; the Prefect
server returns the existing run to anyone asking again, so however many triggers race, one of them (the one whose
proposed ``run_id`` the run carries) owns it and writes its record under runs/. Nobody else writes that record,
so no conditional writes are needed. The ``inbox`` deployment also has a concurrency limit of 1 with the
CANCEL_NEW collision strategy (deploy/prefect.yaml): a scheduled trigger that finds the previous one still running
is cancelled rather than queued.

``run``: ``subflow`` runs the storyboard flow run here, in this process (the file is moved when it ends);
``deployment`` creates the run on the ``deployment`` and returns at once: a later trigger moves the file to done/
or failed/ once that run is final. A trigger that finds a record still "running" looks at its flow run:

- the manifest exists: the run finished; the file is moved to done/ (nothing runs again);
- the run ended Failed or Cancelled: the file goes to failed/ (the reason is in the run's logs, not in the error);
- it ended otherwise without a manifest (Crashed, or its runner died): the next attempt (a new idempotency key,
  the same ``run_id``, ``resume=True``) keeps the keyframes already written and intact and renders the rest;
- it is not final, or cannot be looked up: it is left alone.

A record that is done or failed while its file is in the inbox again means the same bytes were uploaded again:
that is a new request and runs as a new attempt.

Whoever can upload to the inbox is not trusted: every storyboard is checked against the operator's policy
(:mod:`fastimagic.policy`: ``$FASTIMAGIC_POLICY`` in this process's environment, else the safe default, which
allows references and outputs only under the inbox's own bucket, or the inbox folder for a local inbox) before a
run is created; no policy is taken from a parameter. The storyboard flow checks again on the text it runs: a
subflow here with the same rules, a deployment's run with its own worker's policy. The error beside a failed
storyboard says what the policy or the schema refused; a failure on the worker is reported without its details
(they are in the flow run's logs). Each object is handled on its own: a bad name or a file that cannot be read
fails alone and the others still run.

Storyboards are loaded under their inbox URI, so relative paths in them (``reference``, ``output``) resolve against
the ``inbox/`` folder; absolute ``s3://`` URIs are the robust choice.
"""

from __future__ import annotations

import hashlib
import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any
from uuid import UUID

from prefect import flow, get_run_logger

from fastimagic import keyframes as kf
from fastimagic.config import printable
from fastimagic.errors import FastImagicError, InputError
from fastimagic.policy import Policy, enforce, for_home, handed, policy_from
from fastimagic.store import NotFound, S3Store, Store, StoreError, TooLarge, safe_key
from fastimagic.storyboard_yaml import decode_storyboard, load_storyboard
from tasks.storage import output_store, read

INBOX, RUNS, DONE, FAILED = "inbox/", "runs/", "done/", "failed/"
RUN_MODES = ("subflow", "deployment")


def _one_line(exc: BaseException) -> str:
    """The error as the uploader may read it (it is written beside their file). What they wrote wrong (schema and
    policy problems, a missing or broken image in an allowed place) is said as written, one problem per line, with
    control characters escaped; any other failure on the worker only as its kind, since its text may name the
    worker's files: the details are in the flow run's logs."""
    if isinstance(exc, (InputError, NotFound)):
        return "\n".join(printable(line) for line in str(exc).strip().splitlines())
    return f"the run failed on the worker ({type(exc).__name__}); the operator can see why in the flow run's logs"


def pending_storyboards(root: Store) -> list[str]:
    """Names of the ``.yaml`` / ``.yml`` files directly in ``<root>/inbox/``, sorted."""
    names = [k[len(INBOX):] for k in root.list(INBOX)]
    return [n for n in names if "/" not in n and n.lower().endswith((".yaml", ".yml"))]


def _state(flow_run_id: str | None) -> Any:
    """The flow run's state; None if there is none or it cannot be looked up (another server, deleted)."""
    from prefect import get_client

    try:
        with get_client(sync_client=True) as client:
            return client.read_flow_run(UUID(flow_run_id)).state
    except Exception:  # noqa: BLE001 - unknown is an answer here
        return None


def _keyed_run(key: str, params: dict, run: str, deployment: str) -> Any:
    """Create the storyboard flow run with idempotency key ``key``, or get the one created with it before."""
    if run == "deployment":
        from prefect.deployments import run_deployment

        return run_deployment(deployment, parameters=params, timeout=0, idempotency_key=key)
    from prefect import get_client
    from prefect.client.schemas.actions import FlowRunCreate
    from prefect.client.schemas.objects import Flow, FlowRun
    from prefect.states import Pending, to_state_create

    import flows.storyboard as sb

    with get_client(sync_client=True) as client:
        made = client.request("POST", "/flows/", json={"name": sb.storyboard_flow.name})
        flow_id = Flow.model_validate(made.json()).id
        body = FlowRunCreate(flow_id=flow_id, parameters=params, idempotency_key=key, state=to_state_create(Pending()))
        return FlowRun.model_validate(client.request("POST", "/flow_runs/", json=body.model_dump(mode="json")).json())


def _manifest_written(record: dict[str, Any]) -> bool:
    try:
        return bool(record.get("manifest_key")) and output_store(record["output"]).exists(record["manifest_key"])
    except FastImagicError:
        return False


def _finish(root: Store, record: dict[str, Any], data: bytes | None, error: str | None = None) -> dict[str, Any]:
    """Move ``inbox/<name>`` to done/ (with its result) or failed/ (with the error), then mark the record.
    ``data`` None: the file was refused unread; it is removed, not copied."""
    name, base = record["name"], root.uri.rstrip("/")
    result = {k: record.get(k) for k in ("name", "run_id", "manifest", "flow_run_id", "attempt", "sha256")}
    result["storyboard"] = record.get("uri")
    if error is None:
        where = f"{DONE}{record['run_id']}-{name}"
        root.put_bytes(where, data, content_type="application/yaml")
        root.put_bytes(f"{where}.result.json", json.dumps(result, indent=2).encode())
    else:
        where = f"{FAILED}{name}"
        if data is not None:
            root.put_bytes(where, data, content_type="application/yaml")
        root.put_bytes(f"{where}.error.txt", (error + "\n").encode(), content_type="text/plain")
    try:  # delete the file unless it was replaced by different content meanwhile (a new upload stays)
        if data is None or hashlib.sha256(root.get_bytes(INBOX + name)).hexdigest() == record["sha256"]:
            root.delete(INBOX + name)
    except NotFound:
        pass
    status = "done" if error is None else "failed"
    if record.get("sha256"):
        record.update(status=status, error=error, finished_at=datetime.now(timezone.utc).isoformat())
        root.put_bytes(f"{RUNS}{name}-{record['sha256']}.json", json.dumps(record, indent=2).encode())
    return {**result, "status": status, "error": error, status: f"{base}/{where}"}


def _handle(root: Store, uri: str, name: str, rules: Policy, run: str, deployment: str) -> dict[str, Any]:
    """Run, submit, finish or skip ``inbox/<name>``; returns its summary."""
    logger = get_run_logger()
    try:
        data = read(uri, max_bytes=rules.caps.storyboard_bytes)
    except NotFound:
        return {"name": name, "status": "skipped", "reason": "gone from the inbox"}
    except TooLarge:
        error = (f"{uri}: refused by the policy: the file is more than the cap of {rules.caps.storyboard_bytes} "
                 "bytes (storyboard_bytes)")
        return _finish(root, {"name": name, "uri": uri}, None, error)
    sha = hashlib.sha256(data).hexdigest()
    try:
        old = json.loads(root.get_bytes(f"{RUNS}{name}-{sha}.json"))
    except (NotFound, ValueError):
        old = None
    record = {"format": 2, "name": name, "sha256": sha, "uri": uri, "attempt": 0, "run_id": kf.new_run_id(),
              "resume": False}
    if old and old.get("status") in ("done", "failed"):
        if not root.exists(INBOX + name):  # its owner moved it between our read and now
            return {"name": name, "status": "skipped", "reason": f"just {old['status']}"}
        record["attempt"] = old.get("attempt", 0) + 1  # the same bytes uploaded again: a new request
    elif old:
        if _manifest_written(old):
            logger.info("%s: run %s finished; moving it to done/", printable(name), old.get("run_id"))
            return _finish(root, {**record, **old}, data)
        state = _state(old.get("flow_run_id"))
        if state is None or not state.is_final():
            who = old.get("flow_run_name") or old.get("flow_run_id") or "another trigger"
            return {"name": name, "status": "skipped", "reason": f"being run by {who}"}
        if state.is_failed() or state.is_cancelled():
            logger.error("%s: flow run %s ended %s: %s", printable(name), old.get("flow_run_id"), state.name,
                         printable((state.message or "").strip()[:500]))
            error = f"flow run {old.get('flow_run_name') or old.get('flow_run_id')} ended {state.name}; " \
                    "the operator can see why in its logs"  # its message may name the worker's files
            return _finish(root, {**record, **old}, data, error)
        logger.warning("%s: flow run of attempt %s ended %s without a manifest; taking over", printable(name),
                       old.get("attempt"), state.name)
        record.update(attempt=old.get("attempt", 0) + 1, run_id=old["run_id"], resume=True)
    try:  # the schema and the policy, before anything the storyboard names is opened
        board = load_storyboard(uri, text=decode_storyboard(data, uri), caps=rules.caps)  # caps before expansion
        enforce(board, rules)
        out = output_store(board.output.resolved)
        folder = f"{board.slug}/{record['run_id']}/"
        if record["resume"] and not out.list(folder):
            record["resume"] = False  # the dead run wrote nothing: there is nothing to resume
    except Exception as exc:
        logger.error("%s: failed: %s", printable(name), printable(str(exc)), exc_info=not isinstance(exc, InputError))
        return _finish(root, record, data, _one_line(exc))
    record.update(output=board.output.resolved, manifest_key=folder + kf.MANIFEST,
                  manifest=f"{out.uri.rstrip('/')}/{folder}{kf.MANIFEST}")
    params = {"storyboard": uri, "run_id": record["run_id"]}  # plain data; no policy: the worker has its own
    if record["resume"]:
        params["resume"] = True
    child = _keyed_run(f"fastimagic-inbox:{root.uri.rstrip('/')}/{INBOX}{name}@{sha}#{record['attempt']}", params,
                       run, deployment)
    if (child.parameters or {}).get("run_id") != record["run_id"]:  # another trigger created it: theirs to run
        return {"name": name, "status": "skipped", "reason": f"being run by {child.name}"}
    record.update(status="running", flow_run_id=str(child.id), flow_run_name=child.name)
    root.put_bytes(f"{RUNS}{name}-{sha}.json", json.dumps(record, indent=2).encode())
    logger.info("%s: attempt %d, run %s, flow run %s", printable(name), record["attempt"], record["run_id"], child.name)
    if run == "deployment":
        return {k: record[k] for k in ("name", "run_id", "flow_run_id", "attempt")} | {"status": "submitted"}
    from prefect.flow_engine import run_flow

    import flows.storyboard as sb

    try:
        with handed(rules):  # in this process: the flow obeys the rules just checked
            run_flow(sb.storyboard_flow, flow_run=child, parameters=params)
    except Exception as exc:  # the storyboard's own failure: recorded beside the file
        logger.error("%s: failed: %s", printable(name), printable(str(exc)), exc_info=not isinstance(exc, InputError))
        return _finish(root, record, data, _one_line(exc))
    return _finish(root, record, data)


@flow(name="inbox", log_prints=True)
def inbox_flow(
    inbox: str = "s3://keyframes/storyboards",
    run: str = "subflow",
    deployment: str = "storyboard/storyboard",
) -> list[dict]:
    """Run every storyboard waiting in ``<inbox>/inbox/`` exactly once; move each to done/ or failed/.

    inbox: the inbox root, ``s3://bucket/prefix`` or a local folder. run: ``subflow`` (run each storyboard here,
    one after another) or ``deployment`` (create a run of ``deployment`` per file; a later trigger moves the file
    once its run is final). The operator's policy is ``$FASTIMAGIC_POLICY`` on this worker, else the safe default
    (see :mod:`fastimagic.policy`), never a parameter. Returns one summary per file seen.
    """
    if run not in RUN_MODES:
        raise ValueError(f"run must be one of {', '.join(RUN_MODES)}, got {run!r}")
    logger = get_run_logger()
    root = output_store(inbox)
    root.check()
    base = root.uri.rstrip("/")
    home = f"s3://{root.bucket}/" if isinstance(root, S3Store) else base
    rules = for_home(policy_from(None), home)  # a broken policy file fails the trigger: the operator's to fix
    results: list[dict] = []
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
            results.append(_handle(root, uri, name, rules, run, deployment))
        except FastImagicError as exc:  # this object only (storage trouble); the rest still run
            logger.error("%s: skipped: %s", shown, printable(str(exc)))
            results.append({"name": shown, "status": "skipped", "reason": printable(str(exc))})
            continue
        logger.info("%s: %s", shown, results[-1].get("reason") or results[-1]["status"])
    return results
