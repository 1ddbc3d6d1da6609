"""Create-if-absent writes on a :class:`~fastimagic.store.Store`: the primitive behind "exactly one worker wins".

``create_once(store, key, data)`` writes ``data`` at ``key`` only if no object is there, and tells the caller
whether it was the one that created it. Any number of processes, on any number of machines, may race on the same
key: exactly one gets ``True``.

- Local folder: the bytes go to a temporary file which is then hard-linked to the key's path; ``link(2)`` fails
  atomically if the path exists, and the claim appears whole or not at all. Filesystems without hard links fall
  back to ``open(O_CREAT | O_EXCL)``.
- S3 with conditional writes (AWS S3 since 2024-08, SeaweedFS 4.x, recent MinIO): one ``PutObject`` with
  ``If-None-Match: *``; the server answers 412 to every writer but the first. Support is probed once per endpoint
  and bucket (a server that ignores the header would let everyone win), and the answer is cached.
- S3 without conditional writes: an election. Each contender writes a candidate object under ``<key>.candidates/``
  and lists them; a contender that sees no other live candidate wins and writes ``key``; one that sees others
  withdraws its candidate and loses (and retries a few times after a random pause, so two simultaneous
  contenders do not both give up for long). Winners never withdraw, so a later contender always sees them. This
  is safe as long as a contender's write-and-list takes less than ``stale_s`` (candidates older than that, by the
  server's own clock, are taken as left over from a crashed contender and ignored).

This is deliberately outside the ``Store`` interface for now; ``Store.create_once`` would be its natural home.
"""

from __future__ import annotations

import os
import random
import secrets
import time
from pathlib import Path
from typing import Any

from fastimagic.store import LocalStore, S3Store, Store, StoreError, safe_key

__all__ = ["create_once", "supports_conditional_writes"]

# (endpoint, bucket) -> whether PutObject honours If-None-Match: *
_CONDITIONAL: dict[tuple[str, str], bool] = {}
_CANDIDATES = ".candidates/"


def create_once(store: Store, key: str, data: bytes, *, conditional: bool | None = None,
                stale_s: float = 300.0) -> bool:
    """Write ``data`` at ``key`` unless an object is already there; return whether this call created it.

    ``conditional`` (S3 only): force (True) or forbid (False) conditional writes; default None probes the server.
    ``stale_s``: for the election fallback only, how old (seconds, server clock) another contender's candidate
    must be before it is ignored. Raises :class:`StoreError` for storage trouble (never for "already there").
    """
    safe_key(key, where=store.uri)
    if isinstance(store, LocalStore):
        return _create_local(store, key, bytes(data))
    if isinstance(store, S3Store):
        if conditional is None:
            conditional = supports_conditional_writes(store, near=key)
        if conditional:
            return _put_if_absent(store, key, bytes(data))
        return _elect(store, key, bytes(data), stale_s=stale_s)
    raise StoreError(f"{store.uri}: create_once() supports local folders and S3, not {type(store).__name__}")


# ---------------------------------------------------------------------------------------------------------------
# local folder


def _create_local(store: LocalStore, key: str, data: bytes) -> bool:
    path = store.root.joinpath(*key.split("/"))
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.fastimagic-tmp")  # hidden from Store.list()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "xb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)
            return True
        except FileExistsError:
            return False
        except OSError:  # no hard links here (some network and FUSE filesystems): exclusive create instead
            return _create_exclusive(path, data)
        finally:
            tmp.unlink(missing_ok=True)
    except OSError as exc:
        raise StoreError(f"{store.uri}: cannot create {key!r} ({exc.strerror or type(exc).__name__})") from exc


def _create_exclusive(path: Path, data: bytes) -> bool:
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    except FileExistsError:
        return False
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return True


# ---------------------------------------------------------------------------------------------------------------
# S3


def _code(exc: Exception) -> tuple[str, int]:
    response = getattr(exc, "response", None) or {}
    code = str(response.get("Error", {}).get("Code", ""))
    status = int(response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
    return code, status


def _s3_fail(store: S3Store, action: str, exc: Exception) -> StoreError:
    code, status = _code(exc)
    what = f"S3 error {code or status or type(exc).__name__}"
    return StoreError(f"{store.uri}: {what} while {action} (endpoint {store.endpoint})")


def _put_if_absent(store: S3Store, key: str, data: bytes) -> bool:
    full = store.prefix + key
    for attempt in range(5):
        try:
            store.client.put_object(Bucket=store.bucket, Key=full, Body=data, IfNoneMatch="*",
                                    ContentType="application/json" if key.endswith(".json") else
                                    "application/octet-stream")
            return True
        except Exception as exc:
            code, status = _code(exc)
            if status == 412 or code == "PreconditionFailed":
                return False
            # AWS answers 409 when another conditional write to the key is in flight: ask again, it then says 412.
            if (status == 409 or code == "ConditionalRequestConflict") and attempt < 4:
                time.sleep(0.05 * (attempt + 1))
                continue
            raise _s3_fail(store, f"creating {key!r}", exc) from exc
    return False


def supports_conditional_writes(store: S3Store, near: str = "") -> bool:
    """Whether the server honours ``If-None-Match: *`` on PutObject (probed once per endpoint and bucket).

    The probe writes the same new key twice (the second must be refused) next to ``near`` and deletes it.
    """
    cache_key = (store.endpoint, store.bucket)
    if cache_key in _CONDITIONAL:
        return _CONDITIONAL[cache_key]
    folder = near.rpartition("/")[0]
    probe = store.prefix + (f"{folder}/" if folder else "") + f".conditional-probe-{secrets.token_hex(6)}"
    supported = False
    try:
        store.client.put_object(Bucket=store.bucket, Key=probe, Body=b"1", IfNoneMatch="*")
        try:
            store.client.put_object(Bucket=store.bucket, Key=probe, Body=b"2", IfNoneMatch="*")
        except Exception as exc:
            code, status = _code(exc)
            if not (status == 412 or code == "PreconditionFailed"):
                raise _s3_fail(store, "probing conditional writes", exc) from exc
            supported = True
    except StoreError:
        raise
    except Exception as exc:
        code, status = _code(exc)
        if status not in (400, 501) and code not in ("NotImplemented", "InvalidArgument", "InvalidRequest"):
            raise _s3_fail(store, "probing conditional writes", exc) from exc
    finally:
        try:
            store.client.delete_object(Bucket=store.bucket, Key=probe)
        except Exception:  # noqa: BLE001 - a left-over probe is harmless
            pass
    _CONDITIONAL[cache_key] = supported
    return supported


def _candidates(store: S3Store, prefix: str) -> list[dict[str, Any]]:
    try:
        pages = store.client.get_paginator("list_objects_v2").paginate(Bucket=store.bucket, Prefix=prefix)
        return [obj for page in pages for obj in page.get("Contents", [])]
    except Exception as exc:
        raise _s3_fail(store, f"listing {prefix!r}", exc) from exc


def _elect(store: S3Store, key: str, data: bytes, *, stale_s: float, rounds: int = 3) -> bool:
    full = store.prefix + key
    prefix = full + _CANDIDATES
    for round_ in range(rounds):
        if store.exists(key):
            return False
        mine = f"{prefix}{time.time_ns():020d}-{secrets.token_hex(8)}"
        try:
            store.client.put_object(Bucket=store.bucket, Key=mine, Body=b"")
        except Exception as exc:
            raise _s3_fail(store, f"writing a candidate for {key!r}", exc) from exc
        objects = _candidates(store, prefix)
        own = next((o for o in objects if o["Key"] == mine), None)
        if own is None:  # a strongly consistent store lists what was just written; anything else is unsafe
            raise StoreError(f"{store.uri}: candidate for {key!r} not listed right after writing it: "
                             "this S3 server's listings are not consistent enough for claims")
        others = [o for o in objects if o["Key"] != mine
                  and (own["LastModified"] - o["LastModified"]).total_seconds() < stale_s]
        if not others:
            store.put_bytes(key, data)
            return True
        store.delete(mine[len(store.prefix):])
        if round_ + 1 < rounds:
            time.sleep(random.uniform(0.05, 0.3))
    return False
