"""The sequence: one chosen keyframe per scene, in story order, as a contract for a video stage.

A complete run writes, beside its ``manifest.json``::

    sequence.json                  what is below, described; its format is docs/sequence.schema.json
    sequence/000-<scene>.png       the chosen keyframe of the first scene
    sequence/001-<scene>.png       ... of the second, and so on in storyboard order

so an image-to-video tool can take the folder as is, and a first-and-last-frame video model can be fed
consecutive pairs (``000``+``001``, ``001``+``002``, ...).

Which keyframe a scene contributes:

* with ``select``: its first pick (rank 1);
* otherwise (or when ``select`` picked nothing): the *default*, the first keyframe in render order among the
  scene's keyframes, restricted to the strategy ``forget: auto`` chose when it chose one. Render order is taken from
  the keyframes' settings, never from the order of records: lowest seed, then the first edit (``subtract`` before
  ``project``; lowest gamma, or lowest alpha then beta), then the first forgetting strategy in
  :data:`fastimagic.forgetting.STRATEGIES` order (``none`` first), then lowest sigma.

The sequence depends on the run manifest's content only (no clock, no record order), so a resumed run gives the
same ``sequence.json`` as an uninterrupted one.
"""

from __future__ import annotations

import html
from collections.abc import Callable, Mapping
from urllib.parse import quote as _quote

from fastimagic import keyframes as kf
from fastimagic.errors import InputError
from fastimagic.forgetting import STRATEGIES

__all__ = [
    "FORMAT",
    "SEQUENCE",
    "SEQUENCE_CSS",
    "SEQUENCE_DIR",
    "VERSION",
    "build_sequence",
    "default_keyframe",
    "index_page",
    "sequence_html",
    "store_uri",
    "write_sequence",
]

SEQUENCE = "sequence.json"  # beside the run's manifest.json
SEQUENCE_DIR = "sequence"  # sequence/000-<scene>.png, ...: the chosen keyframes in story order
FORMAT = "fastimagic.sequence"
VERSION = 1  # the published format: docs/sequence.schema.json (JSON Schema draft 2020-12)

# For index.html's <style>: the strip sequence_html() draws.
SEQUENCE_CSS = (
    ".sequence ol{display:flex;gap:8px;overflow-x:auto;list-style:none;padding:0;margin:0 0 1rem}"
    ".sequence li{flex:0 0 auto;width:160px}.sequence img{width:160px;display:block}"
    ".sequence figcaption{font-size:.8rem;color:#555}"
)


def _edit_order(edit: Mapping) -> tuple:
    if edit.get("mode") == "subtract":
        return (0, float(edit.get("gamma", 0.0)), 0.0)
    return (1, float(edit.get("alpha", 0.0)), float(edit.get("beta", 0.0)))


_STRATEGY_ORDER = {name: i for i, name in enumerate(STRATEGIES)}


def _render_order(record: Mapping) -> tuple:
    """Where a keyframe comes in render order, from its settings alone (see the module docstring)."""
    forget = str(record.get("forget", ""))
    return (
        int(record.get("seed", 0)),
        _edit_order(record.get("edit") or {}),
        _STRATEGY_ORDER.get(forget, len(_STRATEGY_ORDER)),
        forget,
        float(record.get("sigma") or 0.0),
        str(record.get("key", "")),
    )


def default_keyframe(records: list[Mapping], auto: Mapping | None = None) -> Mapping:
    """The keyframe a scene contributes without picks: the first in render order (lowest seed, first edit, first
    strategy, lowest sigma), among the keyframes of the strategy ``auto`` chose when it chose one that is there.

    ``records`` are one scene's keyframe records (any order). Raises ``ValueError`` if there are none.
    """
    if not records:
        raise ValueError("no keyframes to choose from")
    chosen = (auto or {}).get("chosen")
    pool = [r for r in records if chosen and r.get("forget") == chosen] or list(records)
    return min(pool, key=_render_order)


def _where(run: Mapping) -> str:
    return f"run {run.get('run_id', '?')}"


def build_sequence(
    run: Mapping,
    *,
    uri: Callable[[str], str],
    motion: Mapping[str, str | None] | None = None,
) -> tuple[dict, list[tuple[str, str]]]:
    """The sequence of a run, and the copies that make its ``sequence/`` folder.

    run: the run manifest as ``flows.storyboard.finish_run`` builds it (``run_id``, ``storyboard``, ``resolution``,
    ``scenes`` with ``picks`` and ``auto``, ``keyframes`` records). uri: maps a run-relative key to an absolute
    location (a local path or ``s3://`` URI) for the ``uri`` fields. motion: per scene id, the storyboard's
    ``motion`` text for the video model (``None`` or missing: none); when ``motion`` is not given at all, a
    ``motion`` field of the manifest's scene entries is used if there is one.

    Returns ``(sequence, copies)``: the ``sequence.json`` content (format :data:`FORMAT` version :data:`VERSION`,
    docs/sequence.schema.json) and ``[(keyframe key, sequence/ key), ...]`` in story order. Depends only on the
    manifest's content (not on the order of its records, nor on any clock). A manifest whose scene has no
    keyframes, or whose pick names a keyframe it does not list, raises :class:`InputError`.
    """
    records = run.get("keyframes") or []
    by_key = {r["key"]: r for r in records}
    scenes = run.get("scenes") or []
    width = max(3, len(str(max(len(scenes) - 1, 0))))
    resolution = run.get("resolution") or {}
    frames: list[dict] = []
    copies: list[tuple[str, str]] = []
    for index, scene in enumerate(scenes):
        sid = scene["id"]
        own = [r for r in records if r.get("scene") == sid]
        if not own:
            raise InputError(f"{_where(run)}: scene {sid!r} has no keyframes in the manifest, so no sequence frame")
        auto = scene.get("auto")
        picks = scene.get("picks") or []
        if picks:
            first = min(picks, key=lambda p: int(p["rank"]))
            if first["key"] not in by_key:
                raise InputError(f"{_where(run)}: scene {sid!r} picks {first['key']!r}, not a keyframe of the run")
            record, chosen_by, rank = by_key[first["key"]], "pick", int(first["rank"])
        else:
            record, chosen_by, rank = default_keyframe(own, auto), "default", None
        dest = f"{SEQUENCE_DIR}/{index:0{width}d}-{sid}.png"
        if motion is not None:
            text = motion.get(sid)
        else:
            text = scene.get("motion")
        frame = {
            "index": index,
            "scene": sid,
            "key": dest,
            "uri": uri(dest),
            "keyframe": {"key": record["key"], "uri": uri(record["key"])},
            "chosen_by": chosen_by,
            "rank": rank,
            "prompt": record.get("prompt", scene.get("prompt")),
            "negative_prompt": record.get("negative_prompt"),
            "motion": text,
            "width": int(record.get("width") or resolution.get("width")),
            "height": int(record.get("height") or resolution.get("height")),
            "seed": int(record["seed"]),
            "edit": dict(record["edit"]),
            "forget": record["forget"],
            "forget_auto": bool(auto),
            "sigma": float(record.get("sigma") or 0.0),
            "guidance": float(record["guidance"]),
            "steps": int(record["steps"]),
        }
        if record.get("sha256"):
            frame["sha256"] = record["sha256"]  # the copy's bytes are the keyframe's
        if record.get("scores"):
            frame["scores"] = dict(record["scores"])
        frames.append(frame)
        copies.append((record["key"], dest))
    storyboard = run.get("storyboard") or {}
    sequence = {
        "format": FORMAT,
        "version": VERSION,
        "run_id": run["run_id"],
        "storyboard": storyboard.get("name"),
        "resolution": {"width": int(resolution["width"]), "height": int(resolution["height"])},
        "frames": frames,
    }
    return sequence, copies


def store_uri(store, key: str) -> str:
    """The absolute location of ``key`` in ``store``: a local path, or ``s3://bucket/prefix/key``."""
    return f"{store.uri.rstrip('/')}/{key}"


def write_sequence(store, run: Mapping, *, motion: Mapping[str, str | None] | None = None) -> dict:
    """Write a run's ``sequence/`` folder and ``sequence.json`` (last) into ``store``, the run folder's store
    (``fastimagic.store``); return the sequence.

    Copies each chosen keyframe to ``sequence/<index>-<scene>.png``, removes anything else in ``sequence/`` (so a
    video tool can take the folder as is), then writes ``sequence.json``. Idempotent: running it again (a resumed
    run) writes the same bytes. ``motion`` as in :func:`build_sequence`. Storage errors are
    :class:`fastimagic.store.StoreError`; retrying is the caller's policy.
    """
    sequence, copies = build_sequence(run, uri=lambda key: store_uri(store, key), motion=motion)
    wanted = {dest for _, dest in copies}
    for source, dest in copies:
        store.put_bytes(dest, store.get_bytes(source), "image/png")
    for stale in store.list(f"{SEQUENCE_DIR}/"):
        if stale not in wanted:
            store.delete(stale)
    store.put_bytes(SEQUENCE, kf.dumps(sequence), "application/json")
    return sequence


def sequence_html(sequence: Mapping, link: Callable[[str], str] | None = None) -> str:
    """An HTML strip of the sequence, for the top of index.html: each frame's image (relative ``src``, or
    ``link(key)`` such as a presigned URL), its number, scene and prompt (all text escaped). Style it with
    :data:`SEQUENCE_CSS`."""
    def e(value) -> str:  # every value, whatever its type
        return html.escape(str(value))

    def src(key: str) -> str:
        return e(link(key)) if link else _quote(key)

    parts = [
        '<section class="sequence"><h2>Sequence</h2>',
        f'<p><a href="{src(SEQUENCE)}">{e(SEQUENCE)}</a> · {len(sequence["frames"])} frames in story order</p>',
        "<ol>",
    ]
    for frame in sequence["frames"]:
        parts.append(
            f'<li><figure><a href="#{e(frame["scene"])}"><img src="{src(frame["key"])}"'
            f' alt="{e(frame["scene"])}: {e(frame["prompt"])}"></a>'
            f"<figcaption>{e(str(frame['index']).zfill(3))} · {e(frame['scene'])}<br>{e(frame['prompt'])}"
            + (f"<br><i>{e(frame['motion'])}</i>" if frame.get("motion") else "")
            + "</figcaption></figure></li>"
        )
    parts.append("</ol></section>")
    return "\n".join(parts)


def index_page(run: Mapping, link: Callable[[str], str] | None = None) -> bytes:
    """The run's ``index.html``: :func:`fastimagic.keyframes.index_html` with the sequence strip at the top when
    the run has a sequence (``run["sequence"]``)."""
    if not run.get("sequence"):
        return kf.index_html(run, link)
    sequence, _ = build_sequence(run, uri=lambda key: key)
    return kf.index_html(run, link, top=sequence_html(sequence, link), css=SEQUENCE_CSS)
