"""The ``fastimagic`` command.

    fastimagic validate FILE                      check a storyboard; every problem, one line each
    fastimagic run FILE [--output URI] [--model M] [--workers] [-v|-q]
                                                  run the storyboard flow here (Prefect's embedded server); with
                                                  --workers, the GPU work runs on warm workers (a Prefect server)
    fastimagic worker                             a warm GPU worker: serve fine-tunes and renders, one at a time
    fastimagic runs OUTPUT [--json]               list the runs under a folder or s3://bucket/prefix
    fastimagic caption IMAGE                      BLIP caption of an image (the default source prompt)
    fastimagic strategies [--model tiny|sd15]     each forgetting strategy and what it touches
    fastimagic open RUN|FILE [RUN_ID]             where to look at a run: a local index.html or a presigned link
    fastimagic submit FILE --deployment NAME      create a flow run of a deployment on a Prefect server

Exit codes: 0 success, 2 invalid input (nothing is loaded or written), 1 any other failure.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
from pathlib import Path

EXIT_OK, EXIT_FAILED, EXIT_INVALID = 0, 1, 2


def _prefect_env() -> None:
    # In-process runs use Prefect's embedded server: give it time to start cold, send nothing anywhere.
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    os.environ.setdefault("PREFECT_LOGGING_LOG_PRINTS", "true")


def _fail(message: str, code: int) -> int:
    print(f"fastimagic: {message}", file=sys.stderr)
    return code


def cmd_validate(args) -> int:
    from fastimagic.storyboard_yaml import load_storyboard

    board = load_storyboard(args.file)
    print(
        f"{args.file}: ok: {len(board.scenes)} scenes, {board.keyframe_count()} keyframes, "
        f"{board.describe_resolution()}, model {board.model.given}, output {board.output.resolved}"
    )
    return EXIT_OK


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
    if not args.verbose:
        # Prefect's per-task lines still reach its API (the UI, `prefect flow-run logs`); the console shows warnings.
        os.environ["PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL"] = "WARNING"
    from fastimagic.progress import ProgressDisplay, listening
    from flows.run import preflight, read_storyboard
    from flows.storyboard import storyboard_flow

    output, model = _absolute_output(args.output), _absolute_model(args.model)
    board = read_storyboard(args.file, output=output, model=model)  # exit 2 here, before any model is loaded
    preflight(board)
    if args.workers:
        from flows.workers import check_shared_storage

        check_shared_storage()  # exit 1 with one line before any work is submitted

    run_id = args.resume or args.run_id
    display = None if args.quiet else ProgressDisplay(board.keyframe_count(), sys.stderr, tty=sys.stderr.isatty())
    with listening(display) if display else _nothing():
        try:
            result = storyboard_flow(
                storyboard=args.file,
                output=output,
                model=model,
                run_id=run_id,
                resume=bool(args.resume),
                scale_out=args.workers,
            )
        finally:
            if display:
                display.close()
    reused = " (reused stored tuning)" if result["tuning_reused"] else ""
    if args.resume:
        print(
            f"resumed {args.resume}: {result['kept']} keyframes verified and kept, "
            f"{result['keyframes'] - result['kept']} rendered"
        )
    print(f"{result['keyframes']} keyframes for '{board.name}' in {result['run_uri']}{reused}")
    print(f"manifest: {result['manifest']}")
    print(f"browse:   {result['index_url']}")
    if result["index_url"].startswith("http") and not args.quiet:
        print("          (presigned, expires in 24 h; for a private bucket, `fastimagic open "
              f"{result['run_uri']}` makes a page whose images are presigned too)")
    return EXIT_OK


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


def cmd_strategies(args) -> int:
    from fastimagic.config import BLOCK_PRESETS
    from fastimagic.forgetting import ALIASES, STRATEGIES, describe
    from fastimagic.models import unet_shapes

    blocks = BLOCK_PRESETS[args.blocks]
    trained = {n: s for n, s in unet_shapes(args.model).items() if n.startswith(tuple(b + "." for b in blocks))}
    total = sum(math.prod(s) for s in trained.values())
    print(
        f"{args.model} UNet, trained blocks '{args.blocks}' ({', '.join(blocks)}): {len(trained)} tensors, "
        f"{total:,} parameters"
    )
    for name in STRATEGIES:
        r = describe(name, trained)
        alias = [a for a, c in ALIASES.items() if c == name]
        extra = f" (alias: {', '.join(alias)})" if alias else ""
        print(f"  {name:22s} forgets {len(r.tensors):4d} tensors {r.parameters:>12,} params: {r.description}{extra}")
    return EXIT_OK


def cmd_open(args) -> int:
    """Print where to look at a run: the local index.html, or for S3 a presigned page whose images are presigned
    too (a plain presigned index.html could not load its relative images from a private bucket)."""
    from fastimagic import keyframes as kf
    from fastimagic.errors import InputError
    from fastimagic.sequence import index_page
    from flows.run import LINK_EXPIRES_SECONDS, read_storyboard
    from tasks.storage import output_store

    target = args.run
    if target.endswith((".yaml", ".yml")):
        board = read_storyboard(target)
        base = output_store(board.output.resolved).child(board.slug)
        runs = sorted({k.split("/", 1)[0] for k in base.list() if k.endswith("/" + kf.MANIFEST) and k.count("/") == 1})
        if args.run_id:
            runs = [r for r in runs if r == args.run_id]
        if not runs:
            raise InputError(f"{target}: no finished run{' ' + args.run_id if args.run_id else ''} under {base.uri}")
        store = base.child(runs[-1])
    else:
        store = output_store(target.rstrip("/"))
    if not store.exists(kf.MANIFEST):
        raise InputError(f"{store.uri}: no manifest.json: not a finished run folder")
    if not store.uri.startswith("s3://"):
        print(f"{store.uri}/{kf.INDEX}")
        return EXIT_OK
    import json

    run = json.loads(store.get_bytes(kf.MANIFEST))
    expires = args.expires or LINK_EXPIRES_SECONDS
    page = index_page(run, link=lambda key: store.url(key, expires=expires))
    name = f"shared/index-{kf.new_run_id()}.html"
    store.put_bytes(name, page, "text/html; charset=utf-8")
    print(store.url(name, expires=expires))
    print(f"(presigned page and images, valid {expires // 3600} h {expires % 3600 // 60} min)", file=sys.stderr)
    return EXIT_OK


def cmd_submit(args) -> int:
    from fastimagic.storyboard_yaml import load_storyboard

    uri = args.file if args.file.startswith("s3://") else str(Path(args.file).resolve())
    if not args.file.startswith("s3://"):
        load_storyboard(args.file)
    from prefect.deployments import run_deployment

    run = run_deployment(args.deployment, parameters={"storyboard": uri}, timeout=0)
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
    p = argparse.ArgumentParser(prog="fastimagic", description="One reference image in, story keyframes out.")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("validate", help="check a storyboard file")
    s.add_argument("file")
    s.set_defaults(func=cmd_validate)
    s = sub.add_parser("run", help="run a storyboard here")
    s.add_argument("file")
    s.add_argument("--output", help="local folder or s3://bucket/prefix (overrides the storyboard's)")
    s.add_argument("--model", help="tiny, a hub repo id, a diffusers folder or a .safetensors file")
    s.add_argument("--run-id", help="name the run folder (default: a new timestamped id)")
    s.add_argument("--resume", metavar="RUN_ID", help="continue an interrupted run: keep verified keyframes")
    s.add_argument("--workers", action="store_true",
                   help="fine-tune and render on warm workers (`fastimagic worker`; needs a Prefect server)")
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
    s.add_argument("--model", choices=["sd15", "tiny"], default="sd15")
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
    s.set_defaults(func=cmd_submit)
    s = sub.add_parser("worker", help="serve fine-tunes and renders as a warm GPU worker (one per GPU)")
    s.add_argument("--limit", type=int, default=1, help="tasks at once (default 1: one worker per GPU)")
    s.set_defaults(func=cmd_worker)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handler = logging.StreamHandler()
    handler.setLevel(logging.WARNING)  # records that propagate from Prefect's INFO loggers stop here
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=logging.WARNING, handlers=[handler])
    from fastimagic.errors import FastImagicError, InputError
    from fastimagic.store import NotFound

    try:
        return args.func(args)
    except (InputError, NotFound) as e:  # storyboard problems, missing or bad images, bad models: one line each
        return _fail(str(e), EXIT_INVALID)
    except FastImagicError as e:
        return _fail(str(e), EXIT_FAILED)
    except KeyboardInterrupt:
        return _fail("interrupted", EXIT_FAILED)
    except Exception as e:  # keep the promise of one clear line; the log above has the details
        first = (str(e).strip().splitlines() or [""])[0]
        return _fail(f"{type(e).__name__}: {first}", EXIT_FAILED)


if __name__ == "__main__":
    sys.exit(main())
