"""The inbox flow against a real S3 server (SeaweedFS): each storyboard runs exactly once, then moves to done/ or
failed/, however many triggers race (one flow run per storyboard version, by idempotency key)."""

from __future__ import annotations

import json
import threading
from datetime import datetime, timedelta, timezone

import pytest

STORY = """\
name: Inbox Story
reference: {reference}
model: tiny
resolution: 64
source_prompt: a photo of a bird
finetune: {{steps: 2, min_steps: 2}}
defaults:
  seeds: 1
  steps: 2
  edit: {{subtract: {{gamma: [1.0]}}}}
scenes:
  - id: perched
    prompt: a photo of a bird on a branch
output: {output}
"""


def _keys(client, bucket: str, prefix: str = "") -> list[str]:
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return sorted(o["Key"] for page in pages for o in page.get("Contents", []))


def _manifests(client, bucket: str) -> list[str]:
    return [k for k in _keys(client, bucket, "out/") if k.endswith("/manifest.json") and "/scenes/" not in k]


@pytest.fixture
def inbox(s3_server, s3_env, photo_bytes):
    """A bucket with a reference image; returns (client, bucket, inbox URI, storyboard text)."""
    bucket = s3_env
    client = s3_server.client()
    client.put_object(Bucket=bucket, Key="refs/x.jpg", Body=photo_bytes)
    story = STORY.format(reference=f"s3://{bucket}/refs/x.jpg", output=f"s3://{bucket}/out")
    return client, bucket, f"s3://{bucket}/storyboards", story


def _record(client, bucket: str, name: str, text: str, record: dict) -> str:
    """A run record left by an earlier trigger (runs/<name>-<sha256>.json)."""
    import hashlib

    sha = hashlib.sha256(text.encode()).hexdigest()
    key = f"storyboards/runs/{name}-{sha}.json"
    client.put_object(Bucket=bucket, Key=key, Body=json.dumps({"name": name, "sha256": sha, **record}).encode())
    return key


def test_a_storyboard_runs_once_and_moves_to_done_with_its_run_id(inbox):
    from flows.inbox import inbox_flow

    client, bucket, uri, story = inbox
    client.put_object(Bucket=bucket, Key="storyboards/inbox/a.yaml", Body=story.encode())
    client.put_object(Bucket=bucket, Key="storyboards/inbox/notes.txt", Body=b"not a storyboard")

    first = inbox_flow(inbox=uri)
    second = inbox_flow(inbox=uri)  # a second trigger finds nothing to do

    assert [r["status"] for r in first] == ["done"] and second == []
    run_id = first[0]["run_id"]
    assert _manifests(client, bucket) == [f"out/inbox-story/{run_id}/manifest.json"]
    assert _keys(client, bucket, "storyboards/inbox/") == ["storyboards/inbox/notes.txt"]
    done = f"storyboards/done/{run_id}-a.yaml"
    assert client.get_object(Bucket=bucket, Key=done)["Body"].read() == story.encode()
    result = json.loads(client.get_object(Bucket=bucket, Key=f"{done}.result.json")["Body"].read())
    assert result["run_id"] == run_id
    assert result["manifest"] == f"s3://{bucket}/out/inbox-story/{run_id}/manifest.json"
    assert result["storyboard"] == f"s3://{bucket}/storyboards/inbox/a.yaml"
    manifest_key = f"out/inbox-story/{run_id}/manifest.json"
    manifest = json.loads(client.get_object(Bucket=bucket, Key=manifest_key)["Body"].read())
    assert manifest["run_id"] == run_id and manifest["storyboard"]["source"] == story
    [key] = _keys(client, bucket, "storyboards/runs/")
    record = json.loads(client.get_object(Bucket=bucket, Key=key)["Body"].read())
    assert record["status"] == "done" and record["run_id"] == run_id and record["flow_run_id"] == result["flow_run_id"]


def test_an_invalid_storyboard_moves_to_failed_with_the_error_beside_it(inbox):
    from flows.inbox import inbox_flow

    client, bucket, uri, _ = inbox
    client.put_object(Bucket=bucket, Key="storyboards/inbox/bad.yml", Body=b"name: [unclosed\n")

    [result] = inbox_flow(inbox=uri)

    assert result["status"] == "failed"
    assert _keys(client, bucket, "storyboards/inbox/") == []
    assert client.get_object(Bucket=bucket, Key="storyboards/failed/bad.yml")["Body"].read() == b"name: [unclosed\n"
    error = client.get_object(Bucket=bucket, Key="storyboards/failed/bad.yml.error.txt")["Body"].read().decode()
    assert error.startswith(f"s3://{bucket}/storyboards/inbox/bad.yml:") and "YAML syntax error" in error
    assert error.endswith("\n") and error.count("\n") == 1
    assert inbox_flow(inbox=uri) == []


def test_two_concurrent_triggers_run_a_storyboard_once(inbox):
    from flows.inbox import inbox_flow

    client, bucket, uri, story = inbox
    client.put_object(Bucket=bucket, Key="storyboards/inbox/a.yaml", Body=story.encode())
    results: list[list[dict]] = []
    errors: list[BaseException] = []

    def trigger():
        try:
            results.append(inbox_flow(inbox=uri))
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=trigger) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)

    assert not errors
    statuses = sorted(r["status"] for rs in results for r in rs)
    assert statuses in (["done"], ["done", "skipped"])  # the loser found the run created by the other, or the file gone
    assert len(_manifests(client, bucket)) == 1
    assert _keys(client, bucket, "storyboards/inbox/") == []
    assert len(_keys(client, bucket, "storyboards/done/")) == 2  # the storyboard and its result.json


def test_a_run_whose_trigger_died_after_the_manifest_is_moved_without_running_again(inbox):
    from flows.inbox import inbox_flow

    client, bucket, uri, story = inbox
    client.put_object(Bucket=bucket, Key="storyboards/inbox/a.yaml", Body=story.encode())
    run_id = "20260101T000000Z-dead00"
    client.put_object(Bucket=bucket, Key=f"out/inbox-story/{run_id}/manifest.json", Body=b"{}")
    _record(client, bucket, "a.yaml", story, {
        "status": "running", "run_id": run_id, "claimed_at": datetime.now(timezone.utc).isoformat(),
        "flow_run_id": None, "output": f"s3://{bucket}/out", "manifest_key": f"inbox-story/{run_id}/manifest.json",
        "manifest": f"s3://{bucket}/out/inbox-story/{run_id}/manifest.json",
    })

    [result] = inbox_flow(inbox=uri)

    assert result["status"] == "done" and result["run_id"] == run_id
    assert _manifests(client, bucket) == [f"out/inbox-story/{run_id}/manifest.json"]
    assert _keys(client, bucket, "storyboards/inbox/") == []
    assert f"storyboards/done/{run_id}-a.yaml" in _keys(client, bucket, "storyboards/done/")


def test_a_record_whose_flow_run_is_not_known_to_have_ended_is_left_alone(inbox):
    from flows.inbox import inbox_flow

    client, bucket, uri, story = inbox
    client.put_object(Bucket=bucket, Key="storyboards/inbox/a.yaml", Body=story.encode())
    _record(client, bucket, "a.yaml", story, {
        "status": "running", "run_id": "20260101T000000Z-live00", "flow_run_id": None,
        "claimed_at": datetime.now(timezone.utc).isoformat(),
    })

    [result] = inbox_flow(inbox=uri)

    assert result["status"] == "skipped"
    assert _keys(client, bucket, "storyboards/inbox/") == ["storyboards/inbox/a.yaml"]
    assert _manifests(client, bucket) == []


def test_a_record_whose_flow_run_ended_without_finishing_is_taken_over_with_the_same_run_id(inbox):
    from prefect import flow
    from prefect.runtime import flow_run

    from flows.inbox import inbox_flow

    @flow
    def crashed_trigger() -> str:
        return flow_run.get_id()

    client, bucket, uri, story = inbox
    client.put_object(Bucket=bucket, Key="storyboards/inbox/a.yaml", Body=story.encode())
    run_id = "20260101T000000Z-taken0"
    # the dead run had started writing its run folder: the takeover resumes it rather than refusing it
    client.put_object(Bucket=bucket, Key=f"out/inbox-story/{run_id}/reference.jpg", Body=b"partial")
    old = (datetime.now(timezone.utc) - timedelta(minutes=1)).isoformat()
    _record(client, bucket, "a.yaml", story, {
        "status": "running", "run_id": run_id, "flow_run_id": crashed_trigger(), "claimed_at": old,
    })

    [result] = inbox_flow(inbox=uri)

    assert result["status"] == "done" and result["run_id"] == run_id and result["attempt"] == 1
    assert _manifests(client, bucket) == [f"out/inbox-story/{run_id}/manifest.json"]
    assert _keys(client, bucket, "storyboards/inbox/") == []


def test_a_local_inbox_resolves_relative_paths_against_the_inbox_folder(tmp_path, photo_bytes):
    from flows.inbox import inbox_flow

    (tmp_path / "inbox").mkdir()
    (tmp_path / "inbox" / "x.jpg").write_bytes(photo_bytes)
    (tmp_path / "inbox" / "a.yaml").write_text(STORY.format(reference="x.jpg", output="../out"))
    (tmp_path / "inbox" / "b.yaml").write_text("name: b\nscenes: 3\n")

    results = {r["name"]: r for r in inbox_flow(inbox=str(tmp_path))}

    assert results["a.yaml"]["status"] == "done" and results["b.yaml"]["status"] == "failed"
    run_id = results["a.yaml"]["run_id"]
    assert (tmp_path / "out" / "inbox-story" / run_id / "manifest.json").is_file()
    assert (tmp_path / "done" / f"{run_id}-a.yaml").is_file()
    assert (tmp_path / "failed" / "b.yaml").is_file()
    assert "b.yaml" in (tmp_path / "failed" / "b.yaml.error.txt").read_text()
    assert sorted(p.name for p in (tmp_path / "inbox").iterdir()) == ["x.jpg"]


# -- run="deployment": runs are created on a deployment (no worker here: the test plays the worker's outcomes) ------


def _storyboard_deployment(name: str) -> str:
    from prefect import get_client

    from flows.storyboard import storyboard_flow

    with get_client(sync_client=True) as client:
        flow_id = client.create_flow_from_name(storyboard_flow.name)
        client.create_deployment(flow_id=flow_id, name=name, entrypoint="flows/storyboard.py:storyboard_flow")
    return f"{storyboard_flow.name}/{name}"


def _end(flow_run_id: str, state) -> None:
    from uuid import UUID

    from prefect import get_client

    with get_client(sync_client=True) as client:
        client.set_flow_run_state(UUID(flow_run_id), state, force=True)


def test_deployment_runs_are_created_once_and_the_file_moves_when_the_run_is_final(inbox):
    from prefect.states import Completed, Crashed, Failed

    from flows.inbox import inbox_flow

    client, bucket, uri, story = inbox
    deployment = _storyboard_deployment(f"inbox-{bucket}")
    client.put_object(Bucket=bucket, Key="storyboards/inbox/a.yaml", Body=story.encode())
    client.put_object(Bucket=bucket, Key="storyboards/inbox/b.yaml", Body=story.replace("Inbox Story", "B").encode())
    results: list[list[dict]] = []
    threads = [threading.Thread(target=lambda: results.append(inbox_flow(inbox=uri, run="deployment",
                                                                         deployment=deployment))) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)

    by_status = sorted((r["name"], r["status"]) for rs in results for r in rs)
    assert by_status == [("a.yaml", "skipped"), ("a.yaml", "submitted"), ("b.yaml", "skipped"), ("b.yaml", "submitted")]
    first = {r["name"]: r for rs in results for r in rs if r["status"] == "submitted"}
    # not final yet: left alone
    assert {r["status"] for r in inbox_flow(inbox=uri, run="deployment", deployment=deployment)} == {"skipped"}

    # a's run crashed before its manifest: the next trigger creates the next attempt, resuming the same run id
    _end(first["a.yaml"]["flow_run_id"], Crashed(message="worker lost"))
    # b's run failed: b goes to failed/, without the state's message (it may name the worker's files)
    _end(first["b.yaml"]["flow_run_id"], Failed(message="/srv/worker/secret: boom"))
    again = {r["name"]: r for r in inbox_flow(inbox=uri, run="deployment", deployment=deployment)}
    assert again["a.yaml"]["status"] == "submitted" and again["a.yaml"]["attempt"] == 1
    assert again["a.yaml"]["run_id"] == first["a.yaml"]["run_id"]
    assert again["a.yaml"]["flow_run_id"] != first["a.yaml"]["flow_run_id"]
    assert again["b.yaml"]["status"] == "failed"
    error = client.get_object(Bucket=bucket, Key="storyboards/failed/b.yaml.error.txt")["Body"].read().decode()
    assert "ended Failed" in error and "secret" not in error

    # the worker finishes attempt 1: the next trigger moves a to done/
    run_id = first["a.yaml"]["run_id"]
    client.put_object(Bucket=bucket, Key=f"out/inbox-story/{run_id}/manifest.json", Body=b"{}")
    _end(again["a.yaml"]["flow_run_id"], Completed())
    [done] = inbox_flow(inbox=uri, run="deployment", deployment=deployment)
    assert done["status"] == "done" and done["run_id"] == run_id
    assert done["flow_run_id"] == again["a.yaml"]["flow_run_id"]
    assert _keys(client, bucket, "storyboards/inbox/") == []
    assert f"storyboards/done/{run_id}-a.yaml" in _keys(client, bucket, "storyboards/done/")
