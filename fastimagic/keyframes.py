"""Keyframe sets as a person browses them and a video stage reads them.

Layout under the output (a local folder or ``s3://bucket/prefix``)::

    <output>/tunings/<key>/                                   shared fine-tune artifacts (see fastimagic.tuning)
    <output>/<storyboard>/<run-id>/manifest.json              the run: storyboard, model, caption, every keyframe
    <output>/<storyboard>/<run-id>/index.html                 a static page: reference, caption, every scene
    <output>/<storyboard>/<run-id>/reference.<ext>            the reference image as given
    <output>/<storyboard>/<run-id>/scenes/<scene>/<seed>-<edit>-<forget>.png
    <output>/<storyboard>/<run-id>/scenes/<scene>/manifest.json
    <output>/<storyboard>/<run-id>/scenes/<scene>/contact-sheet.jpg
    <output>/<storyboard>/<run-id>/.progress/<scene>/<seed>.json    what a (scene, seed) wrote, with SHA-256s

Keys in manifests are relative to the run folder, so a downloaded run folder stays consistent.
"""

from __future__ import annotations

import hashlib
import html
import io
import json
import math
import secrets
from datetime import datetime, timezone
from urllib.parse import quote

from PIL import Image, ImageDraw

MANIFEST = "manifest.json"
INDEX = "index.html"
CONTACT_SHEET = "contact-sheet.jpg"
PROGRESS = ".progress"  # per (scene, seed) records of written keyframes, for resuming an interrupted run


def new_run_id(now: datetime | None = None) -> str:
    """A sortable, unique run id such as ``20261128T091500Z-3f9a1c``."""
    now = now or datetime.now(timezone.utc)
    return f"{now.strftime('%Y%m%dT%H%M%SZ')}-{secrets.token_hex(3)}"


def edit_label(edit: dict) -> str:
    """A short file-name-safe label for merge settings: ``g1.10`` or ``a0.80-b1.20``."""
    if edit["mode"] == "subtract":
        return f"g{edit['gamma']:.2f}"
    return f"a{edit['alpha']:.2f}-b{edit['beta']:.2f}"


def keyframe_name(seed: int, edit: dict, forget: str, sigma: float = 0.0) -> str:
    """``<seed>-<edit>-<forget>.png``; '+' in strategy names becomes '_' so the key needs no URL escaping."""
    forget_part = forget.replace("+", "_") + (f"-s{sigma:.2f}" if sigma else "")
    return f"{seed}-{edit_label(edit)}-{forget_part}.png"


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


def contact_sheet(tiles: list[tuple[Image.Image, str]], tile: int = 192, columns: int | None = None) -> bytes:
    """A JPEG grid of keyframes, each labelled underneath (seed, edit, forgetting)."""
    if not tiles:
        raise ValueError("no keyframes for a contact sheet")
    columns = columns or min(8, len(tiles))
    rows = math.ceil(len(tiles) / columns)
    label_h = 16
    sheet = Image.new("RGB", (columns * tile, rows * (tile + label_h)), (24, 24, 24))
    draw = ImageDraw.Draw(sheet)
    for i, (img, label) in enumerate(tiles):
        x, y = (i % columns) * tile, (i // columns) * (tile + label_h)
        thumb = img.copy()
        thumb.thumbnail((tile, tile))
        sheet.paste(thumb, (x + (tile - thumb.width) // 2, y + (tile - thumb.height) // 2))
        draw.text((x + 3, y + tile + 2), label[: tile // 6], fill=(230, 230, 230))
    buf = io.BytesIO()
    sheet.save(buf, "JPEG", quality=85)
    return buf.getvalue()


def tile_label(record: dict) -> str:
    return f"s{record['seed']} {edit_label(record['edit'])} {record['forget']}"


def index_html(run: dict) -> bytes:
    """A static page (no JavaScript) for a run manifest; every text is escaped, every link is relative."""
    e = html.escape
    parts = [
        "<!doctype html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{e(run['storyboard']['name'])} · {e(run['run_id'])}</title>",
        "<style>body{font-family:system-ui,sans-serif;margin:2rem;background:#fafafa;color:#222}"
        "img{max-width:100%;height:auto}figure{margin:0 0 2rem}.ref{max-width:320px}"
        "table{border-collapse:collapse}td,th{padding:2px 8px;border-bottom:1px solid #ddd;text-align:left}</style>",
        "</head><body>",
        f"<h1>{e(run['storyboard']['name'])}</h1>",
        f"<p>Run <code>{e(run['run_id'])}</code> · model <code>{e(run['model']['identity'])}</code>"
        f" · {len(run['keyframes'])} keyframes</p>",
    ]
    if run.get("reference_key"):
        parts.append(f'<img class="ref" src="{quote(run["reference_key"])}" alt="reference image">')
    parts.append(f"<p>Source prompt: <q>{e(run['source_prompt'])}</q>")
    if run.get("caption"):
        parts.append(f" (BLIP caption: <q>{e(run['caption'])}</q>)")
    parts.append("</p>")
    for scene in run["scenes"]:
        parts.append(f'<section id="{e(scene["id"])}"><h2>{e(scene["id"])}</h2>')
        parts.append(f'<p class="prompt">{e(scene["prompt"])}</p>')
        parts.append(
            f'<figure><a href="{quote(scene["contact_sheet"])}"><img src="{quote(scene["contact_sheet"])}"'
            f' alt="contact sheet of {e(scene["id"])}"></a></figure>'
        )
        parts.append("<table><tr><th>keyframe</th><th>seed</th><th>edit</th><th>forget</th></tr>")
        for k in (k for k in run["keyframes"] if k["scene"] == scene["id"]):
            parts.append(
                f'<tr><td><a href="{quote(k["key"])}">{e(k["key"].rsplit("/", 1)[-1])}</a></td>'
                f"<td>{k['seed']}</td><td>{e(edit_label(k['edit']))}</td><td>{e(k['forget'])}</td></tr>"
            )
        parts.append("</table></section>")
    parts.append("</body></html>")
    return "\n".join(parts).encode()
