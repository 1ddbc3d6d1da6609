"""Listing the runs under an output (``fastimagic runs OUTPUT``): which are complete, which to ``--resume``.

Layout read (see :mod:`fastimagic.keyframes`)::

    <output>/tunings/<key>/                          fine-tunes: not runs, skipped
    <output>/<storyboard-slug>/<run-id>/manifest.json    written last: the run is complete
    <output>/<storyboard-slug>/<run-id>/run.json         the plan, written when the run starts (see plan_record)
    <output>/<storyboard-slug>/<run-id>/.progress/...    one record per rendered (scene, seed, strategies) unit

Only manifests, plans and progress records are read (never an image), and folders are listed one level at a time
(``Store.listdir``: a ``Delimiter='/'`` listing on S3), so an output with hundreds of runs and many thousands of
keyframes lists in a few requests per run. A run folder is one holding a manifest, a plan, progress records or
``scenes/``; other folders are ignored.
"""

from __future__ import annotations

import json
import os
import re
import shlex
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from typing import TYPE_CHECKING

from fastimagic import keyframes as kf
from fastimagic.config import printable
from fastimagic.errors import InputError
from fastimagic.store import LocalStore, Store, StoreError

if TYPE_CHECKING:
    from fastimagic.storyboard import Storyboard

__all__ = [
    "COMPLETE",
    "DAMAGED",
    "INCOMPLETE",
    "PLAN",
    "PLAN_FORMAT",
    "RunInfo",
    "format_runs",
    "list_runs",
    "plan_record",
    "resume_command",
    "runs_json",
]

PLAN = "run.json"  # <output>/<slug>/<run-id>/run.json: what the run set out to render
PLAN_FORMAT = "fastimagic.run-plan"
TUNINGS = "tunings"  # <output>/tunings/: fine-tune artifacts, not runs

COMPLETE, INCOMPLETE, DAMAGED = "complete", "incomplete", "damaged"

# Reads of manifests and plans run concurrently (S3 round trips dominate); boto3 clients are thread-safe.
_WORKERS = 8
_RUN_ID_TIME = re.compile(r"^(\d{8}T\d{6}Z)(?:-|$)")  # kf.new_run_id(): 20261128T091500Z-3f9a1c


def plan_record(board: Storyboard, run_id: str, *, created: str | None = None, tuning: dict | None = None) -> dict:
    """The plan of a run, written as ``run.json`` in the run folder when the run starts, so a listing of an
    interrupted run can say how many keyframes it set out to render.

    ``created``: ISO 8601 time the run started (default: now, UTC). ``tuning``: ``{"key", "reused"}`` once the
    fine-tune step knows them (rewrite the plan then, keeping ``created``), else ``None``. ``keyframes`` is the
    storyboard's count; with ``forget: auto`` scenes it is an upper bound (``keyframes_at_most``: the second pass
    renders only when a scene overfits).
    """
    created = created or datetime.now(timezone.utc).isoformat(timespec="seconds")
    scenes = [{"id": s.id, "keyframes": s.keyframe_count(), "auto": bool(s.auto_forget)} for s in board.scenes]
    source = board.source
    if source and not source.startswith("s3://"):
        source = os.path.abspath(source)  # the resume hint of `fastimagic runs` works from any folder
    return {
        "format": PLAN_FORMAT,
        "version": 1,
        "run_id": run_id,
        "created": created,
        "storyboard": {"name": board.name, "slug": board.slug, "uri": source or None},
        "keyframes": sum(s["keyframes"] for s in scenes),
        "keyframes_at_most": any(s["auto"] for s in scenes),
        "scenes": scenes,
        "tuning": {"key": tuning["key"], "reused": bool(tuning["reused"])} if tuning else None,
    }


@dataclass(frozen=True)
class RunInfo:
    """One run under an output.

    status: ``complete`` (its manifest is there), ``incomplete`` (no manifest yet: interrupted or still running;
    ``fastimagic run <storyboard> --resume <run_id>`` continues it) or ``damaged`` (its manifest does not parse;
    ``problem`` says why). keyframes: listed in the manifest, or (incomplete) written so far per the progress
    records. expected: what the run set out to render (its manifest, or its plan ``run.json``; ``None`` when
    unknown), an upper bound when ``expected_at_most``. created: ISO 8601 (from the manifest, the plan, or the
    time in a timestamped run id). tuning_key / tuning_reused: the fine-tune used, when known. uri: the run folder.
    storyboard_uri: the storyboard file the run was started from (from its plan), when known.
    """

    storyboard: str
    slug: str
    run_id: str
    status: str
    keyframes: int | None
    expected: int | None
    expected_at_most: bool
    created: str | None
    tuning_key: str | None
    tuning_reused: bool | None
    uri: str
    problem: str | None = None
    storyboard_uri: str | None = None

    @property
    def status_text(self) -> str:
        """``complete``, ``damaged``, or ``incomplete: 12 of 36 written`` (``of up to 36`` with ``forget: auto``
        scenes; ``incomplete: written 12`` when the total is not known)."""
        if self.status != INCOMPLETE:
            return self.status
        if self.expected is None:
            return f"incomplete: written {self.keyframes}"
        bound = "up to " if self.expected_at_most else ""
        return f"incomplete: {self.keyframes} of {bound}{self.expected} written"


def _parse_time(text: str | None) -> datetime | None:
    if not isinstance(text, str):
        return None
    try:
        when = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
    return when if when.tzinfo else when.replace(tzinfo=timezone.utc)


def _created_from_run_id(run_id: str) -> str | None:
    match = _RUN_ID_TIME.match(run_id)
    if not match:
        return None
    when = datetime.strptime(match.group(1), "%Y%m%dT%H%M%SZ").replace(tzinfo=timezone.utc)
    return when.isoformat(timespec="seconds")


_MAX_RECORD_BYTES = 64 * 2**20  # a manifest, plan or progress record larger than this is damaged, not read


def _read_json(store: Store, key: str) -> tuple[object, str | None]:
    """``(value, None)`` or ``(None, problem)`` for an object that cannot be read (not a regular file, larger than
    :data:`_MAX_RECORD_BYTES`) or is not JSON (nested too deep included)."""
    try:
        data = store.get_bytes(key, max_bytes=_MAX_RECORD_BYTES)
    except StoreError as e:
        return None, f"{key} cannot be read ({e})"
    try:
        return json.loads(data), None
    except UnicodeDecodeError:
        return None, f"{key} is not UTF-8 text"
    except ValueError as e:
        return None, f"{key} is not valid JSON ({e})"
    except RecursionError:
        return None, f"{key} is nested too deep to be a fastimagic record"


def _complete(run: Store, slug: str, run_id: str) -> RunInfo:
    manifest, problem = _read_json(run, kf.MANIFEST)
    if problem is None and not isinstance(manifest, dict):
        problem = f"{kf.MANIFEST} is not a JSON object"
    if problem is None and not isinstance(manifest.get("keyframes"), list):
        problem = f"{kf.MANIFEST} has no 'keyframes' list"
    if problem is not None:
        return _damaged(run.uri, slug, run_id, problem)
    board = manifest.get("storyboard") if isinstance(manifest.get("storyboard"), dict) else {}
    tuning = manifest.get("tuning") if isinstance(manifest.get("tuning"), dict) else {}
    count = len(manifest["keyframes"])
    created = manifest.get("created") if _parse_time(manifest.get("created")) else _created_from_run_id(run_id)
    return RunInfo(
        storyboard=str(board.get("name") or slug),
        slug=slug,
        run_id=run_id,  # the folder's name: what --resume and 'fastimagic open' take
        status=COMPLETE,
        keyframes=count,
        expected=count,
        expected_at_most=False,
        created=created,
        tuning_key=tuning.get("key"),
        tuning_reused=tuning.get("reused"),
        uri=run.uri,
    )


def _incomplete(run: Store, slug: str, run_id: str, entries: list[str]) -> RunInfo:
    problems = []
    plan: dict = {}
    if PLAN in entries:
        value, problem = _read_json(run, PLAN)
        if isinstance(value, dict):
            plan = value
        else:
            problems.append(problem or f"{PLAN} is not a JSON object")
    written: set[str] = set()
    if f"{kf.PROGRESS}/" in entries:
        for key in run.list(f"{kf.PROGRESS}/"):
            records, problem = _read_json(run, key)
            if isinstance(records, list):
                written.update(r["key"] for r in records if isinstance(r, dict) and isinstance(r.get("key"), str))
            else:  # a resume re-renders this unit
                problems.append(problem or f"{key} is not a list of keyframe records")
    board = plan.get("storyboard") if isinstance(plan.get("storyboard"), dict) else {}
    tuning = plan.get("tuning") if isinstance(plan.get("tuning"), dict) else {}
    expected = plan.get("keyframes")
    created = plan.get("created") if _parse_time(plan.get("created")) else _created_from_run_id(run_id)
    return RunInfo(
        storyboard=str(board.get("name") or slug),
        slug=slug,
        run_id=run_id,
        status=INCOMPLETE,
        keyframes=len(written),
        expected=expected if isinstance(expected, int) and not isinstance(expected, bool) else None,
        expected_at_most=bool(plan.get("keyframes_at_most")),
        created=created,
        tuning_key=tuning.get("key"),
        tuning_reused=tuning.get("reused"),
        uri=run.uri,
        problem="; ".join(problems) or None,
        storyboard_uri=board.get("uri") if isinstance(board.get("uri"), str) else None,
    )


def _inspect(store: Store, slug: str, run_id: str, folder: str | None = None) -> RunInfo | None:
    """The run in ``folder`` (default ``<slug>/<run_id>``), or None when the folder is no run; a run whose records
    are not what fastimagic writes (a mistyped field, a name the store refuses) is listed as damaged, never hiding
    the others."""
    folder = folder or f"{slug}/{run_id}"
    try:
        info = _read_run(store, slug, run_id, folder)
    except (StoreError, TypeError, ValueError, AttributeError, KeyError, RecursionError) as e:
        return _damaged(f"{store.uri.rstrip('/')}/{folder}", slug, run_id, str(e) or type(e).__name__)
    if info is not None and not all(isinstance(v, t) for v, t in (
            (info.storyboard, str), (info.tuning_key, (str, type(None))), (info.created, (str, type(None))),
            (info.tuning_reused, (bool, type(None))))):
        return _damaged(info.uri, slug, run_id, "a field of its records has the wrong type")
    return info


def _damaged(uri: str, slug: str, run_id: str, problem: str) -> RunInfo:
    return RunInfo(storyboard=slug, slug=slug, run_id=run_id, status=DAMAGED, keyframes=None, expected=None,
                   expected_at_most=False, created=_created_from_run_id(run_id), tuning_key=None,
                   tuning_reused=None, uri=uri, problem=problem)


def _read_run(store: Store, slug: str, run_id: str, folder: str) -> RunInfo | None:
    run = store.child(folder)
    entries = run.listdir()
    if kf.MANIFEST in entries:
        return _complete(run, slug, run_id)
    if _RUN_MARKS & set(entries):
        return _incomplete(run, slug, run_id, entries)
    return None  # not a run folder


_RUN_MARKS = {kf.MANIFEST, PLAN, f"{kf.PROGRESS}/", "scenes/"}  # what makes a folder a run folder (see _inspect)


def _newest_first(info: RunInfo) -> tuple:
    when = _parse_time(info.created)
    # no time known: last; then run ids (timestamped ones sort by time) and storyboards, in reverse
    return (when is not None, when or datetime.min.replace(tzinfo=timezone.utc), info.run_id, info.slug)


def list_runs(store: Store) -> list[RunInfo]:
    """Every run under the output ``store`` (from ``fastimagic.store.open_store``), newest first.

    ``store`` may also be one storyboard's folder (``<output>/<storyboard>``): its runs are listed.
    Reads manifests, plans and progress records only, one folder level at a time. Raises :class:`InputError`
    (one line naming it) when the folder or bucket does not exist; an output without runs gives ``[]``; a run
    whose manifest does not parse is listed as ``damaged``. Storage failures (endpoint, credentials) are
    :class:`fastimagic.store.StoreError` lines.
    """
    if not store.root_exists():
        if isinstance(store, LocalStore) and store.root.exists():
            raise InputError(f"{store.uri}: not a folder; expected an output folder or s3://bucket/prefix")
        what = "bucket" if store.uri.startswith("s3://") else "folder"
        raise InputError(f"{store.uri}: no such {what}; expected an output folder or s3://bucket/prefix")
    candidates = []
    for entry in store.listdir():
        if not entry.endswith("/") or entry == f"{TUNINGS}/":
            continue
        slug = entry.rstrip("/")
        try:
            inside = store.listdir(slug)
        except StoreError as e:  # a folder name the store refuses (a control character): listed, not fatal
            candidates.append((slug, f"?: {e}", None))
            continue
        if _RUN_MARKS & set(inside):  # OUTPUT is one storyboard's folder (<output>/<slug>): this is one of its runs
            candidates.append((store.uri.rstrip("/").rsplit("/", 1)[-1], slug, slug))
            continue
        candidates += [(slug, run.rstrip("/"), None) for run in inside if run.endswith("/")]
    with ThreadPoolExecutor(max_workers=_WORKERS) as pool:
        found = list(pool.map(lambda c: _inspect(store, *c), candidates))
    return sorted((r for r in found if r is not None), key=_newest_first, reverse=True)


def _short(key: str | None) -> str:
    return key[:12] if key else "-"


_HINTS = 3  # resume commands printed under the table


def resume_command(run: RunInfo) -> str:
    """The command that continues an incomplete run, to paste as it is: its storyboard (``<storyboard.yaml>``
    when its plan predates recording it) and the output it was written to, so it works from any folder."""
    output = run.uri.removesuffix(f"/{run.slug}/{run.run_id}")
    return shlex.join(["fastimagic", "run", run.storyboard_uri or "<storyboard.yaml>", "--resume", run.run_id,
                       "--output", output])


def format_runs(runs: list[RunInfo]) -> str:
    """A plain aligned table, in the order given: storyboard, run id, status, keyframes, created, tuning (its
    key's first 12 characters, ``(reused)`` or ``(new)``). Problems (damaged manifests, unreadable progress
    records) follow the table, one line each, then how to continue an incomplete run. No runs: ``""``.
    """
    if not runs:
        return ""
    header = ("STORYBOARD", "RUN", "STATUS", "KEYFRAMES", "CREATED", "TUNING")
    rows = [header]
    for r in runs:
        reused = {True: " (reused)", False: " (new)"}.get(r.tuning_reused, "") if r.tuning_key else ""
        count = "-" if r.keyframes is None else str(r.keyframes)
        rows.append(tuple(printable(str(cell)) for cell in (  # names from the folder: no forged lines, no escapes
            r.storyboard, r.run_id, r.status_text, count, r.created or "-", _short(r.tuning_key) + reused)))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    notes = [printable(f"{r.run_id}: {r.status}: {r.problem}") for r in runs if r.problem]
    incomplete = [r for r in runs if r.status == INCOMPLETE]
    for r in incomplete[:_HINTS]:
        notes.append(printable(f"continue {r.run_id} with: {resume_command(r)}"))
    if len(incomplete) > _HINTS:
        notes.append(f"(and {len(incomplete) - _HINTS} more incomplete: the same command with their run ids)")
    return "\n".join(lines + ([""] + notes if notes else []))


def runs_json(runs: list[RunInfo]) -> str:
    """The runs as a JSON array (newest first as given), one object per run with :class:`RunInfo`'s fields."""
    return json.dumps([asdict(r) for r in runs], indent=2, ensure_ascii=False)
