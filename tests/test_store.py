"""fastimagic.store against a local folder and a real S3 server (SeaweedFS on loopback, no mocks)."""

from __future__ import annotations

import os
import urllib.request
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import boto3
import pytest
from s3server import S3Server, free_ports

from fastimagic.store import (
    LocalStore,
    NotFound,
    S3Store,
    StoreError,
    open_store,
    read_uri,
    safe_key,
    split_s3_uri,
)


@pytest.fixture(params=["local", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path):
    if request.param == "local":
        return open_store(str(tmp_path / "out"))
    bucket = request.getfixturevalue("s3_env")
    return open_store(f"s3://{bucket}/run-1")


def test_roundtrip_put_get_exists_list_delete_child(store):
    assert store.list() == []
    store.put_bytes("b.png", b"\x89PNG", content_type="image/png")
    store.put_bytes("scene-1/kf-0.png", b"zero")
    store.put_bytes("scene-1/kf-1.png", b"one")
    store.put_bytes("scene-10/kf-0.png", b"ten")
    store.put_bytes("scene-1/kf-1.png", b"one again")  # overwrite

    assert store.get_bytes("scene-1/kf-1.png") == b"one again"
    assert store.exists("b.png")
    assert not store.exists("nope.png")
    assert not store.exists("scene-1")  # a folder, not an object
    assert store.list() == ["b.png", "scene-1/kf-0.png", "scene-1/kf-1.png", "scene-10/kf-0.png"]
    assert store.list("scene-1/") == ["scene-1/kf-0.png", "scene-1/kf-1.png"]
    assert store.list("scene-1") == ["scene-1/kf-0.png", "scene-1/kf-1.png", "scene-10/kf-0.png"]
    assert store.list("scene-2/") == []

    child = store.child("scene-1")
    assert child.uri == store.uri + "/scene-1"
    assert child.list() == ["kf-0.png", "kf-1.png"]
    assert child.get_bytes("kf-0.png") == b"zero"
    child.put_bytes("kf-2.png", b"two")
    assert store.get_bytes("scene-1/kf-2.png") == b"two"
    assert store.child("scene-1/").uri == child.uri

    store.delete("scene-1/kf-0.png")
    store.delete("scene-1/kf-0.png")  # already gone: no error
    assert not store.exists("scene-1/kf-0.png")
    with pytest.raises(NotFound) as info:
        store.get_bytes("scene-1/kf-0.png")
    assert isinstance(info.value, KeyError)
    assert str(info.value) == f"{store.uri}: no object at key 'scene-1/kf-0.png'"
    # opening the store's own URI again sees the same objects
    assert open_store(store.uri).list("scene-1/") == ["scene-1/kf-1.png", "scene-1/kf-2.png"]


def test_local_write_is_atomic_and_leaves_no_temp_files(tmp_path: Path):
    store = LocalStore(tmp_path / "out")
    for i in range(5):
        store.put_bytes("a/b/frame.bin", bytes([i]) * 1000)
    store.put_bytes("top.bin", b"x")
    files = sorted(p.relative_to(tmp_path / "out").as_posix() for p in (tmp_path / "out").rglob("*") if p.is_file())
    assert files == ["a/b/frame.bin", "top.bin"]
    assert store.get_bytes("a/b/frame.bin") == bytes([4]) * 1000
    # a failed write (a file stands where a folder must go) is a StoreError and leaves nothing behind
    with pytest.raises(StoreError, match=r"cannot write 'top.bin/x'"):
        store.put_bytes("top.bin/x", b"y")
    assert store.list() == ["a/b/frame.bin", "top.bin"]
    assert not [p for p in (tmp_path / "out").rglob("*") if ".fastimagic-tmp" in p.name]
    # a temp file left by a crashed writer is not an object
    (tmp_path / "out" / "a" / ".frame.bin.123.fastimagic-tmp").write_bytes(b"half")
    assert store.list() == ["a/b/frame.bin", "top.bin"]


ESCAPES = ["../x", "/abs", "a/../../b", "a\\b", "", "a//b", "a/", "./a", "a/./b", "a\x00b", "a\nb", ".."]


@pytest.mark.parametrize("key", ESCAPES)
def test_keys_that_could_escape_the_store_are_rejected(store, key: str, tmp_path: Path):
    calls = [
        lambda: store.put_bytes(key, b"x"),
        lambda: store.get_bytes(key),
        lambda: store.exists(key),
        lambda: store.delete(key),
        lambda: store.url(key),
    ]
    if key != "a/":  # child() takes a folder prefix, so a trailing '/' is fine there
        calls.append(lambda: store.child(key))
    for call in calls:
        with pytest.raises(StoreError) as info:
            call()
        message = str(info.value)
        assert message.startswith(store.uri + ": ")
        assert "\n" not in message
    assert store.list() == []
    if isinstance(store, LocalStore):
        assert sorted(os.listdir(tmp_path)) == []  # nothing written anywhere, not even the root


def test_safe_key_allows_ordinary_keys_and_list_prefixes(store):
    assert safe_key("scene-1/kf 0.png") == "scene-1/kf 0.png"
    assert safe_key("a..b/.hidden") == "a..b/.hidden"
    for prefix in ("../", "/", "a//", "a/../"):
        with pytest.raises(StoreError):
            store.list(prefix)


def test_presigned_url_is_fetchable_and_expires(store):
    store.put_bytes("kf.png", b"pixels")
    url = store.url("kf.png", expires=120)
    with urllib.request.urlopen(url, timeout=10) as response:
        assert response.read() == b"pixels"
    if isinstance(store, S3Store):
        query = parse_qs(urlparse(url).query)
        assert query["X-Amz-Expires"] == ["120"]
    else:
        assert url == (store.root / "kf.png").as_uri()
    with pytest.raises(StoreError, match="url expiry must be"):
        store.url("kf.png", expires=0)


def test_s3_content_type_is_stored(s3_env: str, s3_server: S3Server):
    store = open_store(f"s3://{s3_env}")
    store.put_bytes("kf.png", b"p")
    store.put_bytes("blob", b"p", content_type="application/x-thing")
    client = s3_server.client()
    assert client.head_object(Bucket=s3_env, Key="kf.png")["ContentType"] == "image/png"
    assert client.head_object(Bucket=s3_env, Key="blob")["ContentType"] == "application/x-thing"


def test_s3_check_passes_and_explains_each_failure(s3_env: str, s3_server: S3Server, monkeypatch):
    uri = f"s3://{s3_env}/run"
    open_store(uri).check()

    missing = f"s3://no-such-{s3_env}/run"
    with pytest.raises(StoreError) as info:
        open_store(missing).check()
    assert str(info.value) == f"{missing}: bucket 'no-such-{s3_env}' does not exist"

    wrong_secret = "Wr0ngSecretValue-" + s3_server.secret_key[:8]
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", wrong_secret)
    with pytest.raises(StoreError) as info:
        open_store(uri).check()
    message = str(info.value)
    assert message.startswith(f"{uri}: access denied")
    assert "check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY" in message
    assert wrong_secret not in message
    assert s3_server.secret_key not in message

    (closed_port,) = free_ports(1)  # nothing listens there
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_server.secret_key)
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{closed_port}")
    with pytest.raises(StoreError) as info:
        open_store(uri).check()
    message = str(info.value)
    assert message.startswith(f"{uri}: cannot reach S3 endpoint http://127.0.0.1:{closed_port} (")
    assert s3_server.secret_key not in message
    assert "\n" not in message


def test_local_check_creates_the_folder_or_says_why_not(tmp_path: Path):
    store = open_store(str(tmp_path / "new" / "out"))
    store.check()
    assert (tmp_path / "new" / "out").is_dir()
    assert os.listdir(tmp_path / "new" / "out") == []  # the write probe is gone
    (tmp_path / "file").write_bytes(b"")
    with pytest.raises(StoreError, match=r"file: exists but is not a folder$"):
        open_store(str(tmp_path / "file")).check()


def test_session_argument_replaces_environment_credentials(s3_env: str, s3_server: S3Server, monkeypatch):
    # What the Prefect layer does with an AwsCredentials/MinIOCredentials block.
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    session = boto3.Session(
        aws_access_key_id=s3_server.access_key, aws_secret_access_key=s3_server.secret_key, region_name="us-east-1"
    )
    store = open_store(f"s3://{s3_env}/x", session=session)
    store.check()
    store.put_bytes("k", b"v")
    assert read_uri(f"s3://{s3_env}/x/k", session=session) == b"v"


@pytest.mark.parametrize(
    ("uri", "what"),
    [
        ("s3://", "missing bucket name"),
        ("s3:///x", "missing bucket name"),
        ("s3://ab/x", "is not a valid bucket name"),
        ("s3://My_Bucket/x", "is not a valid bucket name"),
        ("s3://-bucket/x", "is not a valid bucket name"),
        ("s3://a..b/x", "has '..'"),
        ("s3://192.168.0.1/x", "looks like an IP address"),
        ("s3://" + "b" * 64, "is not a valid bucket name"),
        ("s3://bucket/../x", "'..' segment"),
        ("s3://bucket/a//b", "empty segment"),
        ("ftp://host/x", "unsupported store URI scheme"),
        ("file://otherhost/x", "must name a local path"),
    ],
)
def test_malformed_store_uris_are_rejected(uri: str, what: str):
    with pytest.raises(StoreError) as info:
        open_store(uri)
    message = str(info.value)
    assert message.startswith(uri + ": ")
    assert what in message


def test_split_s3_uri():
    assert split_s3_uri("s3://bucket/a/b.png") == ("bucket", "a/b.png")
    assert split_s3_uri("s3://bucket") == ("bucket", "")
    assert split_s3_uri("s3://my.bucket-1/") == ("my.bucket-1", "")
    with pytest.raises(StoreError, match="not an S3 URI"):
        split_s3_uri("/local/path")


def test_open_store_local_forms(tmp_path: Path):
    assert isinstance(open_store(str(tmp_path)), LocalStore)
    assert open_store(tmp_path.as_uri()).uri == str(tmp_path)
    assert open_store(tmp_path).uri == str(tmp_path)


def test_read_uri_local(tmp_path: Path):
    (tmp_path / "refs").mkdir()
    (tmp_path / "refs" / "cat.png").write_bytes(b"cat")
    assert read_uri("refs/cat.png", base_dir=tmp_path) == b"cat"
    assert read_uri(str(tmp_path / "refs" / "cat.png")) == b"cat"
    assert read_uri((tmp_path / "refs" / "cat.png").as_uri()) == b"cat"
    with pytest.raises(NotFound) as info:
        read_uri("refs/dog.png", base_dir=tmp_path)
    assert str(info.value) == f"refs/dog.png ({tmp_path / 'refs' / 'dog.png'}): no such file"
    with pytest.raises(StoreError, match=r"^refs .*: is a folder, expected a file$"):
        read_uri("refs", base_dir=tmp_path)


def test_read_uri_s3(s3_env: str, s3_server: S3Server):
    s3_server.client().put_object(Bucket=s3_env, Key="refs/cat.png", Body=b"cat")
    assert read_uri(f"s3://{s3_env}/refs/cat.png") == b"cat"
    with pytest.raises(NotFound, match=rf"^s3://{s3_env}/refs/dog.png: no such object$"):
        read_uri(f"s3://{s3_env}/refs/dog.png")
    with pytest.raises(StoreError, match=r"expected s3://bucket/key"):
        read_uri(f"s3://{s3_env}/refs/")
    with pytest.raises(StoreError, match=r"does not exist"):
        read_uri(f"s3://no-such-{s3_env}/refs/cat.png")


def test_s3_store_survives_a_server_restart(s3_env: str, s3_server: S3Server):
    store = open_store(f"s3://{s3_env}/run")
    store.put_bytes("before.bin", b"kept")
    s3_server.restart(graceful=False)
    assert store.get_bytes("before.bin") == b"kept"
    store.put_bytes("after.bin", b"new")
    assert store.list() == ["after.bin", "before.bin"]


def test_endpoint_without_scheme_is_explained(monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "localhost:9000")
    with pytest.raises(StoreError, match=r"^s3://bucket/x: invalid S3 endpoint 'localhost:9000'"):
        open_store("s3://bucket/x")


def test_an_endpoint_that_is_a_plain_web_server_is_named_as_such_not_as_a_missing_bucket(monkeypatch):
    import http.server
    import threading

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.SimpleHTTPRequestHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        endpoint = f"http://127.0.0.1:{server.server_address[1]}"
        for name, value in {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": "s",
                            "AWS_DEFAULT_REGION": "us-east-1"}.items():
            monkeypatch.setenv(name, value)
        with pytest.raises(StoreError, match="answered like a plain web server, not S3") as raised:
            open_store("s3://bucket/prefix").check()
        assert "does not exist" not in str(raised.value) and endpoint.split("//")[1] in str(raised.value)
    finally:
        server.shutdown()
