"""The ``fastimagic`` command.

    fastimagic validate FILE [--policy P]         check a storyboard (and its policy); every problem, one line each
    fastimagic run FILE [--output URI] [--model M] [--workers] [--policy P] [-v|-q]
                                                  run the storyboard flow here (Prefect's embedded server); with
                                                  --workers, the GPU work runs on warm workers (a Prefect server)
    fastimagic worker                             a warm GPU worker: serve fine-tunes and renders, one at a time
    fastimagic runs OUTPUT [--json]               list the runs under a folder or s3://bucket/prefix
    fastimagic caption IMAGE                      BLIP caption of an image (the default source prompt)
    fastimagic strategies [--model sd15|sd2|sdxl|tiny...]  each forgetting strategy and what it touches
    fastimagic open RUN|FILE [RUN_ID]             where to look at a run: its index.html, or for S3 a local page
                                                  whose images are presigned links
    fastimagic submit FILE --deployment NAME      create a flow run of a deployment on a Prefect server

Exit codes: 0 success, 2 invalid input (nothing is loaded or written), 1 any other failure, 128 + the signal when
stopped (130 for Ctrl-C, 143 for SIGTERM), after stopping what this process started.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import re
import sys
import threading
from pathlib import Path

EXIT_OK, EXIT_FAILED, EXIT_INVALID = 0, 1, 2


def _prefect_env() -> None:
    # In-process runs use Prefect's embedded server: give it time to start cold, send nothing anywhere.
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    os.environ.setdefault("PREFECT_LOGGING_LOG_PRINTS", "true")
    os.environ.setdefault("DO_NOT_TRACK", "1")  # Prefect's client telemetry (and its first-run notice) too


def _fail(message: str | BaseException, code: int) -> int:
    """Print one error (an exception with ``problems`` prints one line per problem) and return ``code``. Values
    from a storyboard reach messages: control characters are escaped, so none can forge a line or drive the
    terminal."""
    from fastimagic.config import printable

    lines = getattr(message, "problems", None) or [str(message)]
    print("fastimagic: " + "\n".join(printable(line) for line in lines), file=sys.stderr)
    return code


def _count(n: int, word: str) -> str:
    """``1 scene``, ``2 scenes``."""
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def _say(text: str) -> None:
    """One line of output: values from a storyboard in it are escaped like error lines."""
    from fastimagic.config import printable

    print(printable(text))


class Stopped(KeyboardInterrupt):
    """SIGTERM or SIGHUP, raised in the main thread like Ctrl-C, so Prefect marks the run crashed and every
    ``finally`` and ``atexit`` runs (the embedded Prefect server this process started is stopped there)."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


# Set once ``main`` is handling the end of the run: a stop signal that arrived is no longer at risk of being lost.
_ENDING = threading.Event()
REDELIVER_SECONDS = 15.0


def _on_signal(signum, frame) -> None:
    # A KeyboardInterrupt raised where Python cannot propagate it (a finalizer, say) is printed and dropped, and the
    # run would go on: unless main is handling the end by then, the signal is delivered again, up to three times.
    def redeliver() -> None:
        import signal

        for _ in range(3):
            if _ENDING.wait(REDELIVER_SECONDS):
                return
            # to the main thread itself, so a wait it is blocked in ends and the handler runs again there
            signal.pthread_kill(threading.main_thread().ident, signum)

    if not getattr(_on_signal, "armed", False):
        _on_signal.armed = True
        threading.Thread(target=redeliver, daemon=True, name="fastimagic-redeliver").start()
    raise Stopped(signum)


def _stop_signal(error: BaseException) -> int | None:
    """The stop signal behind ``error``, if it or an exception it was raised while handling was one: a signal that
    lands inside Prefect's own bookkeeping can surface as another error (e.g. ``ValueError: Task run is not set``
    while Prefect records the crash), which then carries the interrupt as its context."""
    import signal

    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, Stopped):
            return error.signum
        if isinstance(error, KeyboardInterrupt):
            return int(signal.SIGINT)
        if type(error).__name__ == "TerminationSignal":  # Prefect's, for SIGTERM during a flow run
            return int(getattr(error, "signal", signal.SIGTERM))
        error = error.__cause__ or error.__context__
    return None


def _supervise() -> None:
    """Signals this process can catch end it cleanly (exit 128 + the signal: 130 for Ctrl-C, 143 for SIGTERM).

    Every child process the main thread starts (Prefect's embedded server) gets a process group of its own, so a
    Ctrl-C in the terminal (SIGINT to the whole foreground group) reaches this process alone: it marks the run
    crashed on the server and then stops the server, instead of losing the server mid-run. For the signal it
    cannot catch (SIGKILL), those children are asked to receive SIGTERM when this process dies (Linux
    ``PR_SET_PDEATHSIG``), so none outlives it holding the caller's stdout and stderr open.
    """
    import signal
    import subprocess
    import threading

    for sig in (signal.SIGTERM, signal.SIGHUP):
        # An inherited SIG_IGN is kept, as Python keeps it for SIGINT: `nohup fastimagic run` outlives its terminal.
        if signal.getsignal(sig) is not signal.SIG_IGN:
            signal.signal(sig, _on_signal)
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:
        return
    parent = os.getpid()

    def die_with_parent(own_group: bool) -> None:  # runs in the child between fork and exec
        if own_group:
            os.setpgid(0, 0)  # out of the terminal's foreground group: Ctrl-C is for this process to handle
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
        if os.getppid() != parent:  # the parent died before prctl took effect
            os.kill(os.getpid(), signal.SIGTERM)

    original = subprocess.Popen.__init__

    def popen(self, *args, **kwargs):
        # Only from the main thread: PR_SET_PDEATHSIG fires when the *thread* that forked exits.
        if kwargs.get("preexec_fn") is None and threading.current_thread() is threading.main_thread():
            own_group = not kwargs.get("start_new_session") and kwargs.get("process_group") is None
            kwargs["preexec_fn"] = lambda: die_with_parent(own_group)
        original(self, *args, **kwargs)

    subprocess.Popen.__init__ = popen


def _policy(args):
    """The operator's policy from ``--policy`` or ``$FASTIMAGIC_POLICY``, or None when neither names one."""
    from fastimagic.policy import POLICY_ENV, load_policy

    path = getattr(args, "policy", None) or os.environ.get(POLICY_ENV)
    return load_policy(path) if path else None


def cmd_validate(args) -> int:
    from fastimagic.policy import enforce
    from fastimagic.storyboard_yaml import load_storyboard

    policy = _policy(args)
    text = None
    if args.file.startswith("s3://"):  # fetched and decoded as strictly as a local file
        from fastimagic.config import DEFAULT_MAX_STORYBOARD_BYTES
        from fastimagic.storyboard_yaml import decode_storyboard
        from tasks.storage import read

        text = decode_storyboard(read(args.file, max_bytes=DEFAULT_MAX_STORYBOARD_BYTES), args.file)
    board = load_storyboard(args.file, text=text, caps=policy.caps if policy is not None else None)
    if policy is not None:  # first, as the run does: someone else's storyboard learns nothing of these files
        enforce(board, policy)
    _check_local_files(board)
    bound = "up to " if any(scene.auto_forget for scene in board.scenes) else ""  # the second pass, if it overfits
    _say(
        f"{args.file}: ok: {_count(len(board.scenes), 'scene')}, {bound}{_count(board.keyframe_count(), 'keyframe')}, "
        f"{board.describe_resolution()}, model {board.model.given}, output {board.output.resolved}"
    )
    return EXIT_OK


def _check_local_files(board) -> None:
    """Exit 2 with one line per local file or folder the storyboard names that is missing or of the wrong kind."""
    from fastimagic.storyboard_yaml import StoryboardError

    if problems := board.local_problems():
        raise StoryboardError(problems)


def _absolute_output(value: str | None) -> str | None:
    """CLI overrides are relative to the current folder (storyboard fields are relative to the storyboard)."""
    if not value or value.startswith("s3://"):
        return value
    return str(Path(value).expanduser().resolve())


def _absolute_model(value: str | None) -> str | None:
    """A model override: a local folder or file becomes absolute; ``tiny`` and hub ids stay as they are."""
    from fastimagic.config import model_kind

    if not value:
        return value
    try:
        local = model_kind(value, os.getcwd()) in ("folder", "single_file")
    except ValueError:
        return value  # the storyboard's validation says what is wrong with it, with the field
    return str(Path(value).expanduser().resolve()) if local else value


def cmd_run(args) -> int:
    _prefect_env()  # before anything imports prefect: it reads its settings once
    if args.verbose:
        os.environ["PREFECT_LOGGING_LEVEL"] = "INFO"  # every flow and task line, whatever the environment says
        for handler in logging.getLogger().handlers:  # they reach the console through the root logger's handler
            handler.setLevel(logging.INFO)
    else:
        # Prefect's per-task lines still reach its API (the UI, `prefect flow-run logs`); the console shows warnings.
        os.environ["PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL"] = "WARNING"
    from fastimagic.errors import InputError
    from fastimagic.progress import ProgressDisplay, listening, ticking
    from fastimagic.store import NotFound, StoreError

    for flag, value in (("--run-id", args.run_id), ("--resume", args.resume)):
        if value is not None and not _RUN_ID.fullmatch(value):
            raise InputError(
                f"{flag} {value!r}: a run id is 1-100 characters of letters, digits, '.', '_' and '-', starting"
                " with a letter or digit (it names a folder); `fastimagic runs OUTPUT` lists existing ones"
            )
    if args.output is not None and not args.output.strip():
        raise InputError("--output '': give a folder or s3://bucket/prefix, or leave --output out to use the"
                         " storyboard's output")
    from flows.embedded import choose_database

    own_database = choose_database()  # before any embedded server starts: one local run per shared database
    if own_database and args.verbose:
        print(f"note: another local run is using Prefect's database; this run's Prefect records go to"
              f" {own_database}, deleted when it ends (flows/embedded.py)", file=sys.stderr)
    _start_early(args)  # after the checks of the arguments alone: it does what the run does next, in order
    from flows.run import preflight, read_storyboard
    from flows.storyboard import storyboard_flow

    output, model = _absolute_output(args.output), _absolute_model(args.model)
    from fastimagic.policy import handed

    policy = _policy(args)  # --policy, else $FASTIMAGIC_POLICY: someone else's storyboard, the operator's rules
    board = read_storyboard(args.file, output=output, model=model, policy=policy)  # exit 2 here, before any model
    _check_local_files(board)  # every missing file at once, as validate says it
    preflight(board)
    if args.workers:
        from flows.workers import check_shared_storage

        check_shared_storage()  # exit 1 with one line before any work is submitted
    display = None
    if not args.quiet:
        at_most = any(scene.auto_forget for scene in board.scenes)
        display = ProgressDisplay(board.keyframe_count(), sys.stderr, tty=sys.stderr.isatty(), at_most=at_most)
    _console_logs(display, one_line=not args.verbose)

    from fastimagic.keyframes import new_run_id

    # Named here, not in the flow, so that a stopped run can say which id to resume.
    run_id = args.resume or args.run_id or new_run_id()
    _STOPPED_HINT.append(lambda: _resume_hint(args, board, run_id))
    with listening(display) if display else _nothing(), ticking(display) if display else _nothing(), \
            handed(policy):
        try:
            result = storyboard_flow(
                storyboard=args.file,
                output=output,
                model=model,
                run_id=run_id,
                resume=bool(args.resume),
                scale_out=args.workers,
            )
        except NotFound as e:  # the inputs were checked above: something vanished from storage mid-run (exit 1)
            raise StoreError(str(e)) from None
        finally:
            if display:
                display.close()
    reused = " (reused stored tuning)" if result["tuning_reused"] else ""
    if args.resume:
        print(
            f"resumed {args.resume}: {_count(result['kept'], 'keyframe')} verified and kept, "
            f"{result['keyframes'] - result['kept']} rendered"
        )
    _say(f"{_count(result['keyframes'], 'keyframe')} for '{board.name}' in {result['run_uri']}{reused}")
    print(f"manifest: {result['manifest']}")
    if result["run_uri"].startswith("s3://"):  # a page whose images load from a private bucket too
        from tasks.storage import output_store

        print(f"browse:   {_local_page(output_store(result['run_uri']), LINK_EXPIRES_SECONDS)}")
        if not args.quiet:
            print(f"          (its images are presigned links, valid 24 h; `fastimagic open {result['run_uri']}`"
                  " renews them, on any machine with the credentials)")
    else:
        print(f"browse:   {result['index_url']}")
    return EXIT_OK


_RUN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")


def _start_early(args) -> None:
    """Take Prefect's start-up off the critical path of a local run: once another thread has imported the pipeline
    and checked the storyboard as the run will (:func:`flows.run.preflight`: bad input still ends before anything
    starts), the embedded server (a process of its own, seconds to boot) starts in this thread while that one loads
    the base model into the process's cache, where the fine-tune task finds it, and on a GPU pays its cold start
    (:func:`tasks.pipeline.prime`). Nothing here decides anything: the run checks again and says what is wrong.
    With ``--workers``, an ``s3://`` storyboard, a Prefect server of your own (``PREFECT_API_URL``) or
    ``FASTIMAGIC_SERIAL_START=1``, it does nothing. The server starts from this (the
    main) thread, so it gets the process group and the death signal :func:`_supervise` gives every child."""
    if args.workers or args.file.startswith("s3://") or os.environ.get("FASTIMAGIC_SERIAL_START"):
        return
    from flows.embedded import runs_on_embedded_server

    if not runs_on_embedded_server():
        return
    checked, passed = threading.Event(), []

    def warm() -> None:
        try:
            from flows.run import preflight, read_storyboard
            from tasks.pipeline import preload_model

            board = read_storyboard(args.file, output=_absolute_output(args.output), model=_absolute_model(args.model),
                                    policy=_policy(args))
            if not board.local_problems():
                preflight(board)
                passed.append(True)
        except Exception:  # noqa: BLE001 - the run checks everything again, in order, and says what is wrong
            return
        finally:
            checked.set()
        if not passed:
            return
        try:
            preload_model(board)
        except Exception:  # noqa: BLE001 - the fine-tune task loads it again and reports what fails
            return

    warming = threading.Thread(target=warm, daemon=True, name="fastimagic-warm")
    warming.start()
    checked.wait()
    if passed:
        from prefect.server.api.server import SubprocessASGIServer

        SubprocessASGIServer().start()  # the instance the flow's client uses (Prefect keeps one per process)
    warming.join()

# What a stopped command says next (``run``: the command that resumes the run), set once it is known.
_STOPPED_HINT: list = []


def _resume_hint(args, board, run_id: str) -> str:
    """The command that continues this run, to paste as it is (the same file, output, model, policy and workers),
    or, when the run folder has no plan yet (stopped before it started), that there is nothing to resume."""
    import shlex

    from fastimagic.runs import PLAN
    from tasks.storage import output_store

    try:
        started = output_store(board.output.resolved).exists(f"{board.slug}/{run_id}/{PLAN}")
    except Exception:  # storage down: say what would resume it anyway
        started = True
    if not started:
        return "; the run had not started: run the same command again"
    words = ["fastimagic", "run", args.file, "--resume", run_id]
    for flag, value in (("--output", _absolute_output(args.output)), ("--model", _absolute_model(args.model)),
                        ("--policy", args.policy)):
        words += [flag, value] if value else []
    words += ["--workers"] if args.workers else []
    return "; continue it with: " + shlex.join(words)


class _NoTraceback(logging.Filter):
    """Keeps log records to their message: the traceback Prefect attaches to a failed task or flow stays in its
    API (the UI, ``prefect flow-run logs``) and reaches the console only with ``-v``."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.exc_info, record.exc_text, record.stack_info = None, None, None
        if isinstance(record.msg, str) and "Traceback (most recent call last)" in record.msg:
            record.msg = record.msg.split("Traceback (most recent call last)")[0].rstrip() or "(traceback hidden)"
        return True


class _ClearsProgress(logging.Filter):
    """Takes the progress line off the terminal before a log line is written, so the two never share a line (the
    display draws itself again on its next tick)."""

    def __init__(self, display):
        super().__init__()
        self.display = display

    def filter(self, record: logging.LogRecord) -> bool:
        self.display.clear()
        return True


class _NamedRuns(logging.Formatter):
    """``LEVEL WHO: message``, where WHO is the Prefect task run (``render walking seed 0``) or flow run a line is
    about, else the logger's name."""

    def format(self, record: logging.LogRecord) -> str:
        task, flow = getattr(record, "task_run_name", None), getattr(record, "flow_run_name", None)
        record.who = task or (f"flow {flow}" if flow else record.name)
        return super().format(record)


def _console_logs(display, *, one_line: bool) -> None:
    """Shape what reaches the console: warnings through logging, every line naming its task or flow run, the
    progress line cleared before any of them, and (``one_line``) no tracebacks."""
    logging.captureWarnings(True)  # a warnings.warn from a library is a log line too, so it cannot glue on
    names = [n for n in logging.root.manager.loggerDict if n == "prefect" or n.startswith("prefect.")]
    for logger in [logging.getLogger(n) for n in names] + [logging.getLogger()]:
        for handler in logger.handlers:
            if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
                if one_line:
                    handler.addFilter(_NoTraceback())
                if display is not None:
                    handler.addFilter(_ClearsProgress(display))
                if logger is logging.root:
                    handler.setFormatter(_NamedRuns("%(levelname)s %(who)s: %(message)s"))


def _nothing():
    import contextlib

    return contextlib.nullcontext()


def cmd_runs(args) -> int:
    from fastimagic.runs import format_runs, list_runs, runs_json
    from tasks.storage import output_store

    target = args.output if args.output.startswith("s3://") else str(Path(args.output).expanduser().resolve())
    store = output_store(target)
    runs = list_runs(store)
    if args.json:
        print(runs_json(runs))
    elif not runs:
        print(f"no runs under {store.uri}")
    else:
        print(format_runs(runs))
    return EXIT_OK


def cmd_caption(args) -> int:
    from fastimagic.caption import load_captioner
    from fastimagic.images import load_reference
    from tasks.storage import read

    image = load_reference(read(args.image), args.image)
    print(load_captioner(args.model)(image))
    return EXIT_OK


def _unet_shapes(which: str) -> dict[str, tuple[int, ...]]:
    """:func:`fastimagic.models.unet_shapes` as plain tuples, kept in the per-user cache folder
    (``$XDG_CACHE_HOME/fastimagic``, default ``~/.cache/fastimagic``) per diffusers version: building the UNet, even
    on the meta device, means importing torch and diffusers (seconds); reading the JSON does not."""
    import json
    from importlib.metadata import version

    folder = _cache_folder()
    path = folder / f"unet-shapes-{which}-diffusers-{version('diffusers')}.json"
    try:
        return {name: tuple(shape) for name, shape in json.loads(path.read_text()).items()}
    except (OSError, ValueError, AttributeError, TypeError):
        pass
    from fastimagic.models import unet_shapes

    shapes = {name: tuple(shape) for name, shape in unet_shapes(which).items()}
    try:
        folder.mkdir(parents=True, exist_ok=True)
        temporary = path.with_suffix(f".{os.getpid()}.tmp")
        temporary.write_text(json.dumps(shapes))
        temporary.replace(path)  # whole or not at all, whoever else writes it at the same time
    except OSError:
        pass  # a read-only home: computed every time, as before
    return shapes


def cmd_strategies(args) -> int:
    from fastimagic.families import UNET_ARCHS
    from fastimagic.forgetting import ALIASES, STRATEGIES, describe

    family = UNET_ARCHS[args.model]
    blocks = family.presets[args.blocks]
    trained = {n: s for n, s in _unet_shapes(args.model).items() if n.startswith(tuple(b + "." for b in blocks))}
    total = sum(math.prod(s) for s in trained.values())
    print(
        f"{args.model} UNet ({family.label}), trained blocks '{args.blocks}' ({', '.join(blocks)}): {len(trained)}"
        f" tensors, {total:,} parameters"
    )
    for name in STRATEGIES:
        r = describe(name, trained, family)
        alias = [a for a, c in ALIASES.items() if c == name]
        extra = f" (alias: {', '.join(alias)})" if alias else ""
        print(f"  {name:22s} forgets {len(r.tensors):4d} tensors {r.parameters:>12,} params: {r.description}{extra}")
    return EXIT_OK


_MAX_EXPIRES = 7 * 24 * 3600
_MAX_MANIFEST_BYTES = 64 * 2**20


def cmd_open(args) -> int:
    """Print where to look at a run: the local index.html, or for S3 a page on this machine whose images are
    presigned links (a plain presigned index.html could not load its relative images from a private bucket)."""
    from fastimagic import keyframes as kf
    from fastimagic.errors import InputError
    from fastimagic.store import StoreError
    from tasks.storage import output_store

    if args.expires is not None and not 1 <= args.expires <= _MAX_EXPIRES:
        raise InputError(f"--expires {args.expires}: a link lives 1 to {_MAX_EXPIRES} seconds (7 days, the most a"
                         " presigned S3 link can); leave it out for 24 h")
    target = args.run
    if target.endswith((".yaml", ".yml")):
        if target.startswith("s3://"):
            from flows.run import read_storyboard  # Prefect's import (seconds) only where S3 costs more anyway
        else:
            from fastimagic.storyboard_yaml import load_storyboard as read_storyboard
        board = read_storyboard(target)
        base = output_store(board.output.resolved).child(board.slug)
        runs = sorted({k.split("/", 1)[0] for k in base.list() if k.endswith("/" + kf.MANIFEST) and k.count("/") == 1})
        if args.run_id:
            runs = [r for r in runs if r == args.run_id]
        if not runs:
            raise InputError(f"{target}: no finished run{' ' + args.run_id if args.run_id else ''} under {base.uri}")
        store = base.child(runs[-1])
    else:
        if not target.rstrip("/") or target.rstrip("/") == "s3:":
            raise InputError(
                f"open {target!r}: give a run folder (a path or s3://bucket/.../<storyboard>/<run-id>) or a"
                " storyboard file; `fastimagic runs OUTPUT` lists the runs under an output"
            )
        try:
            store = output_store(target.rstrip("/"))
        except StoreError as e:  # the URI itself (a '..', a bad bucket name): nothing was contacted
            raise InputError(str(e)) from None
    if not store.exists(kf.MANIFEST):
        raise InputError(f"{store.uri}: no manifest.json: not a finished run folder")
    if not store.uri.startswith("s3://"):
        print(f"{store.uri}/{kf.INDEX}")
        return EXIT_OK
    expires = args.expires or LINK_EXPIRES_SECONDS
    print(_local_page(store, expires))
    print(f"(a page on this machine; its images are presigned links, valid {expires // 3600} h"
          f" {expires % 3600 // 60} min)", file=sys.stderr)
    return EXIT_OK


LINK_EXPIRES_SECONDS = 24 * 3600  # as flows.run's, without importing Prefect for `open`


def _cache_folder() -> Path:
    """This user's cache folder for fastimagic: ``$XDG_CACHE_HOME/fastimagic``, default ``~/.cache/fastimagic``."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "fastimagic"


def _local_page(store, expires: int) -> str:
    """A page for an S3 run that opens with its images on a private bucket: the run's index.html with every image
    link presigned (a presigned index.html alone cannot load its relative images), written on this machine, not
    into the bucket (presigned links carry the access key id, which nothing stored may hold), at one path per run
    under the cache folder (``pages/<bucket>/<prefix>/index.html``), replaced each time. Returns its ``file://``
    URL."""
    import json
    from urllib.parse import quote

    from fastimagic import keyframes as kf
    from fastimagic.errors import InputError
    from fastimagic.sequence import index_page

    try:  # a manifest is data someone may have edited: one that is not what fastimagic writes is refused
        run = json.loads(store.get_bytes(kf.MANIFEST, max_bytes=_MAX_MANIFEST_BYTES))
        page = index_page(run, link=lambda key: store.url(key, expires=expires))
    except (ValueError, TypeError, KeyError, AttributeError, RecursionError) as e:
        raise InputError(f"{store.uri}/{kf.MANIFEST}: damaged, not a fastimagic run manifest"
                         f" ({type(e).__name__}); `fastimagic runs` lists the runs there") from None
    path = _cache_folder() / "pages" / store.uri.removeprefix("s3://").strip("/") / kf.INDEX
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{kf.INDEX}.{os.getpid()}.tmp")
    temporary.write_bytes(page)
    temporary.replace(path)
    return "file://" + quote(str(path))


def cmd_submit(args) -> int:
    """Check the storyboard here first (schema and ``--policy`` / ``$FASTIMAGIC_POLICY``, the safe default without
    one: a pre-check that saves a round trip), then create the flow run with the storyboard's URI only. The worker
    obeys its own operator's policy, whatever this side checked: no policy travels with the run."""
    from fastimagic.config import printable
    from fastimagic.errors import InputError
    from fastimagic.policy import default_policy, for_home, home_of
    from flows.run import read_storyboard

    if not re.fullmatch(r"[^/\s]+/[^/\s]+", args.deployment):
        raise InputError(f"--deployment {printable(args.deployment)!r}: a deployment is named FLOW/DEPLOYMENT, e.g."
                         " storyboard/storyboard (`prefect deployment ls` lists them)")
    uri = args.file if args.file.startswith("s3://") else str(Path(args.file).resolve())
    policy = for_home(_policy(args) or default_policy(), home_of(uri))
    read_storyboard(uri, policy=policy)  # the policy's caps count seeds and keyframes before any is made
    import httpx
    from prefect.deployments import run_deployment
    from prefect.exceptions import ObjectNotFound
    from prefect.settings import PREFECT_API_URL

    from fastimagic.errors import FastImagicError
    from fastimagic.store import shown_endpoint

    url = PREFECT_API_URL.value()
    if not url:
        raise InputError(
            "submit creates a flow run on a Prefect server, and none is set: set PREFECT_API_URL (for example"
            " http://prefect:4200/api); to run the storyboard here, use `fastimagic run FILE`"
        )
    try:
        run = run_deployment(args.deployment, parameters={"storyboard": uri}, timeout=0)
    except ObjectNotFound:
        raise InputError(f"no deployment {args.deployment!r} on {shown_endpoint(url)}; `prefect deployment ls`"
                         " lists them (names are FLOW/DEPLOYMENT, e.g. storyboard/storyboard)") from None
    except (httpx.TransportError, OSError) as e:
        raise FastImagicError(f"cannot reach the Prefect server at {shown_endpoint(url)} ({type(e).__name__}); is"
                              " it running, and is PREFECT_API_URL right?") from None
    print(f"submitted flow run {run.name} ({run.id}) of deployment {args.deployment} for {uri}")
    return EXIT_OK


def cmd_worker(args) -> int:
    """A warm GPU worker (one per GPU; ``CUDA_VISIBLE_DEVICES`` picks it): keeps the base model and recent tunings
    loaded across tasks and storyboards. Refuses to start without the shared storage block or a Prefect server."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # background task runs belong to no flow run: their log lines stay on this worker's console
    os.environ.setdefault("PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW", "ignore")
    from flows.workers import serve, storage_block

    storage_block()  # before importing the tasks (and torch): a misconfigured worker says so at once
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s: %(message)s"))
    for name in ("fastimagic", "fastimagic.worker"):
        logging.getLogger(name).setLevel(logging.INFO)
    logging.getLogger("fastimagic").addHandler(handler)
    serve(limit=args.limit)
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    from fastimagic import __version__
    from fastimagic.families import UNET_ARCHS  # plain data: no torch

    p = argparse.ArgumentParser(prog="fastimagic", description="One reference image in, story keyframes out.")
    p.add_argument("--version", action="version", version=f"fastimagic {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("validate", help="check a storyboard file")
    s.add_argument("file")
    s.add_argument("--policy", metavar="FILE", help="also check an operator policy (default: $FASTIMAGIC_POLICY)")
    s.set_defaults(func=cmd_validate)
    s = sub.add_parser("run", help="run a storyboard here")
    s.add_argument("file")
    s.add_argument("--output", help="local folder or s3://bucket/prefix (overrides the storyboard's)")
    s.add_argument("--model", help="tiny, a hub repo id, a diffusers folder or a .safetensors file")
    s.add_argument("--run-id", help="name the run folder (default: a new timestamped id)")
    s.add_argument("--resume", metavar="RUN_ID", help="continue an interrupted run: keep verified keyframes")
    s.add_argument("--workers", action="store_true",
                   help="fine-tune and render on warm workers (`fastimagic worker`; needs a Prefect server)")
    s.add_argument("--policy", metavar="FILE", help="the operator policy it must keep (default: $FASTIMAGIC_POLICY)")
    loud = s.add_mutually_exclusive_group()
    loud.add_argument("-v", "--verbose", action="store_true", help="also print Prefect's per-task log lines")
    loud.add_argument("-q", "--quiet", action="store_true", help="print only the summary and errors")
    s.set_defaults(func=cmd_run)
    s = sub.add_parser("runs", help="list the runs under an output folder or s3://bucket/prefix")
    s.add_argument("output", help="the storyboard's output: a folder or s3://bucket/prefix")
    s.add_argument("--json", action="store_true", help="one JSON array, for scripts")
    s.set_defaults(func=cmd_runs)
    s = sub.add_parser("caption", help="caption an image with BLIP")
    s.add_argument("image")
    s.add_argument("--model", default="Salesforce/blip-image-captioning-base", help="BLIP repo id, folder or tiny")
    s.set_defaults(func=cmd_caption)
    s = sub.add_parser("strategies", help="list forgetting strategies and what each touches")
    s.add_argument("--model", choices=list(UNET_ARCHS), default="sd15")
    s.add_argument("--blocks", choices=["reference", "paper"], default="reference")
    s.set_defaults(func=cmd_strategies)
    s = sub.add_parser("open", help="print where to look at a run (local path or presigned link)")
    s.add_argument("run", help="a run folder (path or s3://.../<storyboard>/<run-id>) or a storyboard file")
    s.add_argument("run_id", nargs="?", help="with a storyboard file: which run (default: the latest)")
    s.add_argument("--expires", type=int, help="link lifetime in seconds (default 86400)")
    s.set_defaults(func=cmd_open)
    s = sub.add_parser("submit", help="create a flow run of a deployment on a Prefect server")
    s.add_argument("file", help="storyboard path (must be readable by the worker) or s3:// URI")
    s.add_argument("--deployment", required=True, help="e.g. storyboard/storyboard")
    s.add_argument("--policy", metavar="FILE", help="pre-check here against this policy (default:"
                   " $FASTIMAGIC_POLICY); the worker obeys its own operator's policy whatever this says")
    s.set_defaults(func=cmd_submit)
    s = sub.add_parser("worker", help="serve fine-tunes and renders as a warm GPU worker (one per GPU)")
    s.add_argument("--limit", type=int, default=1, help="tasks at once (default 1: one worker per GPU)")
    s.set_defaults(func=cmd_worker)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.func is cmd_run:
        _supervise()
    handler = logging.StreamHandler()
    handler.setLevel(logging.WARNING)  # records that propagate from Prefect's INFO loggers stop here
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=logging.WARNING, handlers=[handler])
    from fastimagic.errors import FastImagicError, InputError
    from fastimagic.store import NotFound

    try:
        return args.func(args)
    except BaseException as e:
        _ENDING.set()
        signum = _stop_signal(e)
        if signum is not None:  # Ctrl-C, SIGTERM, SIGHUP, however the run ended after it
            import signal

            name = signal.Signals(signum).name
            hint = ""
            for said in _STOPPED_HINT:
                hint = said()
            return _fail(f"stopped by {name}; nothing more is written{hint}", 128 + signum)
        if isinstance(e, (InputError, NotFound)):  # storyboard problems, missing or bad images, bad models
            return _fail(e, EXIT_INVALID)
        if isinstance(e, FastImagicError):
            return _fail(e, EXIT_FAILED)
        if not isinstance(e, Exception):  # SystemExit and the like
            raise
        first = (str(e).strip().splitlines() or [""])[0]  # one clear line; the log above has the details
        return _fail(f"{type(e).__name__}: {first}", EXIT_FAILED)
    finally:
        _ENDING.set()


if __name__ == "__main__":
    sys.exit(main())
