"""fastimagic.runs (listing the runs under an output) and the one-level Store.listdir it relies on, on a local
folder and a real S3 server (SeaweedFS on loopback). Outputs are built by writing files directly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fastimagic import keyframes as kf
from fastimagic.errors import InputError
from fastimagic.runs import (
    PLAN,
    RunInfo,
    format_runs,
    list_runs,
    plan_record,
    runs_json,
)
from fastimagic.store import LocalStore, Store, StoreError, open_store
from fastimagic.storyboard_yaml import load_storyboard


@pytest.fixture(params=["local", "s3"])
def output(request: pytest.FixtureRequest, tmp_path: Path) -> Store:
    if request.param == "local":
        path = tmp_path / "out"
        path.mkdir()
        return open_store(str(path))
    bucket = request.getfixturevalue("s3_env")
    return open_store(f"s3://{bucket}/studio/out")


def put_json(store: Store, key: str, value) -> None:
    store.put_bytes(key, kf.dumps(value), "application/json")


def write_keyframes(run: Store, scene: str, seed: int, count: int) -> list[dict]:
    """``count`` keyframe PNGs of (scene, seed) and their progress record, as render_keyframes writes them."""
    records = []
    for i in range(count):
        edit = {"mode": "subtract", "gamma": 1.0 + i / 10}
        key = f"{kf.scene_prefix(scene)}/{kf.keyframe_name(seed, edit, 'none')}"
        run.put_bytes(key, b"\x89PNG fake", "image/png")
        records.append({"key": key, "scene": scene, "seed": seed, "edit": edit, "forget": "none", "sha256": "0" * 64})
    put_json(run, f"{kf.PROGRESS}/{scene}/{seed}-none.json", records)
    return records


def build_output(out: Store) -> None:
    """Five runs of two storyboards, plus things that are not runs."""
    # complete, written 2026-11-28 09:20
    run = out.child("bird-day/20261128T091500Z-aaaaaa")
    records = write_keyframes(run, "sunrise", 0, 3) + write_keyframes(run, "sunrise", 1, 3)
    put_json(run, PLAN, {"format": "fastimagic.run-plan", "keyframes": 6, "created": "2026-11-28T09:15:00+00:00"})
    run.put_bytes(kf.INDEX, b"<html>")
    put_json(run, kf.MANIFEST, {
        "format": 1, "status": "complete", "run_id": "20261128T091500Z-aaaaaa",
        "created": "2026-11-28T09:20:00+00:00", "storyboard": {"name": "Bird Day"},
        "tuning": {"key": "0123456789abcdef0123456789abcdef", "reused": True}, "keyframes": records,
    })
    # incomplete, with a plan: 4 of up to 12 written (a forget: auto scene)
    run = out.child("bird-day/20261129T080000Z-bbbbbb")
    put_json(run, PLAN, {
        "format": "fastimagic.run-plan", "version": 1, "run_id": "20261129T080000Z-bbbbbb",
        "created": "2026-11-29T08:00:05+00:00", "storyboard": {"name": "Bird Day", "slug": "bird-day"},
        "keyframes": 12, "keyframes_at_most": True, "scenes": [],
        "tuning": {"key": "fedcba9876543210fedcba9876543210", "reused": False},
    })
    write_keyframes(run, "sunrise", 0, 2)
    write_keyframes(run, "sunrise", 1, 2)
    run.put_bytes("scenes/sunrise/2-g1.10-none.png", b"\x89PNG a unit cut short: no progress record yet")
    # incomplete, no plan (written before plans existed): 2 written, total unknown; time from the run id
    run = out.child("cat-walk/20261127T100000Z-cccccc")
    write_keyframes(run, "alley", 5, 2)
    # damaged: its manifest does not parse
    run = out.child("cat-walk/20261130T000000Z-dddddd")
    write_keyframes(run, "alley", 0, 1)
    run.put_bytes(kf.MANIFEST, b'{"format": 1, "keyframes": [')
    # complete, a run id of the user's choosing
    run = out.child("cat-walk/take-2")
    put_json(run, kf.MANIFEST, {
        "run_id": "take-2", "created": "2026-11-26T12:00:00+00:00", "storyboard": {"name": "Cat Walk"},
        "tuning": {"key": "aaaabbbbccccddddaaaabbbbccccdddd", "reused": False}, "keyframes": [{"key": "x.png"}],
    })
    # not runs
    out.put_bytes("tunings/0123456789abcdef0123456789abcdef/meta.json", b"{}")
    out.put_bytes("tunings/0123456789abcdef0123456789abcdef/deltas.safetensors", b"x")
    out.put_bytes("bird-day/notes/readme.txt", b"a folder that is no run")
    out.put_bytes("README.txt", b"a file at the top")


def test_lists_every_run_newest_first_with_status_counts_and_tuning(output: Store):
    build_output(output)
    runs = list_runs(output)
    assert [(r.slug, r.run_id, r.status) for r in runs] == [
        ("cat-walk", "20261130T000000Z-dddddd", "damaged"),
        ("bird-day", "20261129T080000Z-bbbbbb", "incomplete"),
        ("bird-day", "20261128T091500Z-aaaaaa", "complete"),
        ("cat-walk", "20261127T100000Z-cccccc", "incomplete"),
        ("cat-walk", "take-2", "complete"),
    ]
    damaged, planned, complete, unplanned, named = runs
    assert complete == RunInfo(
        storyboard="Bird Day", slug="bird-day", run_id="20261128T091500Z-aaaaaa", status="complete", keyframes=6,
        expected=6, expected_at_most=False, created="2026-11-28T09:20:00+00:00",
        tuning_key="0123456789abcdef0123456789abcdef", tuning_reused=True,
        uri=f"{output.uri}/bird-day/20261128T091500Z-aaaaaa",
    )
    assert (planned.storyboard, planned.keyframes, planned.expected, planned.expected_at_most) == ("Bird Day", 4, 12,
                                                                                                  True)
    assert planned.status_text == "incomplete: 4 of up to 12 written"
    assert (planned.tuning_key, planned.tuning_reused, planned.created) == ("fedcba9876543210fedcba9876543210", False,
                                                                           "2026-11-29T08:00:05+00:00")
    assert (unplanned.storyboard, unplanned.keyframes, unplanned.expected) == ("cat-walk", 2, None)
    assert unplanned.status_text == "incomplete: written 2"
    assert unplanned.created == "2026-11-27T10:00:00+00:00"  # from the timestamped run id
    assert (damaged.keyframes, damaged.created) == (None, "2026-11-30T00:00:00+00:00")
    assert damaged.problem.startswith("manifest.json is not valid JSON")
    assert (named.storyboard, named.keyframes, named.tuning_reused) == ("Cat Walk", 1, False)


def test_table_is_aligned_and_says_how_to_resume(output: Store):
    build_output(output)
    text = format_runs(list_runs(output))
    lines = text.splitlines()
    assert lines[0].split() == ["STORYBOARD", "RUN", "STATUS", "KEYFRAMES", "CREATED", "TUNING"]
    table = lines[: 1 + 5]
    for column in ("RUN", "STATUS", "KEYFRAMES", "CREATED", "TUNING"):
        start = lines[0].index(column)
        assert all(line[start - 2 : start] == "  " and line[start] != " " for line in table), column
    assert "incomplete: 4 of up to 12 written" in table[2] and "incomplete: written 2" in table[4]
    assert "0123456789ab (reused)" in table[3] and "aaaabbbbcccc (new)" in table[5]
    assert table[1].split()[:3] == ["cat-walk", "20261130T000000Z-dddddd", "damaged"]
    assert any(line.startswith("20261130T000000Z-dddddd: damaged: manifest.json is not valid JSON") for line in lines)
    # a plan that names no storyboard (written before plans recorded it): the placeholder, the output in full
    assert lines[-2:] == [
        f"continue 20261129T080000Z-bbbbbb with: fastimagic run '<storyboard.yaml>' --resume 20261129T080000Z-bbbbbb"
        f" --output {output.uri}",
        f"continue 20261127T100000Z-cccccc with: fastimagic run '<storyboard.yaml>' --resume 20261127T100000Z-cccccc"
        f" --output {output.uri}",
    ]


def test_a_storyboards_folder_lists_its_own_runs(output: Store):
    """``fastimagic runs keyframes/demo`` (the folder a run prints) lists the runs there, as the output would."""
    build_output(output)
    whole = [r for r in list_runs(output) if r.slug == "cat-walk"]
    assert whole and list_runs(output.child("cat-walk")) == whole
    assert f"--output {output.uri}" in format_runs(list_runs(output.child("cat-walk")))


def test_json_form_for_scripts(output: Store):
    build_output(output)
    runs = list_runs(output)
    data = json.loads(runs_json(runs))
    assert [d["run_id"] for d in data] == [r.run_id for r in runs]
    assert data[1] | {"uri": None} == {
        "storyboard": "Bird Day", "slug": "bird-day", "run_id": "20261129T080000Z-bbbbbb", "status": "incomplete",
        "keyframes": 4, "expected": 12, "expected_at_most": True, "created": "2026-11-29T08:00:05+00:00",
        "tuning_key": "fedcba9876543210fedcba9876543210", "tuning_reused": False, "uri": None, "problem": None,
        "storyboard_uri": None,
    }
    assert runs_json([]) == "[]"


def test_output_without_runs_lists_nothing(output: Store):
    assert list_runs(output) == []
    output.put_bytes("tunings/k/meta.json", b"{}")
    assert list_runs(output) == []
    assert format_runs([]) == ""


def test_missing_folder_or_bucket_is_one_input_error(tmp_path: Path, s3_env: str):
    with pytest.raises(InputError, match=rf"^{tmp_path / 'nope'}: no such folder"):
        list_runs(open_store(str(tmp_path / "nope")))
    (tmp_path / "file").write_text("x")
    with pytest.raises(InputError, match=rf"^{tmp_path / 'file'}: not a folder"):
        list_runs(open_store(str(tmp_path / "file")))
    with pytest.raises(InputError, match=r"^s3://no-such-bucket-here/out: no such bucket"):
        list_runs(open_store("s3://no-such-bucket-here/out"))
    # an existing bucket with nothing under the prefix: simply no runs
    assert list_runs(open_store(f"s3://{s3_env}/never-written")) == []


def test_unreadable_progress_records_and_plans_are_noted_not_fatal(output: Store):
    run = output.child("bird-day/20261129T080000Z-eeeeee")
    write_keyframes(run, "sunrise", 0, 2)
    run.put_bytes(f"{kf.PROGRESS}/sunrise/1-none.json", b"\x00garbage")
    run.put_bytes(PLAN, b"[1, 2]")
    (info,) = list_runs(output)
    assert (info.status, info.keyframes, info.expected) == ("incomplete", 2, None)
    assert "run.json is not a JSON object" in info.problem and ".progress/sunrise/1-none.json" in info.problem
    run.put_bytes(kf.MANIFEST, b"[]")
    (info,) = list_runs(output)
    assert (info.status, info.problem) == ("damaged", "manifest.json is not a JSON object")


def test_s3_listing_goes_one_level_at_a_time_and_never_touches_keyframes(s3_env: str):
    out = open_store(f"s3://{s3_env}/out")
    build_output(out)
    for i in range(30):  # many keyframes in the complete run: none may be enumerated or fetched
        out.put_bytes(f"bird-day/20261128T091500Z-aaaaaa/scenes/sunrise/{i}-g1.10-none.png", b"\x89PNG")
    lists, listed, fetched = [], [], []

    def before_list(params, **_):
        lists.append(dict(params))

    def after_list(parsed, **_):
        listed.extend(o["Key"] for o in parsed.get("Contents", []))

    def before_get(params, **_):
        fetched.append(params["Key"])

    events = out.client.meta.events
    events.register("before-parameter-build.s3.ListObjectsV2", before_list)
    events.register("after-call.s3.ListObjectsV2", after_list)
    events.register("before-parameter-build.s3.GetObject", before_get)
    try:
        runs = list_runs(out)
    finally:
        events.unregister("before-parameter-build.s3.ListObjectsV2", before_list)
        events.unregister("after-call.s3.ListObjectsV2", after_list)
        events.unregister("before-parameter-build.s3.GetObject", before_get)
    assert len(runs) == 5
    assert not [k for k in listed + fetched if k.endswith(".png")]
    assert not [k for k in listed if "/tunings/" in k]
    # every listing is a delimiter listing, except the progress records of incomplete runs
    recursive = [p["Prefix"] for p in lists if p.get("Delimiter") != "/"]
    assert recursive and all(p.endswith(f"/{kf.PROGRESS}/") for p in recursive)
    assert not any("aaaaaa" in p for p in recursive)  # a complete run: its manifest is enough
    assert sorted(k.rsplit("/", 1)[-1] for k in fetched if "aaaaaa" in k) == [kf.MANIFEST]


def test_local_listing_walks_only_progress_folders(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    out = open_store(str(tmp_path / "out"))
    build_output(out)
    walked = []
    original = LocalStore.list

    def spy(self, prefix=""):
        walked.append(f"{self.uri}/{prefix}")
        return original(self, prefix)

    monkeypatch.setattr(LocalStore, "list", spy)
    assert len(list_runs(out)) == 5
    assert walked and all(p.endswith(f"/{kf.PROGRESS}/") for p in walked)


def test_listdir_names_one_level_of_files_and_folders(output: Store):
    assert output.listdir() == [] and output.listdir("a/b") == []
    for key in ("a/x.json", "a/b/c/deep.png", "a/b/y.png", "a/.progress/s/0.json", "top.txt"):
        output.put_bytes(key, b"1")
    assert output.listdir() == ["a/", "top.txt"]
    assert output.listdir("a") == output.listdir("a/") == [".progress/", "b/", "x.json"]
    assert output.listdir("a/b") == ["c/", "y.png"]
    assert output.listdir("a/nope") == []
    assert output.child("a").listdir("b/c") == ["deep.png"]
    assert Store.listdir(output, "a") == output.listdir("a")  # the generic fallback agrees
    assert output.root_exists()
    for bad in ("../up", "/abs", "a//b"):
        with pytest.raises(StoreError):
            output.listdir(bad)


def test_listdir_hides_temp_files_and_s3_folder_markers(tmp_path: Path, s3_env: str, s3_server):
    local = open_store(str(tmp_path / "o"))
    local.put_bytes("a/k.png", b"1")
    (tmp_path / "o" / "a" / ".k.png.123.fastimagic-tmp").write_bytes(b"half")
    assert local.listdir("a") == ["k.png"]
    s3 = open_store(f"s3://{s3_env}/p")
    s3_server.client().put_object(Bucket=s3_env, Key="p/a/", Body=b"")  # a marker some tools create
    s3.put_bytes("a/k.png", b"1")
    assert s3.listdir() == ["a/"] and s3.listdir("a") == ["k.png"]


def test_plan_record_counts_what_the_storyboard_renders(tmp_path: Path):
    path = tmp_path / "story.yaml"
    path.write_text(
        "name: Bird Day\nreference: ref.png\nscenes:\n"
        "  - {id: sunrise, prompt: a bird at sunrise, seeds: 2, edit: {subtract: {gamma: [1.0, 1.2]}}}\n"
        "  - {id: rain, prompt: a bird in the rain, seeds: 1, forget: auto, edit: {subtract: {gamma: [1.1]}}}\n"
    )
    board = load_storyboard(path)
    plan = plan_record(board, "20261129T080000Z-bbbbbb", created="2026-11-29T08:00:05+00:00")
    assert plan == {
        "format": "fastimagic.run-plan", "version": 1, "run_id": "20261129T080000Z-bbbbbb",
        "created": "2026-11-29T08:00:05+00:00",
        "storyboard": {"name": "Bird Day", "slug": "bird-day", "uri": str(path)},  # absolute: for the resume hint
        "keyframes": 4 + 3, "keyframes_at_most": True,
        "scenes": [{"id": "sunrise", "keyframes": 4, "auto": False}, {"id": "rain", "keyframes": 3, "auto": True}],
        "tuning": None,
    }
    tuned = plan_record(board, "r", created=plan["created"], tuning={"key": "k" * 32, "reused": 1, "uri": "s3://x"})
    assert tuned["tuning"] == {"key": "k" * 32, "reused": True}
    assert plan_record(board, "r")["created"].endswith("+00:00")


def test_hostile_run_folders_are_listed_as_damaged_and_never_hide_the_others(tmp_path: Path):
    import os
    import subprocess
    import sys

    out = open_store(str(tmp_path / "out"))
    build_output(out)
    root = tmp_path / "out"
    fifo = root / "fifo" / "r1"
    fifo.mkdir(parents=True)
    os.mkfifo(fifo / kf.MANIFEST)  # reading it would block for ever
    (root / "fifo" / "r2" / kf.PROGRESS).mkdir(parents=True)
    os.mkfifo(root / "fifo" / "r2" / kf.PROGRESS / "a.json")
    zero = root / "zero" / "r1"
    zero.mkdir(parents=True)
    (zero / kf.MANIFEST).symlink_to("/dev/zero")  # reading it would fill memory
    put_json(out.child("deep/r1"), kf.MANIFEST, None)
    (root / "deep" / "r1" / kf.MANIFEST).write_text("[" * 100_000 + "]" * 100_000)
    put_json(out.child("typed/r1"), kf.MANIFEST, {"keyframes": [], "tuning": {"key": 7, "reused": "yes"}})
    named = root / "named" / "\x1b[2J\nfastimagic: forged"  # a folder the store itself refuses to name
    named.mkdir(parents=True)
    (named / kf.MANIFEST).write_text(json.dumps({"keyframes": [], "storyboard": {"name": "\x1b[31mred"}}))
    put_json(out.child("red/r1"), kf.MANIFEST, {"keyframes": [], "storyboard": {"name": "\x1b[31mred\nfastimagic: x"}})
    runs = {(r.slug, r.run_id): r for r in list_runs(out)}
    assert runs[("bird-day", "20261128T091500Z-aaaaaa")].status == "complete"  # the others are all still there
    for slug in ("fifo", "zero", "deep", "typed"):
        assert runs[(slug, "r1")].status == "damaged", runs[(slug, "r1")]
    assert "a.json cannot be read" in runs[("fifo", "r2")].problem
    table = format_runs(list(runs.values()))
    assert "\x1b" not in table and "\nfastimagic: " not in table and "\\x1b[2J\\nfastimagic: forged" in table
    assert runs[("red", "r1")].status == "complete" and "\\x1b[31mred\\nfastimagic: x" in table
    r = subprocess.run([sys.executable, "-m", "flows.cli", "runs", str(root)], capture_output=True, text=True,
                       timeout=120, cwd=Path(__file__).resolve().parents[1])
    assert r.returncode == 0, r.stderr[-2000:]
    assert "\x1b" not in r.stdout and not any(line.startswith("fastimagic: forged") for line in r.stdout.splitlines())
