"""The tuning artifact: what one fine-tune learned, compact enough to send to every render worker.

A :class:`Tuning` holds the learned source embedding e_src, the trained UNet tensors as float16 *differences from
the base weights* (not the weights, not the whole UNet), the source prompt, the fine-tune settings, the loss
curve and the base model's identity. It is saved as a folder::

    weights-<sha>.safetensors   e_src (float32) + one float16 delta per trained tensor
    tuning.json                 everything else, the weights file's name and its SHA-256; written last

The weights file is named after its own hash, so two workers saving the same tuning at once can never leave a
``tuning.json`` that points at the other one's bytes.

Its ``key`` is a content key: the same reference bytes, base model, source prompt, settings and seed always give
the same key, so a stored tuning can be found and reused instead of fine-tuning again.
"""

from __future__ import annotations

import hashlib
import json
import mmap
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from fastimagic.errors import FastImagicError

FORMAT_VERSION = 1
META_FILE = "tuning.json"
_EMBEDDING = "source_embedding"
_DELTA = "delta."
_SAFETENSORS_DTYPES = {torch.float32: "F32", torch.float16: "F16"}  # what a tuning holds


class CorruptTuning(FastImagicError):
    """A stored tuning whose bytes do not match its recorded checksum, or that cannot be parsed."""


def content_key(
    *, image_sha256: str, model_identity: str, source_prompt: str, finetune: dict, width: int, height: int
) -> str:
    """The content key of a fine-tune: a SHA-256 over everything that determines its result (hex, 32 chars).

    ``finetune`` includes the seed. The resolution is part of it because the image latent depends on it.
    """
    payload = {
        "v": FORMAT_VERSION,
        "image": image_sha256,
        "model": model_identity,
        "source_prompt": source_prompt,
        "finetune": finetune,
        "size": [width, height],
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:32]


@dataclass
class Tuning:
    """The result of :func:`fastimagic.finetuning.finetune`. See the module docstring."""

    key: str
    source_prompt: str
    source_embedding: torch.Tensor  # [1, 77, C] float32 (SDXL: [1, 78, C], the pooled vector packed as a last row)
    deltas: dict[str, torch.Tensor]  # UNet parameter name -> learned - original, float16
    model_identity: str
    finetune: dict
    width: int
    height: int
    image_sha256: str = ""
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0
    caption: str | None = None  # the BLIP caption the source prompt came from, if any
    family: str = "sd1"  # the model family it was made on (fastimagic.families); tunings saved before it: sd1

    @property
    def trained_names(self) -> list[str]:
        return list(self.deltas)

    @property
    def trained_parameters(self) -> int:
        return sum(t.numel() for t in self.deltas.values())

    def metadata(self) -> dict:
        """Everything but the tensors, JSON-ready."""
        return {
            "format": FORMAT_VERSION,
            "key": self.key,
            "source_prompt": self.source_prompt,
            "caption": self.caption,
            "model_identity": self.model_identity,
            "family": self.family,
            "finetune": self.finetune,
            "width": self.width,
            "height": self.height,
            "image_sha256": self.image_sha256,
            "losses": self.losses,
            "steps_run": len(self.losses),
            "seconds": round(self.seconds, 3),
            "trained_tensors": len(self.deltas),
            "trained_parameters": self.trained_parameters,
        }

    def file_tensors(self) -> dict[str, torch.Tensor]:
        """The tensors of the weights file, by their names there: e_src (float32) and each delta (float16)."""
        return {_EMBEDDING: self.source_embedding.float()} | {
            _DELTA + n: t.to(torch.float16) for n, t in self.deltas.items()
        }

    def to_files(self) -> dict[str, bytes | mmap.mmap]:
        """The artifact as ``{file name: bytes}``, in the order to write them (metadata last).

        The weights file comes as an anonymous memory map (:func:`safetensors_bytes`): bytes-like, and a readable
        file for an upload.
        """
        weights = safetensors_bytes(self.file_tensors())
        digest = hashlib.sha256(weights).hexdigest()
        name = f"weights-{digest[:16]}.safetensors"
        meta = self.metadata() | {"weights_file": name, "weights_sha256": digest}
        return {name: weights, META_FILE: json.dumps(meta, indent=2).encode()}

    @classmethod
    def read(cls, get_bytes: Callable[[str], bytes | mmap.mmap], where: str = "tuning") -> Tuning:
        """Rebuild a Tuning from files fetched by ``get_bytes(name)`` (any storage backend, or
        :meth:`to_files`' own dictionary).

        Raises :class:`CorruptTuning` when the metadata is unreadable or the weights do not match their SHA-256;
        a missing file propagates as ``get_bytes`` raises it.
        """
        from safetensors.torch import load

        try:
            meta = json.loads(get_bytes(META_FILE))
            name = meta["weights_file"]
        except (KeyError, ValueError, TypeError) as e:
            raise CorruptTuning(f"{where}: unreadable tuning metadata ({e})") from None
        if meta.get("format") != FORMAT_VERSION:
            raise CorruptTuning(f"{where}: tuning format {meta.get('format')} is not {FORMAT_VERSION}")
        weights = get_bytes(name)
        if hashlib.sha256(weights).hexdigest() != meta.get("weights_sha256"):
            raise CorruptTuning(f"{where}: {name} does not match its recorded SHA-256 (corrupted)")
        try:
            tensors = load(weights if isinstance(weights, bytes) else bytes(weights))
        except Exception as e:
            raise CorruptTuning(f"{where}: unreadable weights ({e})") from None
        return cls(
            key=meta["key"],
            source_prompt=meta["source_prompt"],
            caption=meta.get("caption"),
            source_embedding=tensors.pop(_EMBEDDING),
            deltas={k[len(_DELTA) :]: v for k, v in tensors.items()},
            model_identity=meta["model_identity"],
            family=meta.get("family", "sd1"),
            finetune=meta["finetune"],
            width=meta["width"],
            height=meta["height"],
            image_sha256=meta.get("image_sha256", ""),
            losses=list(meta.get("losses", [])),
            seconds=float(meta.get("seconds", 0.0)),
        )


def safetensors_bytes(tensors: dict[str, torch.Tensor]) -> mmap.mmap:
    """``tensors`` (float32 or float16) as a safetensors file, byte for byte what ``safetensors.torch.save`` makes
    of them: the tensors ordered by element size, then name, after a JSON header padded with spaces to 8 bytes.

    ``save`` copies every tensor into Python bytes and joins them, holding Python's lock throughout: up to 3.5 s for an
    SD 1.5 tuning (1.18 GB) on a 2-core machine, during which a sampler on another thread launches no kernels.
    Here torch copies the tensors into an anonymous memory map (allocated untouched) and lets go of the lock while
    it does. The map is bytes-like (a hash, a file's ``write``) and a file (``read``, ``seek``) for an upload.
    """
    order = sorted(tensors, key=lambda name: (-tensors[name].element_size(), name))
    header, size = {}, 0
    for name in order:
        t = tensors[name]
        if t.dtype not in _SAFETENSORS_DTYPES:
            raise TypeError(f"safetensors_bytes: {name} is {t.dtype}; a tuning holds float32 and float16 only")
        nbytes = t.numel() * t.element_size()
        dtype, shape = _SAFETENSORS_DTYPES[t.dtype], list(t.shape)
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [size, size + nbytes]}
        size += nbytes
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    start = 8 + len(head)
    out = mmap.mmap(-1, start + size)
    out[:start] = len(head).to_bytes(8, "little") + head
    flat = torch.frombuffer(out, dtype=torch.uint8, offset=start, count=size) if size else None
    for name in order:
        lo, hi = header[name]["data_offsets"]
        if hi > lo:
            flat[lo:hi].copy_(tensors[name].detach().cpu().contiguous().reshape(-1).view(torch.uint8))
    del flat  # the map can only be closed once no tensor views it
    return out
