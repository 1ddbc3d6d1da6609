"""Where keyframes and tunings are kept: one small interface over a local folder or S3-compatible storage.

The same flow writes to either: ``open_store("out/")`` gives a :class:`LocalStore`, ``open_store("s3://bucket/run")``
an :class:`S3Store` (AWS S3, MinIO, SeaweedFS). Keys are relative ``/``-separated paths; :func:`safe_key` checks every
key so none can escape the store's root. Errors are :class:`StoreError` lines that name the URI and what is wrong,
and never carry a secret.

This module never imports prefect: the Prefect layer turns a credentials block into a ``boto3.Session`` and passes it
as ``session=``.
"""

from __future__ import annotations

import abc
import hashlib
import mimetypes
import mmap
import os
import re
import secrets
import threading
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from fastimagic.config import BUCKET_RULE, bucket_problem, special_file, split_s3
from fastimagic.errors import FastImagicError, InputError

__all__ = [
    "LocalStore",
    "NotAFile",
    "NotFound",
    "S3Store",
    "Store",
    "StoreError",
    "TooLarge",
    "open_store",
    "read_uri",
    "safe_key",
    "split_s3_uri",
]

# Temporary files of an atomic local write end with this; list() hides them.
_TMP_SUFFIX = ".fastimagic-tmp"
# SigV4 presigned URLs live at most 7 days.
_MAX_URL_EXPIRES_S = 7 * 24 * 3600
_KEY_RULE = "keys are relative paths of non-empty '/'-separated segments, without '..', '.', '\\' or control characters"


class StoreError(FastImagicError):
    """A storage failure, explained in one line: the URI, then what is wrong. Never contains a secret."""


class NotAFile(StoreError, InputError):
    """The path names a folder, FIFO, device or socket, not a regular file; nothing was read (bad input: exit 2)."""


class TooLarge(StoreError, InputError):
    """The object or file is larger than the caller's limit; it was not read (bad input: exit 2)."""


class NotFound(StoreError, KeyError):
    """The key (or file) does not exist. Also a ``KeyError``, so ``except KeyError`` works."""

    def __str__(self) -> str:
        # KeyError.__str__ would wrap the message in quotes.
        return str(self.args[0]) if self.args else ""


# ---------------------------------------------------------------------------------------------------------------
# keys and names


def safe_key(key: str, *, where: str = "") -> str:
    """Return ``key`` unchanged if it is a safe relative key, else raise :class:`StoreError`.

    A safe key is a relative path of non-empty ``/``-separated segments: no leading ``/``, no ``.`` or ``..``
    segment, no ``//`` or trailing ``/``, no backslash, no NUL or other control character. ``where`` (a store URI)
    starts the error message when given.
    """
    prefix = f"{where}: " if where else ""
    if not isinstance(key, str):
        raise StoreError(f"{prefix}key must be a string, got {type(key).__name__}")
    shown = ascii(key)  # control characters shown escaped, so the message stays one line
    if not key:
        raise StoreError(f"{prefix}empty key: {_KEY_RULE}")
    if key.startswith("/"):
        raise StoreError(f"{prefix}key {shown} is absolute: {_KEY_RULE}")
    if "\\" in key:
        raise StoreError(f"{prefix}key {shown} contains a backslash: {_KEY_RULE}")
    if any(ord(c) < 32 or ord(c) == 127 for c in key):
        raise StoreError(f"{prefix}key {shown} contains a control character: {_KEY_RULE}")
    for segment in key.split("/"):
        if segment in ("", ".", ".."):
            what = "an empty segment" if not segment else f"a '{segment}' segment"
            raise StoreError(f"{prefix}key {shown} has {what}: {_KEY_RULE}")
    return key


def _safe_prefix(prefix: str, *, where: str = "") -> str:
    """A list() prefix: empty, a safe key, or a safe key followed by one '/'."""
    if prefix == "":
        return ""
    if isinstance(prefix, str) and prefix.endswith("/") and len(prefix) > 1:
        return safe_key(prefix[:-1], where=where) + "/"
    return safe_key(prefix, where=where)


def _check_bucket(bucket: str, uri: str) -> str:
    problem = bucket_problem(bucket)
    if problem:
        raise StoreError(f"{uri}: bucket {bucket!r} {problem}; {BUCKET_RULE}")
    return bucket


def split_s3_uri(uri: str) -> tuple[str, str]:
    """Split ``s3://bucket/key`` into ``(bucket, key)``; the key may be empty (``s3://bucket``).

    Raises :class:`StoreError` naming the URI if it is not ``s3://`` or the bucket name breaks S3's naming rules
    (:func:`fastimagic.config.split_s3`, the rule the storyboard schema applies too). The key is returned as
    written (a trailing ``/`` is kept); callers check it with :func:`safe_key`.
    """
    if not isinstance(uri, str):
        raise StoreError(f"{uri}: not an S3 URI, expected s3://bucket/prefix")
    try:
        return split_s3(uri)
    except ValueError as e:
        raise StoreError(f"{uri}: {e}") from None


# ---------------------------------------------------------------------------------------------------------------
# the interface

Bytes = bytes | bytearray | memoryview | mmap.mmap  # what put_bytes takes (and checks, isinstance takes a union)


class Store(abc.ABC):
    """A flat map of safe keys to bytes under one root URI.

    Implementations: :class:`LocalStore` (a folder) and :class:`S3Store` (a bucket prefix). Every method checks its
    key with :func:`safe_key`, so no key reaches outside the root.
    """

    uri: str

    @abc.abstractmethod
    def put_bytes(self, key: str, data: Bytes, content_type: str | None = None) -> None:
        """Write ``data`` at ``key``, replacing any object there. Atomic: readers see the old or the new bytes."""

    @abc.abstractmethod
    def get_bytes(self, key: str, max_bytes: int | None = None) -> bytes:
        """Return the bytes at ``key``; raise :class:`NotFound` if there are none. ``max_bytes``: refuse a larger
        object (:class:`TooLarge`) without reading it, and locally anything but a regular file."""

    @abc.abstractmethod
    def exists(self, key: str) -> bool:
        """Whether an object exists at ``key``."""

    @abc.abstractmethod
    def list(self, prefix: str = "") -> list[str]:
        """Keys (relative to this store's root) that start with ``prefix``, sorted."""

    @abc.abstractmethod
    def delete(self, key: str) -> None:
        """Remove the object at ``key``; no error if it is already gone."""

    @abc.abstractmethod
    def url(self, key: str, expires: int = 3600) -> str:
        """A URL a reader can fetch ``key`` from: ``file://`` locally, a presigned GET valid ``expires`` s on S3."""

    @abc.abstractmethod
    def child(self, prefix: str) -> Store:
        """A store rooted at ``prefix`` (a safe key) under this one."""

    @abc.abstractmethod
    def check(self) -> None:
        """Fail fast with a :class:`StoreError` line if this store cannot be written (before any long work)."""

    def _key(self, key: str) -> str:
        return safe_key(key, where=self.uri)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.uri!r})"

    def listdir(self, prefix: str = "") -> list[str]:
        """The immediate entries of the "folder" ``prefix`` (``""``: the root), sorted: object names, and
        sub-folder names ending in ``/`` (``["manifest.json", "scenes/"]``). Names are relative to ``prefix``.

        A missing folder lists as ``[]``. This fallback derives the answer from a full :meth:`list` of the folder;
        :class:`LocalStore` and :class:`S3Store` read one level only (a delimiter listing).
        """
        folder = _folder_prefix(prefix, where=self.uri)
        names = set()
        for key in self.list(folder):
            first, sep, _ = key[len(folder) :].partition("/")
            names.add(first + sep)
        return sorted(names)

    def root_exists(self) -> bool:
        """Whether this store's root exists (a folder, or a bucket); raise :class:`StoreError` if it cannot tell."""
        raise NotImplementedError(f"{type(self).__name__} cannot tell whether its root exists")


def _folder_prefix(prefix: str, *, where: str = "") -> str:
    """A listdir() folder: ``""`` (the root) or a safe key, returned with one trailing ``/``."""
    if prefix in ("", "/"):
        return ""
    return safe_key(prefix.rstrip("/") if isinstance(prefix, str) else prefix, where=where) + "/"


def _check_expires(expires: int, where: str) -> int:
    if isinstance(expires, bool) or not isinstance(expires, int) or not 1 <= expires <= _MAX_URL_EXPIRES_S:
        raise StoreError(f"{where}: url expiry must be 1..{_MAX_URL_EXPIRES_S} seconds, got {expires!r}")
    return expires


# ---------------------------------------------------------------------------------------------------------------
# local folder


class LocalStore(Store):
    """A store in a local folder. ``uri`` is the folder's absolute path. The folder is created on first write."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root).expanduser().absolute()
        self.uri = str(self.root)

    def remove_temporaries(self, prefix: str) -> int:
        """Delete what interrupted atomic writes left under the folder ``prefix`` (a process killed mid-write);
        returns how many. Only for a folder no live writer uses, e.g. a run being resumed."""
        folder = self._path(prefix.rstrip("/"))
        count = 0
        for path in folder.rglob(f"*{_TMP_SUFFIX}") if folder.is_dir() else ():
            path.unlink(missing_ok=True)
            count += 1
        return count

    def _path(self, key: str) -> Path:
        return self.root.joinpath(*self._key(key).split("/"))

    def _fail(self, key: str, action: str, exc: OSError) -> StoreError:
        reason = exc.strerror or type(exc).__name__
        return StoreError(f"{self.uri}: cannot {action} {key!r} ({reason})")

    def put_bytes(self, key: str, data: Bytes, content_type: str | None = None) -> None:
        """Write ``data`` at ``key`` atomically (temp file in the same folder, fsync, rename).

        ``content_type`` is ignored locally (the file name's suffix says it).
        """
        path = self._path(key)
        if not isinstance(data, Bytes):
            raise StoreError(f"{self.uri}: put_bytes({key!r}) needs bytes, got {type(data).__name__}")
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}{_TMP_SUFFIX}")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, path)
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise
            _fsync_dir(path.parent)
        except OSError as exc:
            raise self._fail(key, "write", exc) from exc

    def get_bytes(self, key: str, max_bytes: int | None = None) -> bytes:
        """Return the bytes at ``key``; raise :class:`NotFound` if there is no such file. ``max_bytes``: see
        :meth:`Store.get_bytes` (a FIFO or device is refused, never read)."""
        path = self._path(key)
        if max_bytes is not None:
            return read_local(path, max_bytes=max_bytes, shown=f"{self.uri.rstrip('/')}/{key}")
        try:
            return path.read_bytes()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError) as exc:
            raise NotFound(f"{self.uri}: no object at key {key!r}") from exc
        except OSError as exc:
            raise self._fail(key, "read", exc) from exc

    def exists(self, key: str) -> bool:
        """Whether a file exists at ``key``."""
        return self._path(key).is_file()

    def list(self, prefix: str = "") -> list[str]:
        """Keys starting with ``prefix`` (plain string prefix, as on S3), sorted; temp files are hidden."""
        prefix = _safe_prefix(prefix, where=self.uri)
        # Walk only the deepest folder the prefix names.
        folder = prefix.rpartition("/")[0]
        top = self.root.joinpath(*folder.split("/")) if folder else self.root
        keys: list[str] = []
        if not top.is_dir():
            return keys
        for dirpath, dirnames, filenames in os.walk(top, onerror=None):
            dirnames.sort()
            rel_dir = Path(dirpath).relative_to(self.root).as_posix()
            for name in filenames:
                if name.endswith(_TMP_SUFFIX):
                    continue
                key = name if rel_dir == "." else f"{rel_dir}/{name}"
                if key.startswith(prefix):
                    keys.append(key)
        return sorted(keys)

    def delete(self, key: str) -> None:
        """Remove the file at ``key``; no error if it is already gone. Empty folders are left in place."""
        try:
            self._path(key).unlink(missing_ok=True)
        except IsADirectoryError:
            pass  # a folder is not an object: nothing to delete
        except OSError as exc:
            raise self._fail(key, "delete", exc) from exc

    def url(self, key: str, expires: int = 3600) -> str:
        """The ``file://`` URL of ``key`` (``expires`` is checked but a file URL does not expire)."""
        _check_expires(expires, self.uri)
        return self._path(key).as_uri()

    def child(self, prefix: str) -> LocalStore:
        """A store rooted at the sub-folder ``prefix``."""
        sub = _safe_prefix(prefix, where=self.uri).rstrip("/")
        if not sub:
            raise StoreError(f"{self.uri}: child() needs a non-empty prefix: {_KEY_RULE}")
        return LocalStore(self._path(sub))

    def check(self) -> None:
        """Create the folder if needed and prove it is writable, or raise a :class:`StoreError` line."""
        if self.root.exists() and not self.root.is_dir():
            raise StoreError(f"{self.uri}: exists but is not a folder")
        probe = self.root / f".check.{secrets.token_hex(6)}{_TMP_SUFFIX}"
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as exc:
            reason = exc.strerror or type(exc).__name__
            raise StoreError(f"{self.uri}: folder is not writable ({reason})") from exc

    def listdir(self, prefix: str = "") -> list[str]:
        """The files and sub-folders (names ending in ``/``) directly in the folder ``prefix``, sorted; one
        ``scandir`` of that folder only. Temp files are hidden; a missing folder lists as ``[]``."""
        folder = _folder_prefix(prefix, where=self.uri)
        top = self.root.joinpath(*folder.rstrip("/").split("/")) if folder else self.root
        names: list[str] = []
        try:
            with os.scandir(top) as entries:
                for entry in entries:
                    if entry.is_dir(follow_symlinks=False):
                        names.append(entry.name + "/")
                    elif not entry.name.endswith(_TMP_SUFFIX):
                        names.append(entry.name)
        except (FileNotFoundError, NotADirectoryError):
            return []
        except OSError as exc:
            raise self._fail(folder or ".", "list", exc) from exc
        return sorted(names)

    def root_exists(self) -> bool:
        """Whether the folder exists (a file at the path is not a folder: ``False``)."""
        return self.root.is_dir()


def _fsync_dir(folder: Path) -> None:
    # Makes the rename durable; some filesystems cannot open folders, and that only costs durability.
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------------------------------------------
# S3-compatible storage

_DENIED_CODES = {"403", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "Forbidden", "AllAccessDisabled"}
_NO_BUCKET_CODES = {"NoSuchBucket"}
_NO_KEY_CODES = {"404", "NoSuchKey", "NotFound"}


def shown_endpoint(endpoint: str | None) -> str:
    """An endpoint URL fit to print: a ``user:password@`` in it is replaced by ``***@``."""
    return re.sub(r"(?<=://)[^/@]*@", "***@", str(endpoint)) if endpoint else str(endpoint)


def _s3_error(exc: Exception, where: str, bucket: str, endpoint: str, action: str) -> StoreError:
    """Map a botocore exception to a one-line StoreError (never containing a secret)."""
    from botocore import exceptions as bce

    endpoint = shown_endpoint(endpoint)

    if isinstance(exc, (bce.EndpointConnectionError, bce.ConnectTimeoutError, bce.ConnectionClosedError)):
        return StoreError(f"{where}: cannot reach S3 endpoint {endpoint} ({type(exc).__name__} while {action})")
    if isinstance(exc, bce.ReadTimeoutError):
        return StoreError(f"{where}: S3 endpoint {endpoint} did not answer in time while {action}")
    if isinstance(exc, (bce.NoCredentialsError, bce.PartialCredentialsError)):
        return StoreError(f"{where}: no S3 credentials found: set AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY")
    if isinstance(exc, bce.ClientError):
        err = exc.response.get("Error", {})
        code = str(err.get("Code", ""))
        if code in _DENIED_CODES:
            return StoreError(f"{where}: access denied while {action}: check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY")
        if code in _NO_BUCKET_CODES:
            return StoreError(f"{where}: bucket {bucket!r} does not exist")
        message = str(err.get("Message", "")).splitlines()[0] if err.get("Message") else ""
        if not code or code.isdigit():  # an HTTP status with no S3 error document: probably not an S3 server
            return StoreError(
                f"{where}: {endpoint} answered HTTP {code or '?'} with no S3 error while {action}: is it an S3 server?"
                " (check AWS_ENDPOINT_URL / AWS_ENDPOINT_URL_S3)"
            )
        return StoreError(f"{where}: S3 error {code or '?'} while {action}" + (f": {message}" if message else ""))
    if isinstance(exc, bce.BotoCoreError):
        return StoreError(f"{where}: S3 client error while {action} ({type(exc).__name__})")
    return StoreError(f"{where}: unexpected error while {action} ({type(exc).__name__})")


class S3Store(Store):
    """A store under ``s3://bucket/prefix``, using a ready boto3 S3 ``client`` (build one with :func:`open_store`).

    ``check_client`` (optional) is used by :meth:`check` only: a client that gives up quickly, so a wrong endpoint
    fails in seconds rather than after the full retry budget of the main client.
    """

    def __init__(self, bucket: str, prefix: str, client: Any, *, check_client: Any = None) -> None:
        prefix = prefix.strip("/") if prefix else ""
        shown = f"s3://{bucket}/{prefix}" if prefix else f"s3://{bucket}"
        self.bucket = _check_bucket(bucket, shown)
        if prefix:
            safe_key(prefix, where=shown)
        self.prefix = f"{prefix}/" if prefix else ""  # "" or "a/b/"
        self.client = client
        self.check_client = check_client
        self.uri = shown

    @property
    def endpoint(self) -> str:
        """The endpoint URL the client talks to."""
        return shown_endpoint(getattr(self.client.meta, "endpoint_url", "") or "default AWS endpoint")

    def _err(self, exc: Exception, action: str) -> StoreError:
        return _s3_error(exc, self.uri, self.bucket, self.endpoint, action)

    def _full(self, key: str) -> str:
        return self.prefix + self._key(key)

    def put_bytes(self, key: str, data: Bytes, content_type: str | None = None) -> None:
        """Upload ``data`` at ``key`` (one PUT: S3 objects appear whole or not at all).

        ``content_type`` defaults to a guess from the key's suffix, else ``application/octet-stream``. A memory map
        (a tuning's weights, :func:`fastimagic.tuning.safetensors_bytes`) is sent as the file it also is, read in
        pieces rather than copied whole first.
        """
        full = self._full(key)
        if not isinstance(data, Bytes):
            raise StoreError(f"{self.uri}: put_bytes({key!r}) needs bytes, got {type(data).__name__}")
        content_type = content_type or mimetypes.guess_type(key)[0] or "application/octet-stream"
        try:
            if isinstance(data, mmap.mmap):
                data.seek(0)  # boto reads it as a file, from where it stands
            body = bytes(data) if isinstance(data, memoryview) else data  # boto takes no view
            self.client.put_object(Bucket=self.bucket, Key=full, Body=body, ContentType=content_type)
        except Exception as exc:
            raise self._err(exc, f"writing {key!r}") from exc

    def get_bytes(self, key: str, max_bytes: int | None = None) -> bytes:
        """Download the bytes at ``key``; raise :class:`NotFound` if there is no such object. ``max_bytes``: see
        :meth:`Store.get_bytes`."""
        full = self._full(key)
        try:
            response = self.client.get_object(Bucket=self.bucket, Key=full)
            if max_bytes is None:
                return response["Body"].read()
            data = response["Body"].read(max_bytes + 1)
            if len(data) > max_bytes:
                response["Body"].close()
                raise TooLarge(f"{self.uri.rstrip('/')}/{key}: is more than the limit of {max_bytes:,} bytes")
            return data
        except StoreError:
            raise
        except Exception as exc:
            if _client_code(exc) in _NO_KEY_CODES:
                raise NotFound(f"{self.uri}: no object at key {key!r}") from exc
            raise self._err(exc, f"reading {key!r}") from exc

    def exists(self, key: str) -> bool:
        """Whether an object exists at ``key`` (a HEAD request)."""
        full = self._full(key)
        try:
            self.client.head_object(Bucket=self.bucket, Key=full)
            return True
        except Exception as exc:
            if _client_code(exc) in _NO_KEY_CODES:
                return False
            raise self._err(exc, f"checking {key!r}") from exc

    def list(self, prefix: str = "") -> list[str]:
        """Keys starting with ``prefix`` (relative to this store's prefix), sorted."""
        prefix = _safe_prefix(prefix, where=self.uri)
        keys: list[str] = []
        try:
            pages = self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=self.prefix + prefix
            )
            for page in pages:
                for obj in page.get("Contents", []):
                    key = obj["Key"][len(self.prefix) :]
                    if key and not key.endswith("/"):  # skip folder markers some tools create
                        keys.append(key)
        except Exception as exc:
            raise self._err(exc, f"listing {prefix!r}") from exc
        return sorted(keys)

    def delete(self, key: str) -> None:
        """Delete the object at ``key``; no error if it is already gone."""
        full = self._full(key)
        try:
            self.client.delete_object(Bucket=self.bucket, Key=full)
        except Exception as exc:
            raise self._err(exc, f"deleting {key!r}") from exc

    def url(self, key: str, expires: int = 3600) -> str:
        """A presigned GET URL for ``key``, valid ``expires`` seconds (1 s to 7 days). Does not check existence."""
        full = self._full(key)
        _check_expires(expires, self.uri)
        try:
            return self.client.generate_presigned_url(
                "get_object", Params={"Bucket": self.bucket, "Key": full}, ExpiresIn=expires
            )
        except Exception as exc:
            raise self._err(exc, f"signing a URL for {key!r}") from exc

    def child(self, prefix: str) -> S3Store:
        """A store at ``s3://bucket/<prefix>/<sub-prefix>`` sharing this store's client."""
        sub = _safe_prefix(prefix, where=self.uri).rstrip("/")
        if not sub:
            raise StoreError(f"{self.uri}: child() needs a non-empty prefix: {_KEY_RULE}")
        return S3Store(self.bucket, self.prefix + sub, self.client, check_client=self.check_client)

    def check(self) -> None:
        """HEAD the bucket: raise a :class:`StoreError` line if the endpoint, credentials or bucket are wrong."""
        try:
            (self.check_client or self.client).head_bucket(Bucket=self.bucket)
        except Exception as exc:
            if _client_code(exc) in {"404", "NoSuchBucket", "NotFound"}:
                headers = getattr(exc, "response", {}).get("ResponseMetadata", {}).get("HTTPHeaders", {})
                if not any(h.lower().startswith("x-amz-") for h in headers):  # every S3 server sends a request id
                    client = self.check_client or self.client
                    raise StoreError(
                        f"{self.uri}: the endpoint {shown_endpoint(str(client.meta.endpoint_url))} answered like a"
                        " plain web server, not S3 (no x-amz- headers); check AWS_ENDPOINT_URL") from exc
                raise StoreError(f"{self.uri}: bucket {self.bucket!r} does not exist") from exc
            raise self._err(exc, "checking the bucket") from exc

    def listdir(self, prefix: str = "") -> list[str]:
        """The objects and "sub-folders" (common prefixes, names ending in ``/``) directly under ``prefix``, sorted:
        a ``Delimiter='/'`` listing, so objects deeper down are never enumerated. Missing prefix: ``[]``."""
        folder = _folder_prefix(prefix, where=self.uri)
        full = self.prefix + folder
        names: list[str] = []
        try:
            pages = self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=full, Delimiter="/"
            )
            for page in pages:
                for common in page.get("CommonPrefixes", []):
                    name = common["Prefix"][len(full) :]
                    if name.strip("/"):
                        names.append(name)
                for obj in page.get("Contents", []):
                    name = obj["Key"][len(full) :]
                    if name and not name.endswith("/"):  # skip folder markers some tools create
                        names.append(name)
        except Exception as exc:
            raise self._err(exc, f"listing {folder or '/'!r}") from exc
        return sorted(names)

    def root_exists(self) -> bool:
        """Whether the bucket exists (a HEAD of the bucket; a prefix always "exists" on S3). Raises a
        :class:`StoreError` line for an unreachable endpoint or refused credentials."""
        try:
            self.client.head_bucket(Bucket=self.bucket)
            return True
        except Exception as exc:
            if _client_code(exc) in {"404", "NoSuchBucket", "NotFound"} and _from_s3(exc):
                return False
            raise self._err(exc, "checking the bucket") from exc


def _from_s3(exc: Exception) -> bool:
    """Whether an error answer came from an S3 server (AWS, MinIO and SeaweedFS send ``x-amz-*`` headers or an S3
    error document), not from some other web server at the endpoint's address."""
    response = getattr(exc, "response", None) or {}
    headers = (response.get("ResponseMetadata") or {}).get("HTTPHeaders") or {}
    code = str((response.get("Error") or {}).get("Code", ""))
    return any(h.lower().startswith("x-amz-") for h in headers) or (bool(code) and not code.isdigit())


def _client_code(exc: Exception) -> str:
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        return str(response.get("Error", {}).get("Code", ""))
    return ""


_CLIENTS: dict[tuple, Any] = {}
_CLIENTS_LOCK = threading.Lock()


def _s3_client(session: Any = None, *, quick: bool = False, where: str = "") -> Any:
    """A boto3 S3 client for S3-compatible servers, one per process for each endpoint, region and credentials.

    Endpoint and region come from the AWS_* variables (``AWS_ENDPOINT_URL_S3``, then ``AWS_ENDPOINT_URL``),
    credentials from ``session`` or the environment. Path-style addressing (MinIO/SeaweedFS need it), SigV4,
    3 s connect / 30 s read timeouts, 5 attempts with standard exponential backoff so uploads ride out a server
    blip. ``quick=True``: 2 attempts and a 10 s read timeout, for fail-fast checks. Clients are thread-safe and
    costly to build, so every task of a worker shares them; the cache key holds a hash of the credentials, never
    the credentials themselves.
    """
    import boto3
    from botocore.config import Config

    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None
    session = session or boto3.session.Session()
    region = session.region_name or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if not region and endpoint:
        region = "us-east-1"  # SigV4 needs some region; S3-compatible servers accept this one
    credentials = session.get_credentials()
    frozen = credentials.get_frozen_credentials() if credentials is not None else None
    who = hashlib.sha256(repr(tuple(frozen) if frozen else None).encode()).hexdigest()
    key = (endpoint, region, quick, who)
    with _CLIENTS_LOCK:
        if key in _CLIENTS:
            return _CLIENTS[key]
    config = Config(
        connect_timeout=3,
        read_timeout=10 if quick else 30,
        retries={"max_attempts": 2 if quick else 5, "mode": "standard"},
        signature_version="s3v4",
        s3={"addressing_style": "path"},
    )
    try:
        client = session.client("s3", endpoint_url=endpoint, region_name=region, config=config)
    except ValueError as exc:  # botocore: "Invalid endpoint: ..." (no scheme, bad port)
        raise StoreError(
            f"{where}: invalid S3 endpoint {shown_endpoint(endpoint)!r} (from AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL): "
            "expected http(s)://host[:port]"
        ) from exc
    with _CLIENTS_LOCK:
        return _CLIENTS.setdefault(key, client)


def _local_path(uri: str) -> Path:
    """A plain path or a file:// URI as a Path (not resolved)."""
    if uri.startswith("file:"):
        parsed = urlparse(uri)
        if parsed.netloc not in ("", "localhost"):
            raise StoreError(f"{uri}: file URIs must name a local path (file:///abs/path), not host {parsed.netloc!r}")
        return Path(unquote(parsed.path))
    return Path(uri).expanduser()


def open_store(uri: str | Path, *, session: Any = None) -> Store:
    """Open the store at ``uri``: ``s3://bucket/prefix`` -> :class:`S3Store`; a path or ``file://`` URI ->
    :class:`LocalStore`.

    For S3, credentials, region and endpoint come from the standard ``AWS_*`` environment variables
    (``AWS_ENDPOINT_URL_S3`` or ``AWS_ENDPOINT_URL`` for MinIO/SeaweedFS), or from ``session``: a ready
    ``boto3.Session`` (the Prefect layer builds one from an AwsCredentials/MinIOCredentials block). Opening does
    no network I/O; call :meth:`Store.check` to fail fast. A malformed URI raises :class:`StoreError`.
    """
    if isinstance(uri, Path):
        return LocalStore(uri)
    if not isinstance(uri, str) or not uri:
        raise StoreError(f"{uri!r}: empty store URI, expected a folder path or s3://bucket/prefix")
    if uri.startswith("s3://"):
        bucket, prefix = split_s3_uri(uri)
        prefix = prefix.rstrip("/")
        if prefix:
            safe_key(prefix, where=uri)
        if session is None:
            import boto3

            session = boto3.session.Session()  # one session: credentials are resolved once for both clients
        client = _s3_client(session, where=uri)
        return S3Store(bucket, prefix, client, check_client=_s3_client(session, quick=True, where=uri))
    if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]+://", uri) and not uri.startswith("file://"):
        raise StoreError(f"{uri}: unsupported store URI scheme, expected a folder path, file:// or s3://bucket/prefix")
    return LocalStore(_local_path(uri))


def inside(path: str, root: str) -> bool:
    """Whether local ``path`` is ``root`` or under it, links followed on both sides."""
    real, top = os.path.realpath(path), os.path.realpath(root)
    return real == top or real.startswith(top.rstrip(os.sep) + os.sep)


class OutsideAllowed(InputError):
    """A local file that, as opened, is not under the folders an operator's policy allows (a link swapped in)."""


def _opened_path(fd: int, path: Path) -> str:
    """Where the file open as ``fd`` really is: the kernel's name for it (Linux), else the path resolved now."""
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return os.path.realpath(path)


def read_local(
    path: Path, *, max_bytes: int | None = None, shown: str | None = None, within: tuple[str, ...] | None = None
) -> bytes:
    """The bytes of a regular file, at most ``max_bytes`` of them. A FIFO, device (``/dev/zero``), socket or folder,
    or a link to one, is refused at once without reading, so nothing blocks or fills memory. ``within``: local
    folders the file must be in *as opened* (an operator's policy): checked on the open file itself, so a link
    swapped in after the policy looked at the path is refused, not followed.

    Raises :class:`NotFound` or :class:`StoreError`; messages start with ``shown`` (default: the path).
    """
    import stat

    shown = shown or str(path)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0))
    except FileNotFoundError as exc:
        raise NotFound(f"{shown}: no such file") from exc
    except IsADirectoryError as exc:
        raise NotAFile(f"{shown}: is a folder, expected a file") from exc
    except OSError as exc:
        raise StoreError(f"{shown}: cannot read ({exc.strerror or type(exc).__name__})") from exc
    info = os.fstat(fd)
    if within is not None and not any(inside(_opened_path(fd, path), root) for root in within):
        os.close(fd)
        raise OutsideAllowed(f"{shown}: refused by the policy: as opened, the file is not under an allowed folder"
                             " (a link that leads elsewhere?)")
    if not stat.S_ISREG(info.st_mode):
        os.close(fd)
        mode = info.st_mode
        if stat.S_ISDIR(mode):
            raise NotAFile(f"{shown}: is a folder, expected a file")
        raise NotAFile(f"{shown}: is {special_file(mode)}, expected a regular file")
    with os.fdopen(fd, "rb") as f:
        if max_bytes is not None and info.st_size > max_bytes:
            raise TooLarge(f"{shown}: is {info.st_size:,} bytes, more than the limit of {max_bytes:,}")
        try:
            data = f.read() if max_bytes is None else f.read(max_bytes + 1)
        except OSError as exc:
            raise StoreError(f"{shown}: cannot read ({exc.strerror or type(exc).__name__})") from exc
    if max_bytes is not None and len(data) > max_bytes:  # it grew while we read
        raise TooLarge(f"{shown}: is more than the limit of {max_bytes:,} bytes")
    return data


def read_uri(
    uri: str | Path, *, base_dir: Path | None = None, session: Any = None, max_bytes: int | None = None,
    within: tuple[str, ...] | None = None,
) -> bytes:
    """Read one whole object: ``s3://bucket/key``, a ``file://`` URI, or a path (relative paths are resolved
    against ``base_dir``, default the current folder). Local paths must be regular files (see :func:`read_local`).
    ``max_bytes``: refuse anything larger, before reading it. ``within``: see :func:`read_local`.

    Raises :class:`NotFound` (a :class:`StoreError`) if it does not exist, and :class:`StoreError` if it is a
    folder, too large or cannot be read; every message starts with ``uri``.
    """
    text = str(uri)
    if text.startswith("s3://"):
        bucket, key = split_s3_uri(text)
        if not key or key.endswith("/"):
            raise StoreError(f"{text}: names a bucket or prefix, expected s3://bucket/key of one object")
        safe_key(key, where=text)
        client = _s3_client(session, where=text)
        endpoint = str(client.meta.endpoint_url)
        try:
            response = client.get_object(Bucket=bucket, Key=key)
            size = response.get("ContentLength")
            if max_bytes is not None and isinstance(size, int) and size > max_bytes:
                response["Body"].close()
                raise TooLarge(f"{text}: is {size:,} bytes, more than the limit of {max_bytes:,}")
            data = response["Body"].read() if max_bytes is None else response["Body"].read(max_bytes + 1)
        except StoreError:
            raise
        except Exception as exc:
            if _client_code(exc) in _NO_KEY_CODES:
                raise NotFound(f"{text}: no such object") from exc
            raise _s3_error(exc, text, bucket, endpoint, "reading") from exc
        if max_bytes is not None and len(data) > max_bytes:
            raise TooLarge(f"{text}: is more than the limit of {max_bytes:,} bytes")
        return data
    if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]+://", text) and not text.startswith("file://"):
        raise StoreError(f"{text}: unsupported URI scheme, expected a path, file:// or s3://bucket/key")
    path = _local_path(text) if isinstance(uri, str) else Path(uri)
    if not path.is_absolute():
        path = (base_dir if base_dir is not None else Path.cwd()) / path
    shown = text if str(path) == text else f"{text} ({path})"
    return read_local(path, max_bytes=max_bytes, shown=shown, within=within)
