"""Secrets stay secret; what people are handed is escaped and expires."""

from __future__ import annotations

import urllib.parse
import urllib.request

from test_cli import fastimagic


def _all_objects(client, bucket):
    out = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        for o in page.get("Contents", []):
            out[o["Key"]] = client.get_object(Bucket=bucket, Key=o["Key"])["Body"].read()
    return out


def test_no_credential_in_logs_manifests_pages_or_prefect_records(tmp_path, photo_bytes, s3_server, s3_env):
    bucket = s3_env
    client = s3_server.client()
    client.put_object(Bucket=bucket, Key="refs/r.jpg", Body=photo_bytes)
    story = tmp_path / "story.yaml"
    story.write_text(
        f"name: secrets\nreference: s3://{bucket}/refs/r.jpg\nmodel: tiny\nresolution: 64\n"
        "source_prompt: a photo of a bird\nfinetune: {steps: 2, min_steps: 2}\n"
        "defaults: {seeds: 1, steps: 2, edit: {subtract: {gamma: [1.0]}}}\n"
        "scenes:\n  - {id: a, prompt: 'a photo of a bird <script>alert(1)</script>'}\n"
        f"output: s3://{bucket}/out\n"
    )
    prefect_home = tmp_path / "prefect-home"
    env = {**s3_server.env(), "PREFECT_HOME": str(prefect_home), "PREFECT_LOGGING_LEVEL": "DEBUG"}
    r = fastimagic("run", str(story), env={**env, "XDG_CACHE_HOME": str(tmp_path / "cache")})
    assert r.returncode == 0, r.stderr[-3000:]
    secret, key_id = s3_server.secret_key, s3_server.access_key

    # what the person saw: a page on their machine whose images are presigned links (they carry the key id by
    # SigV4's design, so the page is not stored in the bucket), never the secret
    assert secret not in r.stdout + r.stderr
    link = next(line.split()[1] for line in r.stdout.splitlines() if line.startswith("browse:"))
    with urllib.request.urlopen(link, timeout=10) as resp:
        page = resp.read().decode()
    image = page.split('<img src="')[1].split('"')[0].replace("&amp;", "&")
    assert urllib.parse.parse_qs(urllib.parse.urlparse(image).query)["X-Amz-Expires"] == ["86400"]
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page and "<script>" not in page and secret not in page

    # everything stored: keyframes, manifests, index.html, tuning
    stored = _all_objects(client, bucket)
    assert any(k.endswith("manifest.json") for k in stored)
    for name, data in stored.items():
        assert secret.encode() not in data, name
        if not name.endswith((".png", ".jpg", ".safetensors")):
            assert key_id.encode() not in data, name

    # Prefect's own records: the run's logs, artifacts, parameters and states live in its database
    files = [p for p in prefect_home.rglob("*") if p.is_file()]
    assert any(p.suffix == ".db" for p in files)
    for p in files:
        assert secret.encode() not in p.read_bytes(), p


def test_a_wrong_secret_is_refused_by_the_server_and_reported_in_one_line(tmp_path, photo_bytes, s3_server, s3_env):
    story = tmp_path / "story.yaml"
    (tmp_path / "r.jpg").write_bytes(photo_bytes)
    story.write_text(
        "name: x\nreference: r.jpg\nsource_prompt: a\nresolution: 64\n"
        f"scenes: [{{id: a, prompt: b}}]\noutput: s3://{s3_env}/out\n"
    )
    r = fastimagic("run", str(story), env={**s3_server.env(), "AWS_SECRET_ACCESS_KEY": "not-the-secret-0"})
    assert r.returncode == 1
    assert r.stderr.count("\n") == 1 and "access denied" in r.stderr and "not-the-secret-0" not in r.stderr
