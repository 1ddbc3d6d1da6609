"""Keyframe sets as a person browses them and a video stage reads them.

Layout under the output (a local folder or ``s3://bucket/prefix``)::

    <output>/tunings/<key>/                                   shared fine-tune artifacts (see fastimagic.tuning)
    <output>/<storyboard>/<run-id>/manifest.json              the run: storyboard, model, caption, every keyframe
    <output>/<storyboard>/<run-id>/index.html                 a static page: reference, caption, every scene
    <output>/<storyboard>/<run-id>/reference.<ext>            the reference image as given
    <output>/<storyboard>/<run-id>/scenes/<scene>/<seed>-<edit>-<forget>.png
    <output>/<storyboard>/<run-id>/scenes/<scene>/manifest.json
    <output>/<storyboard>/<run-id>/scenes/<scene>/contact-sheet.jpg
    <output>/<storyboard>/<run-id>/picks/<scene>/<rank>-<keyframe>.png   the selected keyframes, best first
    <output>/<storyboard>/<run-id>/.progress/<scene>/<seed>-<forget>.json   what a render wrote, with SHA-256s

Keys in manifests are relative to the run folder, so a downloaded run folder stays consistent.
"""

from __future__ import annotations

import hashlib
import html
import io
import json
import math
import secrets
from collections.abc import Mapping
from datetime import datetime, timezone
from urllib.parse import quote as _quote

from PIL import Image, ImageDraw, ImageOps

from fastimagic.merge import Edit, as_edit

MANIFEST = "manifest.json"
INDEX = "index.html"
CONTACT_SHEET = "contact-sheet.jpg"
PICKS = "picks"  # picks/<scene>/<rank>-<keyframe>.png: the selected keyframes, in order
PROGRESS = ".progress"  # per (scene, seed) records of written keyframes, for resuming an interrupted run


def new_run_id(now: datetime | None = None) -> str:
    """A sortable, unique run id such as ``20261128T091500Z-3f9a1c``."""
    now = now or datetime.now(timezone.utc)
    return f"{now.strftime('%Y%m%dT%H%M%SZ')}-{secrets.token_hex(3)}"


def keyframe_name(seed: int, edit: Edit | Mapping, forget: str, sigma: float = 0.0) -> str:
    """``<seed>-<edit>-<forget>.png``; '+' in strategy names becomes '_' so the key needs no URL escaping."""
    forget_part = forget.replace("+", "_") + (f"-s{sigma:.2f}" if sigma else "")
    return f"{seed}-{as_edit(edit).label()}-{forget_part}.png"


def scene_prefix(scene_id: str) -> str:
    return f"scenes/{scene_id}"


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "PNG", optimize=False, compress_level=6)
    return buf.getvalue()


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def dumps(obj) -> bytes:
    return (json.dumps(obj, indent=2, ensure_ascii=False, sort_keys=False) + "\n").encode()


def contact_sheet(tiles: list[tuple], tile: int = 192, columns: int | None = None) -> bytes:
    """A JPEG grid of keyframes: ``(image, label)`` or ``(image, label, picked)`` tiles, each labelled underneath
    (several lines allowed); picked tiles get a yellow frame."""
    if not tiles:
        raise ValueError("no keyframes for a contact sheet")
    columns = columns or min(8, len(tiles))
    rows = math.ceil(len(tiles) / columns)
    line_h = 12
    label_h = line_h * max(str(t[1]).count("\n") + 1 for t in tiles) + 4
    sheet = Image.new("RGB", (columns * tile, rows * (tile + label_h)), (24, 24, 24))
    draw = ImageDraw.Draw(sheet)
    for i, (img, label, *rest) in enumerate(tiles):
        x, y = (i % columns) * tile, (i // columns) * (tile + label_h)
        # scale up small keyframes too (nearest, so pixels stay honest), down large ones smoothly
        size = (tile - 8, tile - 8)
        small = img.width <= size[0] and img.height <= size[1]
        thumb = ImageOps.contain(img, size, Image.Resampling.NEAREST if small else Image.Resampling.LANCZOS)
        sheet.paste(thumb, (x + (tile - thumb.width) // 2, y + (tile - thumb.height) // 2))
        if rest and rest[0]:
            draw.rectangle((x + 1, y + 1, x + tile - 2, y + tile - 2), outline=(255, 210, 0), width=4)
        for j, line in enumerate(str(label).split("\n")):
            draw.text((x + 3, y + tile + 2 + j * line_h), line[: tile // 6], fill=(230, 230, 230))
    buf = io.BytesIO()
    sheet.save(buf, "JPEG", quality=85)
    return buf.getvalue()


def tile_label(record: dict) -> str:
    """Two lines: seed, edit and forgetting; then scores and pick rank when present."""
    first = f"s{record['seed']} {as_edit(record['edit']).label()} {record['forget']}"
    sc = record.get("scores")
    if not sc:
        return first
    metric = "lpips" if sc.get("fidelity_metric") == "lpips" else "sim"
    second = f"clip {sc['clip']:.1f} {metric} {sc['fidelity']:.2f}"
    if record.get("pick"):
        second += f" #{record['pick']}"
    return f"{first}\n{second}"


def _scores_cell(record: dict) -> str:
    sc = record.get("scores")
    if not sc:
        return ""
    try:
        numbers = f"{float(sc['clip']):.1f} / {float(sc['fidelity']):.3f}"
    except (KeyError, TypeError, ValueError):  # a record that is not what fastimagic writes: shown as text
        numbers = html.escape(str(sc))
    return f"{numbers} {html.escape(str(sc.get('fidelity_metric', '')))}"


def index_html(run: dict, link=None, *, top: str = "", css: str = "") -> bytes:
    """A static page (no JavaScript) for a run manifest; every text is escaped.

    Links are relative (the folder works when downloaded) unless ``link(key) -> url`` is given, e.g. presigned URLs.
    ``top``: HTML put first in the body (the sequence strip, see :func:`fastimagic.sequence.index_page`), styled
    by ``css``.
    """
    def e(value) -> str:  # every value, whatever its field or type: a manifest may have been edited by anyone
        return html.escape(str(value))

    def quote(key: str) -> str:
        return e(link(key)) if link else _quote(key)

    parts = [
        "<!doctype html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{e(run['storyboard']['name'])} · {e(run['run_id'])}</title>",
        "<style>body{font-family:system-ui,sans-serif;margin:2rem;background:#fafafa;color:#222}"
        "img{max-width:100%;height:auto}figure{margin:0 0 1rem}.ref{max-width:320px}"
        ".picks img{width:160px;margin:0 8px 8px 0;border:3px solid #f5c400}"
        "table{border-collapse:collapse}td,th{padding:2px 8px;border-bottom:1px solid #ddd;text-align:left}"
        f".reason{{color:#555}}{css}</style>",
        "</head><body>",
        top,
        f"<h1>{e(run['storyboard']['name'])}</h1>",
        f"<p>Run <code>{e(run['run_id'])}</code> · model <code>{e(run['model']['identity'])}</code>"
        f" · {len(run['keyframes'])} keyframes · <a href=\"{quote(MANIFEST)}\">manifest.json</a></p>",
    ]
    if run.get("reference_key"):
        parts.append(f'<figure><img class="ref" src="{quote(run["reference_key"])}" alt="reference image">'
                     "<figcaption>reference</figcaption></figure>")
    parts.append(f"<p>Source prompt: <q>{e(run['source_prompt'])}</q>")
    if run.get("caption"):
        parts.append(f" (BLIP caption: <q>{e(run['caption'])}</q>)")
    parts.append("</p>")
    for scene in run["scenes"]:
        parts.append(f'<section id="{e(scene["id"])}"><h2>{e(scene["id"])}</h2>')
        parts.append(f'<p class="prompt">{e(scene["prompt"])}</p>')
        auto = scene.get("auto")
        if auto:
            parts.append(f'<p class="reason">forget: auto: {e(auto["reason"])}'
                         + (f" Chosen: <b>{e(auto['chosen'])}</b>." if auto.get("chosen") else "") + "</p>")
        if scene.get("picks"):
            parts.append('<div class="picks"><h3>Picks</h3>')
            for p in scene["picks"]:
                parts.append(f'<a href="{quote(p["key"])}"><img src="{quote(p["key"])}" '
                             f'alt="pick {e(p["rank"])} of {e(scene["id"])}"></a>')
            parts.append("</div>")
        parts.append(
            f'<figure><a href="{quote(scene["contact_sheet"])}"><img src="{quote(scene["contact_sheet"])}"'
            f' alt="contact sheet of {e(scene["id"])}"></a></figure>'
        )
        parts.append("<table><tr><th>keyframe</th><th>seed</th><th>edit</th><th>forget</th>"
                     "<th>CLIP / fidelity</th><th>pick</th></tr>")
        for k in (k for k in run["keyframes"] if k["scene"] == scene["id"]):
            parts.append(
                f'<tr><td><a href="{quote(k["key"])}">{e(k["key"].rsplit("/", 1)[-1])}</a></td>'
                f"<td>{e(k['seed'])}</td><td>{e(as_edit(k['edit']).label())}</td><td>{e(k['forget'])}</td>"
                f"<td>{_scores_cell(k)}</td><td>{e(k.get('pick') or '')}</td></tr>"
            )
        parts.append("</table></section>")
    parts.append("</body></html>")
    return "\n".join(parts).encode()
