"""Warm GPU workers: the fine-tune and every render run as Prefect background tasks on long-lived task workers.

A worker (``fastimagic worker``, one per GPU, ``CUDA_VISIBLE_DEVICES`` picks the GPU) is one Python process that
serves the GPU tasks of :mod:`tasks.pipeline` (:data:`GPU_TASKS`) one at a time on its device (the next render
starts while the last one's keyframes are written), for as long as it lives: imports,
the base model (:func:`fastimagic.models.cached_base_model`, LRU by count) and recent tunings
(:func:`tasks.pipeline.load_tuning`, LRU by bytes) are paid for once per worker, not once per scene or storyboard.

The :class:`Warm` backend of :func:`flows.run.run_storyboard` submits those same tasks with ``.delay()`` (the
in-process backend calls them directly: one code path) and waits for them with a lease:

* parameters and results travel through the result-storage block named by ``PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK``
  (an S3/MinIO bucket), so a worker on any machine can take the work; a worker or submitter without it refuses at
  once, naming the setting;
* they are plain JSON both ways (:mod:`tasks.params`: the storyboard's text and URI, ids, keys, numbers), and each
  side reads them with the standard library's JSON parser only (:func:`plain_record`): a Prefect record names its
  own serializer (pickle, or JSON with any importable decoder), so Prefect's own reader would run whatever the
  record's writer chose. A record that is not plain JSON is refused unread. The worker then validates the
  storyboard itself and checks it against its own operator's policy (``$FASTIMAGIC_POLICY``, else the safe
  default), whatever the submitter checked;
* a task run that has been running longer than its lease (:class:`Lease`, from the work's size and the speed
  measured so far) belongs to a worker presumed dead (a killed task worker leaves its run Running for ever), and so
  does one still Scheduled a lease floor after a run submitted later has started (a worker took it and died before
  starting it; the queue is first in, first out): it is marked Crashed and submitted again, after checking whether
  its keyframes were written and verify intact (:func:`tasks.pipeline.stored_intact`, every (scene, seed) of the
  unit); a render rewrites its unit (a scene's seeds) under the same names, so a retry never leaves a gap or a
  duplicate;
* a task that fails (a model no worker can load, say) fails the run with the worker's reason;
* a task waiting while no worker serving it is connected to the server at all (none started, or all gone) is
  cancelled after ``$FASTIMAGIC_WORKER_WAIT_SECONDS`` (default 300: time for an autoscaler to start one) and the
  run fails with one line saying so; a warning says it at once. Busy workers are waited for as long as it takes.

A worker acknowledges a task run only when its device is free for the next (:class:`IdleTaskWorker`), so the server
never hands a busy worker the next run: it stays queued for whichever worker is free, and a worker that dies holding
a run has it put back in the queue by the server (another worker renders that unit again: same names, same bytes).

No ``gpu`` tag limit is needed on this path: each worker has one task at a time on its device (:class:`IdleTaskWorker`),
and there is one worker per GPU, so a GPU never runs two tasks. The tag limit made every GPU task ask the server for a
slot (a 423 answer means waiting its Retry-After, ~2 s, even when a slot frees sooner).
"""

from __future__ import annotations

import contextvars
import json
import logging
import os
import threading
import time
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from prefect import get_run_logger

from fastimagic import progress
from fastimagic.config import printable
from fastimagic.errors import FastImagicError, InputError
from fastimagic.manifests import KeyframeRecord, Reference, SceneSummary, SourcePrompt, TuningRef
from fastimagic.policy import POLICY_ENV, operator_policy
from fastimagic.store import StoreError
from fastimagic.storyboard import Scene, Storyboard
from flows.run import render_scenes
from tasks.params import caption_params, finetune_params, render_params
from tasks.pipeline import caption_reference, finetune_once, render_keyframes, stored_intact, units_writing

GPU_TASKS = (caption_reference, finetune_once, render_keyframes)
STORAGE_SETTING = "PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK"
SCHEDULING_SETTING = "PREFECT_TASKS_SCHEDULING_DEFAULT_STORAGE_BLOCK"
# Scenes waiting on workers at once (each a thread that mostly sleeps); more scenes queue behind them.
SCENE_THREADS = 16
ATTEMPTS = 3  # submissions of one unit of work before the run gives up on it
WORKER_WAIT_SETTING = "FASTIMAGIC_WORKER_WAIT_SECONDS"
WORKER_CHECK_SECONDS = 5.0  # how often a waiting unit asks the server whether any worker serves its task


# The tasks as they travel: parameters and results as JSON, never pickle (the served and the submitted copy agree).
WIRE = {t.task_key: t.with_options(result_serializer="json") for t in GPU_TASKS}
PLAIN_MAX_BYTES = 64 * 2**20  # a parameter or result record larger than this is refused unread
RESULT_WAIT_SECONDS = 30.0  # how long a finished run's result record may lag its state


class NotPlain(FastImagicError):
    """A parameter or result record that is not plain JSON: refused, nothing in it was run or decoded."""


def plain_record(raw: bytes, what: str) -> Any:
    """The value in a Prefect result record (``{"metadata": ..., "result": "<json>"}``) when it is plain JSON,
    parsed with the standard library only: no pickle, no decoder or JSON library the record names. Anything else
    raises :class:`NotPlain`."""
    if not isinstance(raw, (bytes, bytearray)) or len(raw) > PLAIN_MAX_BYTES:
        raise NotPlain(f"{what}: refused: not a record of at most {PLAIN_MAX_BYTES} bytes")
    try:
        record = json.loads(raw)
    except ValueError:
        raise NotPlain(f"{what}: refused: not a JSON record") from None
    metadata = record.get("metadata") if isinstance(record, dict) else None
    serializer = metadata.get("serializer") if isinstance(metadata, dict) else None
    kind = serializer.get("type") if isinstance(serializer, dict) else None
    if kind != "json" or not isinstance(record.get("result"), str):
        raise NotPlain(f"{what}: refused unread: serialized as {printable(str(kind))[:40]!r}, not plain JSON")
    try:
        return json.loads(record["result"])
    except (ValueError, RecursionError):
        raise NotPlain(f"{what}: refused: the value is not JSON") from None


async def read_plain_parameters(store, identifier) -> dict[str, Any]:
    """The worker's reader of a background task run's parameters (replaces Prefect's ``read_parameters``, which
    deserializes with whatever serializer the record names): plain JSON only; the submitter's context (its
    settings, tags) and ``wait_for`` are not taken."""
    from prefect._internal.compatibility.blocks import call_explicitly_async_block_method

    where = f"parameters/{identifier}"
    raw = await call_explicitly_async_block_method(store.result_storage, "read_path", (where,), {})
    try:
        data = plain_record(raw, where)
        if not isinstance(data, dict) or not isinstance(data.get("parameters", {}), dict) or data.get("wait_for"):
            raise NotPlain(f"{where}: refused: not {{parameters: {{...}}}}")
    except NotPlain as e:
        logging.getLogger("fastimagic.worker").error("task run parameters %s", e)
        raise
    return {"parameters": data.get("parameters", {})}


def storage_block() -> str:
    """The shared result-storage block (``s3-bucket/<name>``), or :class:`InputError` naming the setting."""
    block = os.environ.get(STORAGE_SETTING)
    if not block:
        raise InputError(
            f"{STORAGE_SETTING} is not set: warm workers and their submitters share parameters and results through"
            " a result-storage block (e.g. s3-bucket/fastimagic-results); see deploy/README.md"
        )
    os.environ.setdefault(SCHEDULING_SETTING, block)  # parameters travel the same way as results
    return block


def check_shared_storage() -> str:
    """Load the shared storage block and write and read a probe object. Returns the block's name.

    Raises :class:`InputError` when the setting is missing, :class:`StoreError` when the block is missing or its
    storage cannot be reached (both one line)."""
    name = storage_block()
    from prefect.blocks.core import Block
    from prefect.settings import temporary_settings

    try:
        block = Block.load(name)
    except Exception as e:
        raise StoreError(f"{STORAGE_SETTING}={name}: no such block ({type(e).__name__})") from None
    probe = f"fastimagic-probe/{uuid.uuid4().hex}"
    try:
        with temporary_settings(updates={"tasks.scheduling.default_storage_block": name}):
            block.write_path(probe, b"ok")
            block.read_path(probe)
    except Exception as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise StoreError(f"{STORAGE_SETTING}={name}: shared storage unreachable: {first}") from None
    return name


# -- the worker ----------------------------------------------------------------------------------------------------


def may_take_next(in_flight: int, writing: int, slots: int) -> bool:
    """Whether a worker with ``slots`` device slots (one per GPU) takes its next task run now: fewer than ``slots``
    of its ``in_flight`` runs are at their device work (a render writing its keyframes has left it: ``writing``,
    :data:`tasks.pipeline.units_writing`), and no more than ``slots`` write behind (bounded memory: a unit's images
    wait in memory until written). So the GPU renders the next unit while the last one is encoded and stored."""
    return in_flight - writing < slots and in_flight < 2 * slots


def _idle_task_worker():
    from prefect.client.subscriptions import Subscription
    from prefect.settings import get_current_settings
    from prefect.task_worker import TaskWorker

    class HeldSubscription(Subscription):
        """Receives a task run without acknowledging it; :meth:`acknowledge` does, when the worker is free for the
        next. The server sends a subscriber its next run only after the previous one is acknowledged, and puts an
        unacknowledged run back in its queue when the subscriber disconnects."""

        async def receive(self):
            import anyio
            import websockets.exceptions

            while True:
                try:
                    await self._ensure_connected()
                    websocket = self.websocket
                    return self.model.model_validate_json(await websocket.recv()), websocket
                except (ConnectionRefusedError, websockets.exceptions.ConnectionClosedError):
                    self._websocket = None
                    if hasattr(self._connect, "protocol"):
                        await self._connect.__aexit__(None, None, None)
                    await anyio.sleep(0.5)

        async def acknowledge(self, websocket) -> None:
            import websockets.exceptions

            if websocket is not self._websocket:
                return  # reconnected since: the server has put that run back in its queue
            try:
                await websocket.send('{"type": "ack"}')
            except websockets.exceptions.ConnectionClosed:
                pass  # the next receive reconnects

    class IdleTaskWorker(TaskWorker):
        """A task worker that takes the next task run only when its device is free (:func:`may_take_next`).

        Prefect's own worker acknowledges each task run as soon as it arrives, and the server then sends it the next
        one at once, even while it is busy: a busy worker holds work an idle one could run (with a few large units,
        one worker may hold them all while the other idles), and loses it if it dies (the server re-queues only runs
        not yet acknowledged). This worker acknowledges a run only when its device is free for the next: until then
        the server keeps the next run in its queue for whichever worker is free, and if this worker dies first, the
        server puts the run back (another worker then runs it; a render rewrites its unit under the same names). A
        render that has left the device to write its keyframes is acknowledged then; if the worker dies while it
        writes, the submitter's lease (:class:`Lease`) gives the unit to another worker.
        """

        def __init__(self, *tasks, limit: int = 1):
            super().__init__(*tasks, limit=2 * limit)  # runs in flight: `limit` on the device, as many writing
            self.slots = limit

        def _free_for_next(self) -> bool:
            return may_take_next(self._limiter.borrowed_tokens, units_writing(), self.slots)

        async def _subscribe_to_task_scheduling(self):
            import anyio

            subscription = HeldSubscription(
                model=self._task_run_model(),
                path="/task_runs/subscriptions/scheduled",
                keys=self.task_keys,
                client_id=self.client_id,
                base_url=get_current_settings().api.url,
            )
            held = None  # the connection the last run came on, until that run is acknowledged
            while True:
                while not self._free_for_next():
                    await anyio.sleep(0.02)
                if held is not None:
                    await subscription.acknowledge(held)
                task_run, held = await subscription.receive()
                logging.getLogger("fastimagic.worker").info("took task run %s", task_run.name)
                if await self._acquire_token(task_run.id):
                    self._runs_task_group.start_soon(self._safe_submit_scheduled_task_run, task_run)

        @staticmethod
        def _task_run_model():
            from prefect.client.schemas.objects import TaskRun

            return TaskRun

    return IdleTaskWorker


def serve(limit: int = 1) -> None:
    """Serve :data:`GPU_TASKS` here until stopped, ``limit`` at a time (1: one worker per GPU), after paying the
    cold start (:func:`tasks.pipeline.warm_worker`; ``$FASTIMAGIC_WORKER_MODEL`` names the model to keep warm).

    Refuses to start without the shared storage (:func:`check_shared_storage`) or a Prefect server
    (``PREFECT_API_URL``: background tasks do not work with Prefect's throw-away local server)."""
    from prefect.settings import PREFECT_API_URL

    block = storage_block()
    if not PREFECT_API_URL.value():
        raise InputError("PREFECT_API_URL is not set: a worker takes its work from a Prefect server")
    check_shared_storage()
    from tasks.pipeline import WORKER_MODEL_SETTING, warm_worker

    started = time.perf_counter()
    warm_worker(os.environ.get(WORKER_MODEL_SETTING) or None)  # the cold start, before any work is taken
    logging.getLogger("fastimagic.worker").info("warmed up in %.1f s", time.perf_counter() - started)
    import asyncio
    import faulthandler
    import signal

    faulthandler.register(signal.SIGUSR1)  # `kill -USR1 <pid>`: every thread's stack on stderr, to see a stuck worker
    names = ", ".join(t.name for t in GPU_TASKS)
    logging.getLogger("fastimagic.worker").info("serving %s, %s at a time; results in %s", names, limit, block)

    from prefect.settings import temporary_settings

    async def run() -> None:
        await _idle_task_worker()(*WIRE.values(), limit=limit).astart()  # built inside the loop, as Prefect requires

    import prefect.task_worker

    # Parameters are read as plain JSON only (see the module docstring): the one reader Prefect's worker calls.
    prefect.task_worker.read_parameters = read_plain_parameters
    rules = operator_policy(for_others=True)  # a broken policy file stops the worker here, not at its first task
    logging.getLogger("fastimagic.worker").info(
        "policy: %s", rules.source or f"the safe default (no ${POLICY_ENV}): each storyboard's own bucket, tiny and"
        " hub models, no pickle")

    from prefect.task_worker import StopTaskWorker

    stops = (KeyboardInterrupt, asyncio.CancelledError, StopTaskWorker)  # SIGTERM / Ctrl-C: a clean stop
    with temporary_settings(updates={"tasks.scheduling.default_storage_block": block}):
        try:
            asyncio.run(run())
        except BaseException as e:  # alone, or in an exception group from the worker's task group
            if not all(isinstance(inner, stops) for inner in getattr(e, "exceptions", (e,))):
                raise


# -- the submitter -------------------------------------------------------------------------------------------------


_RESULT_TYPES = {
    "fastimagic.manifests.TuningRef": TuningRef.from_dict,
    "fastimagic.manifests.SourcePrompt": lambda d: SourcePrompt(d["source_prompt"], d.get("caption"),
                                                                d.get("captioner")),
}


def _typed(value: Any) -> Any:
    """A task's JSON value as the flow uses it: the two records Prefect's encoder tags with their class are built
    again from their fields (only these two: no other class named in a result is imported); the rest is data."""
    if isinstance(value, dict) and "__class__" in value:
        make = _RESULT_TYPES.get(value["__class__"])
        if make is None or not isinstance(value.get("data"), dict):
            raise NotPlain(f"a result names {printable(str(value['__class__']))[:80]!r}: not a fastimagic result")
        return make(value["data"])
    return value


def _exception(name: str, value: Any) -> Exception:
    """The exception a failed task run recorded (``{"__exc_type__": ..., "message": ...}``), as fastimagic's own
    class when it is one of :mod:`fastimagic.errors` (exit 2 stays exit 2), else a :class:`FastImagicError`."""
    from fastimagic import errors, policy, store, storyboard_yaml
    from tasks import params

    kind = value.get("__exc_type__", "") if isinstance(value, dict) else ""
    message = value.get("message", "") if isinstance(value, dict) else ""
    module, _, cls = str(kind).rpartition(".")
    known = {m.__name__: m for m in (errors, policy, storyboard_yaml, store, params)}
    found = getattr(known.get(module), cls, None)
    if isinstance(found, type) and issubclass(found, FastImagicError):
        try:  # the classes that list problems take them one a line
            problems = "problems" in found.__init__.__code__.co_varnames
            return found(str(message).splitlines() if problems else str(message))
        except Exception:  # noqa: BLE001 - a class that takes other arguments: the message still says why
            pass
    return FastImagicError(f"{name}: {printable(str(message)) or 'failed on the worker'}")


@dataclass
class Lease:
    """How long a task run may stay Running before its worker is presumed dead and the work is submitted again.

    ``floor_seconds`` (default 120, ``$FASTIMAGIC_LEASE_FLOOR_SECONDS``) covers a cold worker's model load and
    tuning fetch; on top, ``factor`` times the work's size in denoising steps times the slowest seconds per step
    measured so far in this run (before any measurement, ``$FASTIMAGIC_SECONDS_PER_STEP``, default 1 s, slower
    than any GPU)."""

    floor_seconds: float = field(default_factory=lambda: float(os.environ.get("FASTIMAGIC_LEASE_FLOOR_SECONDS", 120)))
    factor: float = 3.0
    seconds_per_step: float = field(default_factory=lambda: float(os.environ.get("FASTIMAGIC_SECONDS_PER_STEP", 1)))
    measured: float | None = None

    def seconds(self, steps: int) -> float:
        return self.floor_seconds + self.factor * steps * (self.measured or self.seconds_per_step)

    def observe(self, steps: int, seconds: float) -> None:
        if steps > 0:
            self.measured = max(self.measured or 0.0, seconds / steps)


def connected_workers(task) -> int:
    """How many task workers serving ``task`` are connected to the Prefect server now."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        answer = client.request(
            "POST", "/task_workers/filter", json={"task_worker_filter": {"task_keys": [task.task_key]}}
        )
        answer.raise_for_status()
        return len(answer.json())


class _NoWorker:
    """Tracks how long a waiting unit has had no connected worker to run it."""

    def __init__(self, task):
        self.task = task
        self.wait_seconds = float(os.environ.get(WORKER_WAIT_SETTING) or 300)
        self.checked = 0.0
        self.since: float | None = None
        self.warned = False

    def expired(self, logger) -> bool:
        """Check (every :data:`WORKER_CHECK_SECONDS`) whether a worker is connected; True once none has been for
        ``wait_seconds``. Warns once, at the first check that finds none."""
        now = time.monotonic()
        if now - self.checked < WORKER_CHECK_SECONDS:
            return self.since is not None and now - self.since > self.wait_seconds
        self.checked = now
        if connected_workers(self.task):
            self.since = None
            return False
        if self.since is None:
            self.since = now
            if not self.warned:
                self.warned = True
                logger.warning(
                    "no fastimagic worker serving %s is connected; waiting up to %.0f s for one (start one with"
                    " `fastimagic worker`; %s sets the wait)", self.task.name, self.wait_seconds, WORKER_WAIT_SETTING
                )
        return now - self.since > self.wait_seconds


class _Runs:
    """The latest task run of every submitted unit, one API call for all of them per poll."""

    def __init__(self, poll_seconds: float = 0.25):
        self.poll_seconds = poll_seconds
        self.ids: set = set()
        self.seen: dict = {}
        self.lock = threading.Lock()
        self.at = 0.0
        # the creation time of the newest run seen started: a run still Scheduled that is older was passed over
        # (the queue is first in, first out), which happens when a worker took it and died before starting it
        self.started_up_to = None

    def add(self, task_run_id) -> None:
        with self.lock:
            self.ids.add(task_run_id)

    def forget(self, task_run_id) -> None:
        with self.lock:
            self.ids.discard(task_run_id)
            self.seen.pop(task_run_id, None)

    def get(self, task_run_id):
        from prefect.client.orchestration import get_client
        from prefect.client.schemas.filters import TaskRunFilter, TaskRunFilterId

        with self.lock:
            if time.monotonic() - self.at >= self.poll_seconds and self.ids:
                with get_client(sync_client=True) as client:
                    runs = client.read_task_runs(task_run_filter=TaskRunFilter(id=TaskRunFilterId(any_=list(self.ids))))
                self.seen.update({r.id: r for r in runs})
                for r in runs:
                    if r.state is not None and not r.state.is_scheduled():
                        self.started_up_to = max(self.started_up_to or r.created, r.created)
                self.at = time.monotonic()
            return self.seen.get(task_run_id)


def _all_written(
    scene: Scene, seeds: list[int], output: str, run_prefix: str, strategies: tuple[str, ...]
) -> list[KeyframeRecord] | None:
    """The records of every (scene, seed) of a unit when all are stored intact, else None."""
    records = []
    for seed in seeds:
        done = stored_intact(scene, seed, output, run_prefix, strategies)
        if done is None:
            return None
        records += done
    return records


class Warm:
    """Tune and render on warm GPU workers (background tasks; see the module docstring)."""

    def __init__(self, lease: Lease | None = None):
        self.block = check_shared_storage()  # before anything is submitted: one line, nothing waits on lost work
        self.storage = None  # the block, loaded at the first result
        self.lease = lease or Lease()
        self.runs = _Runs()
        # one thread per unit of work in flight, each mostly asleep waiting for its task run
        self.waiting = ThreadPoolExecutor(max_workers=4 * SCENE_THREADS, thread_name_prefix="fastimagic-wait")

    def run(self, task, args: tuple, steps: int, done=None):
        """Submit ``task(*args)`` to the workers and return its result, submitting again (at most
        :data:`ATTEMPTS` times) when its worker dies. ``steps``: the work's size in denoising steps (the lease).
        ``done()``: before a resubmission, the result if the lost run finished its work after all, else None."""
        from prefect.settings import temporary_settings

        logger = get_run_logger()
        for attempt in range(1, ATTEMPTS + 1):
            def submit():
                # parameters go to the shared storage, where workers read them (this process's settings were read
                # before the block was known)
                with temporary_settings(updates={"tasks.scheduling.default_storage_block": self.block}):
                    return WIRE[task.task_key].delay(*args)  # plain data (tasks.params), stored as JSON

            # From an empty context: Prefect ships the caller's flow-run context with the parameters, and a flow
            # loaded from a deployment's entrypoint lives in a module no worker can import. The task runs are
            # therefore not linked to the storyboard's flow run in the UI; their names say what they are.
            future = contextvars.Context().run(submit)
            run_id = future.task_run_id
            self.runs.add(run_id)
            running_since = passed_over_since = None
            unserved = _NoWorker(task)
            try:
                while True:
                    time.sleep(self.runs.poll_seconds)
                    run = self.runs.get(run_id)
                    state = run.state if run else None
                    if state is None:
                        continue
                    if state.is_scheduled():
                        passed_over = self.runs.started_up_to is not None and self.runs.started_up_to > run.created
                        if passed_over:  # taken by a worker that died before it started, or one still busy
                            passed_over_since = passed_over_since or time.monotonic()
                            if time.monotonic() - passed_over_since > self.lease.floor_seconds:
                                reason = "was taken by a worker that never started it: worker presumed dead"
                                self._crash(run_id, reason)
                                break
                        elif unserved.expired(logger):
                            self._end(run_id, "Cancelled", "no worker connected to run it")
                            raise FastImagicError(
                                f"{run.name}: no fastimagic worker connected to the Prefect server for"
                                f" {unserved.wait_seconds:.0f} s; start one with `fastimagic worker` (one per GPU),"
                                " then run again"
                            )
                        continue
                    if state.is_completed():
                        if run.start_time and run.end_time:
                            self.lease.observe(steps, (run.end_time - run.start_time).total_seconds())
                        return self._result(run.name, state)
                    if state.is_failed():
                        return self._result(run.name, state)  # raises the reason the task failed
                    if state.is_final():  # crashed or cancelled: the worker went away cleanly enough to say so
                        reason = f"ended {state.name}"
                        break
                    running_since = running_since or time.monotonic()  # pending or running on a worker
                    lease = self.lease.seconds(steps)
                    if time.monotonic() - running_since > lease:
                        reason = f"still {state.name} after its {lease:.0f} s lease: worker presumed dead"
                        self._crash(run_id, reason)
                        break
            finally:
                self.runs.forget(run_id)
            kept = done() if done else None
            if kept is not None:
                logger.warning("%s %s, but its work is stored intact: kept", run.name, reason)
                return kept
            if attempt == ATTEMPTS:
                raise FastImagicError(f"{run.name}: {reason}; gave up after {ATTEMPTS} attempts")
            logger.warning("%s %s: submitted again (attempt %d of %d)", run.name, reason, attempt + 1, ATTEMPTS)

    def _result(self, name: str, state) -> Any:
        """A finished task run's value, read as plain JSON (:func:`plain_record`) from this run's own storage block,
        whatever block or serializer the state names; a failed run's exception is raised again."""
        key = getattr(state.data, "storage_key", None)
        if not isinstance(key, str):
            raise FastImagicError(f"{name}: ended {state.name} with no stored result: {printable(state.message or '')}")
        if self.storage is None:
            from prefect.blocks.core import Block

            self.storage = Block.load(self.block)
        value = plain_record(self._read_result(name, key), f"{name}: result {key}")
        if state.is_failed():
            raise _exception(name, value)
        return _typed(value)

    def _read_result(self, name: str, key: str) -> bytes:
        # A worker sets the run Completed, then commits its result record: the record can lag the state a little.
        deadline = time.monotonic() + RESULT_WAIT_SECONDS
        while True:
            try:
                return self.storage.read_path(key)
            except Exception as e:  # noqa: BLE001 - a missing object, said by whichever client the block uses
                if time.monotonic() > deadline:
                    first = (str(e).strip().splitlines() or [type(e).__name__])[0]
                    raise StoreError(f"{name}: its result {key} cannot be read from {self.block}: {first}") from None
                time.sleep(0.5)

    @staticmethod
    def _crash(task_run_id, reason: str) -> None:
        Warm._end(task_run_id, "Crashed", reason)  # so the UI stops showing it as Running

    @staticmethod
    def _end(task_run_id, state: str, reason: str) -> None:
        import prefect.states
        from prefect.client.orchestration import get_client

        with get_client(sync_client=True) as client:  # a Cancelled run is no longer handed to any worker
            client.set_task_run_state(task_run_id, getattr(prefect.states, state)(message=reason), force=True)

    def tune(self, board: Storyboard, reference: Reference, run_prefix: str) -> tuple[SourcePrompt, TuningRef]:
        if board.source_prompt:
            prompts = caption_reference(board, reference)  # no model: the storyboard's own source prompt
        else:
            prompts = self.run(caption_reference, caption_params(board, reference), steps=0)
        ft = board.finetune
        steps = ft.steps * ft.batch_size * 3  # a training sample costs about a forward and a backward pass
        params = finetune_params(board, reference, prompts, board.output.resolved)
        return prompts, self.run(finetune_once, params, steps)

    def render(
        self, board: Storyboard, scene: Scene, seeds: list[int], key: str, output: str, run_prefix: str,
        strategies: tuple[str, ...],
    ) -> list[KeyframeRecord]:
        """One unit (a scene's ``seeds``) on a worker: :func:`tasks.pipeline.render_keyframes`, leased by its size.
        A lost unit whose every (scene, seed) was written and verifies intact is kept, not rendered again."""
        steps = len(strategies) * len(seeds) * len(scene.edit.combos()) * scene.steps
        records = self.run(
            render_keyframes,
            render_params(board, scene, list(seeds), key, output, run_prefix, strategies),
            steps,
            done=lambda: _all_written(scene, seeds, output, run_prefix, strategies),
        )
        progress.keyframes_written(len(records))
        return records

    def warm_up(self, board: Storyboard) -> None:
        pass  # the workers keep their models warm

    def scenes(
        self, board: Storyboard, tuning_key: str, run_prefix: str, resume: bool
    ) -> tuple[list[SceneSummary], list[KeyframeRecord], int]:
        try:
            return render_scenes(
                board, tuning_key, run_prefix, resume, threads=SCENE_THREADS, submit=self.submit_render
            )
        finally:
            self.waiting.shutdown(wait=False, cancel_futures=True)

    def submit_render(self, *args) -> Future:
        """Like ``render_keyframes.submit``: start the unit now, return a future of its records."""
        return self.waiting.submit(contextvars.copy_context().run, self.render, *args)
