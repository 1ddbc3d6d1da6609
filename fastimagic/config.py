"""Plain facts shared by the storyboard schema and the runtime: constants and the rules for paths, URIs and models.

Torch-free and Prefect-free, so that validating a storyboard costs no heavy import, and so that ``fastimagic
validate`` and ``fastimagic run`` apply one rule, not two copies that drift apart.
"""

from __future__ import annotations

import ipaddress
import os
import re
import stat
import unicodedata

from fastimagic.families import MAX_LEVELS, SD1, TINY_FAMILIES

# --- the fine-tune ---------------------------------------------------------------------------------------------

# Which UNet blocks the fine-tune trains, by preset name, on SD 1.x: see fastimagic.families, which holds every
# family's presets (the names are the same on every family).
BLOCK_PRESETS: dict[str, tuple[str, ...]] = SD1.presets
# UNet2DConditionModel children that hold parameters (SDXL adds add_embedding), and the most down/up levels a
# family has (SD 1.x and 2.x: 4, SDXL: 3; fastimagic.families checks a model's own).
UNET_BLOCKS = (
    "conv_in", "time_embedding", "add_embedding", "down_blocks", "mid_block", "up_blocks", "conv_norm_out", "conv_out"
)
UNET_LEVELS = MAX_LEVELS

# Numeric precision of the UNet's compute and the frozen encoders (see fastimagic.precision for what each means).
PRECISIONS = ("auto", "fp32", "tf32", "fp16", "bf16")

# --- images and caps -------------------------------------------------------------------------------------------

MIN_SIDE = 64  # the smallest image whose latent keeps a spatial extent at every UNet level
SIDE_MULTIPLE = 8  # the VAE downsamples by 8
MAX_SEED = 2**32 - 1
# How the reference is fitted to the fine-tune's size: "crop" covers it and cuts the overhang (centred), "resize"
# stretches it (the released implementation), "pad" fits it inside and letterboxes it. With a one-number
# resolution the size already has the reference's aspect ratio, so all three differ by a few pixels at most.
FIT_MODES = ("crop", "pad", "resize")
DEFAULT_MAX_SEEDS = 64
DEFAULT_MAX_KEYFRAMES = 10_000
# The most a storyboard may raise max_seeds / max_keyframes to: what a count may make before anything is refused.
MAX_SEEDS_CEILING = 100_000
MAX_KEYFRAMES_CEILING = 1_000_000
DEFAULT_MAX_SIDE = 2048
# Bounds on what one storyboard may hand the worker, whoever wrote it (an operator policy can lower them).
DEFAULT_MAX_PROMPT_CHARS = 2000  # CLIP reads 77 tokens; thousands of characters are a mistake or an attack
DEFAULT_MAX_REFERENCE_BYTES = 50_000_000
DEFAULT_MAX_STORYBOARD_BYTES = 1_000_000


def size_for(image_size: tuple[int, int], short_side: int, multiple: int = SIDE_MULTIPLE) -> tuple[int, int]:
    """(width, height) for a one-number resolution that keeps the reference's aspect ratio: the shorter side
    becomes ``short_side`` and the longer one scales with it, both rounded to the nearest ``multiple`` (at least
    one multiple). A square reference gives a square.

    >>> size_for((1200, 800), 512), size_for((600, 800), 512), size_for((640, 640), 512)
    ((768, 512), (512, 680), (512, 512))
    """
    w, h = image_size
    if w <= 0 or h <= 0 or short_side <= 0 or multiple <= 0:
        raise ValueError(f"sizes must be positive, got image {w}x{h}, short side {short_side}")

    def snap(v: float) -> int:
        return max(multiple, int(v / multiple + 0.5) * multiple)

    if w <= h:
        return snap(short_side), snap(short_side * h / w)
    return snap(short_side * w / h), snap(short_side)


# --- models ----------------------------------------------------------------------------------------------------

TINY_MODEL = "tiny"
TINY_MODELS = tuple(TINY_FAMILIES)  # tiny (SD 1.x-shaped), tiny-sd2, tiny-sdxl
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")  # loading these can run code
CHECKPOINT_SUFFIXES = (".safetensors", *PICKLE_SUFFIXES)
_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}")
URL_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")


def model_kind(spec: str, base: str | None = None) -> str:
    """What a ``model:`` value names, from its text: ``tiny`` (any of :data:`TINY_MODELS`), ``hub`` (an
    ``org/name`` repo id), ``single_file`` (a checkpoint file) or ``folder`` (a diffusers folder). ``base``: the
    folder relative paths resolve against; a bare ``org/name`` that exists there is a folder, not a repo id.

    Raises :class:`ValueError` (the message is a sentence about ``spec``) for a URL or a value that is neither.
    """
    if spec in TINY_MODELS:
        return "tiny"
    if URL_SCHEME.match(spec):
        raise ValueError(
            f"'{spec}': models load from a hub repo id, a local folder or a local checkpoint file, not a URL"
        )
    suffix = os.path.splitext(spec)[1].lower()
    local = spec.startswith((".", "/", "~")) or suffix in CHECKPOINT_SUFFIXES or spec.count("/") > 1
    if not local and base is not None and not base.startswith("s3://"):
        local = os.path.exists(os.path.join(base, spec))
    if local:
        return "single_file" if suffix in CHECKPOINT_SUFFIXES else "folder"
    if _HUB_ID.fullmatch(spec) and ".." not in spec:
        return "hub"
    raise ValueError(
        f"'{spec}' is not a hub repo id like 'org/name', a local path (start it with ./ or /),"
        " a .safetensors checkpoint or 'tiny'"
    )


def is_pickle(path: str) -> bool:
    return os.path.splitext(path)[1].lower() in PICKLE_SUFFIXES


# --- S3 URIs ---------------------------------------------------------------------------------------------------

BUCKET_RULE = "bucket names are 3-63 characters of a-z, 0-9, '.' and '-', starting and ending with a letter or digit"
_BUCKET_RE = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")


def bucket_problem(bucket: str) -> str | None:
    """Why ``bucket`` breaks S3's naming rules (MinIO enforces the same), or None when it is a valid name."""
    if not bucket:
        return "is missing"
    if not _BUCKET_RE.fullmatch(bucket):
        return "is not a valid bucket name"
    if ".." in bucket or ".-" in bucket or "-." in bucket:
        return "has '..', '.-' or '-.'"
    if bucket.startswith("xn--") or bucket.endswith("-s3alias"):
        return "uses a reserved prefix or suffix"
    try:
        ipaddress.IPv4Address(bucket)
        return "looks like an IP address"
    except ValueError:
        return None


def split_s3(uri: str) -> tuple[str, str]:
    """``s3://bucket/key`` -> ``(bucket, key)``; the key may be empty and is returned as written.

    Raises :class:`ValueError` with a sentence (not naming ``uri``; callers prefix it) when the bucket is missing or
    breaks the naming rules.
    """
    if not uri.startswith("s3://"):
        raise ValueError("not an S3 URI, expected s3://bucket/prefix")
    bucket, _, key = uri[len("s3://") :].partition("/")
    if not bucket:
        raise ValueError("missing bucket name; write s3://BUCKET/KEY")
    problem = bucket_problem(bucket)
    if problem:
        raise ValueError(f"bucket '{bucket}' {problem}; {BUCKET_RULE}")
    return bucket, key


def s3_key_problem(key: str) -> str | None:
    """Why an S3 key (or prefix without its trailing ``/``) would name something other than it seems: ``..`` or
    ``.`` segments, ``//``, a backslash or a control character. None when it is plain."""
    if not key:
        return None
    if "\\" in key:
        return "has a backslash; S3 keys use '/'"
    if any(ord(c) < 32 or ord(c) == 127 for c in key):
        return "has a control character"
    segments = key.split("/")
    if any(s in (".", "..") for s in segments):
        return "has a '.' or '..' segment; write the key it means"
    if "" in segments:
        return "has '//' or starts with '/'; write the key without empty segments"
    return None


# --- names ---------------------------------------------------------------------------------------------------


def printable(text: str) -> str:
    """``text`` with control characters, ANSI escapes and other unprintables written as escapes (``\\n``,
    ``\\x1b``), so a value from a storyboard cannot forge a line or drive the terminal; other Unicode stays."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else ascii(c)[1:-1] for c in text)


def slugify(text: str, max_length: int = 64, *, transliterate: bool = True) -> str:
    """``text`` as a folder-safe slug (ASCII lowercase, digits, ``-``, ``_``): 'Beach Walk' -> 'beach-walk'.

    Letters with no ASCII form (Japanese, Greek...) still give a slug: ``u-`` and the text's Punycode, so
    '海辺の一日' -> 'u-' + letters and digits (``transliterate=False``: ''); text of punctuation only gives ''."""
    ascii_text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode().lower()
    slug = re.sub(r"[^a-z0-9_]+", "-", ascii_text).strip("-_")
    if not slug and transliterate and any(c.isalnum() for c in text):
        letters = "".join(c for c in unicodedata.normalize("NFKC", text) if c.isalnum())
        slug = "u-" + re.sub(r"[^a-z0-9]+", "", letters.encode("punycode").decode().lower())
    return slug[:max_length].rstrip("-_")


def special_file(mode: int) -> str:
    """What a path that is neither a regular file nor a folder is, in the words every refusal uses: ``a FIFO``,
    ``a device``, ``a socket`` or ``not a regular file`` (``mode``: ``os.stat(...).st_mode``)."""
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    return "a socket" if stat.S_ISSOCK(mode) else "not a regular file"
