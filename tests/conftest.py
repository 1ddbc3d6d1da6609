"""Shared fixtures: the tiny model, one fine-tune on a real photo, reference images. Nothing is downloaded."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile

import pytest
from s3server import S3Server, point_env_at, start_s3_server

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

# Prefect: its own embedded server and database in a temporary home, nothing sent anywhere. Set before any test
# module imports prefect (settings are read at import).
_PREFECT_HOME = tempfile.mkdtemp(prefix="fastimagic-prefect-")
atexit.register(shutil.rmtree, _PREFECT_HOME, True)
os.environ["PREFECT_HOME"] = _PREFECT_HOME
os.environ.pop("PREFECT_API_URL", None)
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"] = "180"
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")

from fastimagic.tiny import drawn_photo, reference_photo_bytes  # noqa: E402,F401  (tests import them from here)


@pytest.fixture(scope="session")
def photo_bytes() -> bytes:
    return reference_photo_bytes()


@pytest.fixture(scope="session")
def photo(photo_bytes):
    from fastimagic.images import load_reference

    return load_reference(photo_bytes, "photo")


@pytest.fixture(scope="session")
def tiny_model():
    from fastimagic.models import load_base_model

    return load_base_model("tiny", device="cpu")


@pytest.fixture(scope="session")
def tuning(tiny_model, photo, photo_bytes):
    import hashlib

    from fastimagic.finetuning import FinetuneConfig, finetune

    return finetune(
        tiny_model,
        photo,
        "a photo of a bird",
        FinetuneConfig(),
        width=64,
        height=64,
        image_sha256=hashlib.sha256(photo_bytes).hexdigest(),
    )


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory):
    """A real SeaweedFS S3 server on loopback with enforced credentials (started once, stopped by PID)."""
    server = start_s3_server(tmp_path_factory.mktemp("seaweedfs"))
    yield server
    server.close()


@pytest.fixture
def s3_env(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> str:
    """AWS_* variables pointing at the test server; returns a fresh bucket's name."""
    point_env_at(s3_server, monkeypatch)
    return s3_server.make_bucket()
