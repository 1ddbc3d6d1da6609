"""Which database the embedded Prefect server of a local run (``fastimagic run``) writes to.

Prefect keeps the history of local runs in one SQLite file under ``PREFECT_HOME`` (``prefect.db``). SQLite lets
one writer in at a time; Prefect's server waits up to 60 s for a locked database and then fails the request, and
Prefect recommends SQLite for a single server. Two local runs at once are two embedded servers, two writers on
one file, so:

* the first local run takes an advisory lock next to that file (``prefect.db.fastimagic-lock``; the system drops
  it when the process ends, however it ends) and its server uses the shared database as before;
* a run that starts while another holds it gives its own server a database of its own,
  ``PREFECT_HOME/fastimagic-runs/<pid>-<random>/prefect.db``, deleted when it ends. Its keyframes, manifest and
  index are written as always; only Prefect's record of that run (the UI's flow run and its logs) goes with it;
* a folder there that no process holds (a run that was killed) is deleted by the next local run.

A database you set yourself (``PREFECT_SERVER_DATABASE_CONNECTION_URL`` or ``PREFECT_API_DATABASE_CONNECTION_URL``,
in the environment or a Prefect profile), a database that is not SQLite, and a Prefect server of your own
(``PREFECT_API_URL``: one server, any number of runs) are left as they are.
"""

from __future__ import annotations

import atexit
import fcntl
import os
import shutil
import uuid
from pathlib import Path

_SQLITE = "sqlite+aiosqlite:///"
PRIVATE_FOLDER = "fastimagic-runs"
LOCK_SUFFIX = ".fastimagic-lock"
# Lock files held for the life of this process (closing one would drop its lock).
_HELD: list[int] = []


def _lock(path: Path) -> int | None:
    """An exclusive advisory lock on ``path`` (created if missing), or None when another process holds it."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def _sweep(root: Path) -> None:
    """Delete the private databases of runs that ended without deleting theirs (killed): no process holds them."""
    if not root.is_dir():
        return
    for folder in root.iterdir():
        lock_file = folder / "lock"
        if not lock_file.is_file():  # being created this instant (its lock comes next), or not ours: left alone
            continue
        try:
            fd = _lock(lock_file)
        except OSError:  # deleted meanwhile by another run's sweep
            continue
        if fd is None:  # a live run's
            continue
        try:
            shutil.rmtree(folder, ignore_errors=True)
        finally:
            os.close(fd)


def _own_database(root: Path) -> Path:
    """A new folder under ``root`` for this process's database, locked for as long as the process lives."""
    while True:
        folder = root / f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
        folder.mkdir(parents=True)
        fd = _lock(folder / "lock")
        # Another run's sweep may have taken the folder between its lock file's creation and our lock: start over.
        if fd is not None and os.fstat(fd).st_nlink > 0:
            _HELD.append(fd)
            return folder
        if fd is not None:
            os.close(fd)


def runs_on_embedded_server() -> bool:
    """Whether a local run's flow talks to an embedded Prefect server this process starts: not with a Prefect
    server of your own (``PREFECT_API_URL``) or with the embedded server turned off."""
    from prefect.settings import get_current_settings

    settings = get_current_settings()
    return not settings.api.url and settings.server.ephemeral.enabled


def choose_database() -> Path | None:
    """Decide, before the embedded server starts, which database it uses (see the module's text). Returns the
    path of this run's own database when it gets one, else None (the shared one, or a database set by you)."""
    from prefect.settings import get_current_settings

    if not runs_on_embedded_server():
        return None
    database = get_current_settings().server.database
    if "connection_url" in database.model_fields_set:
        return None  # set by you
    url = database.connection_url.get_secret_value() if database.connection_url else ""
    if not url.startswith(_SQLITE):
        return None
    own = claim(Path(url[len(_SQLITE):]))
    if own is not None:
        # The server process reads it from the environment it inherits (Prefect passes this process's on).
        os.environ["PREFECT_SERVER_DATABASE_CONNECTION_URL"] = _SQLITE + str(own)
    return own


def claim(shared: Path) -> Path | None:
    """Lock the shared SQLite database ``shared`` for this process and return None, or, when another process
    holds it, return a new database path of this process's own (deleted at exit). Sweeps first."""
    shared.parent.mkdir(parents=True, exist_ok=True)
    root = shared.parent / PRIVATE_FOLDER
    _sweep(root)
    fd = _lock(shared.with_name(shared.name + LOCK_SUFFIX))
    if fd is not None:
        _HELD.append(fd)
        return None
    folder = _own_database(root)
    # Registered before the server starts: exit handlers run last in, first out, so Prefect's stops the server
    # (registered when it starts) before this one deletes the database under it.
    atexit.register(shutil.rmtree, folder, True)
    return folder / "prefect.db"
