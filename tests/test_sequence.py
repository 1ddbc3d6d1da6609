"""fastimagic.sequence: the chosen keyframe per scene in story order, validated against docs/sequence.schema.json."""

from __future__ import annotations

import copy
import html
import json
import random
from pathlib import Path

import jsonschema
import pytest

from fastimagic import keyframes as kf
from fastimagic.errors import InputError
from fastimagic.sequence import (
    SEQUENCE,
    build_sequence,
    default_keyframe,
    sequence_html,
    write_sequence,
)
from fastimagic.store import open_store

SCHEMA = json.loads((Path(__file__).resolve().parents[1] / "docs" / "sequence.schema.json").read_text())
VALIDATOR = jsonschema.Draft202012Validator(SCHEMA)


def valid(sequence: dict) -> dict:
    VALIDATOR.validate(sequence)
    return sequence


def record(scene: str, seed: int, edit: dict, forget: str = "none", *, clip: float | None = None,
           negative: str | None = None, prompt: str | None = None) -> dict:
    """A keyframe record as render_keyframes writes it (fields of Keyframe.settings() plus key, scene, sha256)."""
    r = {
        "key": f"{kf.scene_prefix(scene)}/{kf.keyframe_name(seed, edit, forget)}",
        "scene": scene,
        "prompt": prompt or f"a photo of a bird, {scene}",
        "seed": seed,
        "edit": dict(edit),
        "forget": forget,
        "sigma": 0.0,
        "guidance": 7.5,
        "steps": 20,
        "width": 64,
        "height": 48,
        "negative_prompt": negative,
        "sha256": f"{abs(hash((scene, seed, str(edit), forget))):064x}"[-64:],
    }
    if clip is not None:
        r["scores"] = {"clip": clip, "fidelity": 0.5, "fidelity_metric": "clip_image"}
    return r


G = [{"mode": "subtract", "gamma": g} for g in (0.9, 1.1)]


def manifest() -> dict:
    """A run manifest as finish_run builds it: three scenes in storyboard order.

    'sunrise': seeds [7, 3] (not sorted), no select: the default. 'flight': select picked two, rank 1 is seed 1's
    second edit. 'rain': forget: auto chose encoderattn, no select: the default among encoderattn keyframes.
    """
    sunrise = [record("sunrise", s, e, negative="blurry") for s in (7, 3) for e in G]
    flight = [record("flight", s, e, clip=c) for s, cs in ((0, (20.0, 21.0)), (1, (22.0, 30.0))) for e, c in zip(G, cs)]
    for r in flight:
        r["pick"] = {30.0: 1, 22.0: 2}.get(r["scores"]["clip"])
    rain = [record("rain", s, e, "none", clip=18.0) for s in (0, 1) for e in G]
    rain += [record("rain", s, e, f, clip=19.0) for f in ("encoderattn", "decoderattn") for s in (0, 1) for e in G]
    picks = [{"rank": r["pick"], "key": r["key"], "copy": f"picks/flight/{r['pick']:02d}-x.png"} for r in flight
             if r["pick"]]
    return {
        "format": 1,
        "status": "complete",
        "run_id": "20261128T091500Z-3f9a1c",
        "created": "2026-11-28T09:20:00+00:00",
        "storyboard": {"name": "Bird Day", "uri": "bird.yaml", "source": "name: Bird Day\n"},
        "resolution": {"width": 64, "height": 48},
        "tuning": {"key": "k" * 32, "reused": False},
        "scenes": [
            {"id": "sunrise", "prompt": sunrise[0]["prompt"], "picks": [], "auto": None, "keyframes": 4},
            {"id": "flight", "prompt": flight[0]["prompt"], "picks": sorted(picks, key=lambda p: -p["rank"]),
             "auto": None, "keyframes": 4},
            {"id": "rain", "prompt": rain[0]["prompt"], "picks": [],
             "auto": {"overfitted": True, "strategies": ["encoderattn", "decoderattn"], "chosen": "encoderattn",
                      "reason": "overfitted"}, "keyframes": 12},
        ],
        "keyframes": sunrise + flight + rain,
    }


def uri(key: str) -> str:
    return f"s3://bucket/out/bird-day/20261128T091500Z-3f9a1c/{key}"


def test_one_frame_per_scene_in_storyboard_order_with_its_settings():
    seq, copies = build_sequence(manifest(), uri=uri, motion={"sunrise": "slow pan left", "rain": None})
    valid(seq)
    assert seq["format"] == "fastimagic.sequence" and seq["version"] == 1
    assert seq["run_id"] == "20261128T091500Z-3f9a1c" and seq["storyboard"] == "Bird Day"
    assert seq["resolution"] == {"width": 64, "height": 48}
    assert [f["scene"] for f in seq["frames"]] == ["sunrise", "flight", "rain"]
    assert [f["index"] for f in seq["frames"]] == [0, 1, 2]
    assert [dest for _, dest in copies] == ["sequence/000-sunrise.png", "sequence/001-flight.png",
                                            "sequence/002-rain.png"]
    assert [(f["keyframe"]["key"], f["key"]) for f in seq["frames"]] == copies
    first = seq["frames"][0]
    assert first["uri"] == uri("sequence/000-sunrise.png")
    assert first["keyframe"]["uri"] == uri(first["keyframe"]["key"])
    assert first["motion"] == "slow pan left" and seq["frames"][1]["motion"] is None
    assert first["negative_prompt"] == "blurry" and seq["frames"][1]["negative_prompt"] is None
    assert first["prompt"] == "a photo of a bird, sunrise"
    assert (first["width"], first["height"], first["guidance"], first["steps"], first["sigma"]) == (64, 48, 7.5, 20, 0)
    assert first["sha256"] == next(r for r in manifest()["keyframes"] if r["key"] == first["keyframe"]["key"])["sha256"]


def test_without_select_the_default_is_the_first_keyframe_in_render_order():
    seq, _ = build_sequence(manifest(), uri=uri)
    sunrise = seq["frames"][0]
    # seeds were listed [7, 3]: the lowest seed wins, then the first (lowest) gamma
    assert (sunrise["chosen_by"], sunrise["rank"]) == ("default", None)
    assert (sunrise["seed"], sunrise["edit"], sunrise["forget"]) == (3, {"mode": "subtract", "gamma": 0.9}, "none")
    assert sunrise["keyframe"]["key"] == "scenes/sunrise/3-g0.90-none.png"
    assert sunrise["forget_auto"] is False


def test_with_select_the_first_pick_is_the_frame():
    seq, _ = build_sequence(manifest(), uri=uri)
    flight = seq["frames"][1]
    assert (flight["chosen_by"], flight["rank"]) == ("pick", 1)
    assert flight["keyframe"]["key"] == "scenes/flight/1-g1.10-none.png"
    assert flight["scores"]["clip"] == 30.0


def test_with_forget_auto_the_default_comes_from_the_chosen_strategy():
    seq, _ = build_sequence(manifest(), uri=uri)
    rain = seq["frames"][2]
    assert rain["forget"] == "encoderattn" and rain["forget_auto"] is True
    assert (rain["seed"], rain["edit"]["gamma"], rain["chosen_by"]) == (0, 0.9, "default")


def test_auto_that_kept_none_and_a_select_that_picked_nothing_fall_back_to_the_default():
    run = manifest()
    run["scenes"][2]["auto"] = {"overfitted": False, "strategies": [], "chosen": "none", "reason": "fine"}
    run["scenes"][1]["picks"] = []  # select's thresholds let nothing through
    seq = valid(build_sequence(run, uri=uri)[0])
    assert seq["frames"][2]["forget"] == "none"
    assert (seq["frames"][1]["chosen_by"], seq["frames"][1]["keyframe"]["key"]) == ("default",
                                                                                   "scenes/flight/0-g0.90-none.png")


def test_default_orders_strategies_as_listed_in_forgetting_and_edits_by_value():
    project = [{"mode": "project", "alpha": a, "beta": b} for a in (1.2, 0.8) for b in (1.5, 1.0)]
    records = [record("s", 5, e, f) for f in ("decoderattn", "encoder") for e in project]
    chosen = default_keyframe(records)
    assert (chosen["forget"], chosen["edit"]) == ("encoder", {"mode": "project", "alpha": 0.8, "beta": 1.0})
    with pytest.raises(ValueError):
        default_keyframe([])


def test_a_resumed_run_gives_the_same_sequence():
    """Resume rebuilds the manifest from verified progress records: same content, records and picks possibly in
    another order, another 'created' time and resume counts. The sequence must not change."""
    first = manifest()
    resumed = copy.deepcopy(first)
    random.Random(3).shuffle(resumed["keyframes"])
    for scene in resumed["scenes"]:
        scene["picks"].reverse()
    resumed["created"] = "2026-11-29T10:00:00+00:00"
    resumed["resumed"] = {"kept": 16, "rendered": 4}
    resumed["timings"] = {"total_seconds": 1.0}
    a = build_sequence(first, uri=uri)
    b = build_sequence(resumed, uri=uri)
    assert a == b
    assert kf.dumps(a[0]) == kf.dumps(b[0])  # byte for byte, as written


def test_motion_from_the_manifest_scenes_when_not_given():
    run = manifest()
    run["scenes"][0]["motion"] = "the bird takes off"
    seq, _ = build_sequence(run, uri=uri)
    assert [f["motion"] for f in valid(seq)["frames"]] == ["the bird takes off", None, None]
    seq, _ = build_sequence(run, uri=uri, motion={})  # given explicitly: it wins
    assert seq["frames"][0]["motion"] is None


def test_many_scenes_keep_lexicographic_story_order():
    run = manifest()
    base = run["scenes"][0]
    run["scenes"] = [dict(base, id=f"s{i}") for i in range(1001)]
    run["keyframes"] = [record(f"s{i}", 0, G[0]) for i in range(1001)]
    seq, copies = build_sequence(run, uri=uri)
    names = [dest for _, dest in copies]
    assert names[0] == "sequence/0000-s0.png" and names[-1] == "sequence/1000-s1000.png"
    assert sorted(names) == names
    valid(seq)


def test_a_manifest_missing_keyframes_is_explained():
    run = manifest()
    run["keyframes"] = [r for r in run["keyframes"] if r["scene"] != "rain"]
    with pytest.raises(InputError, match="run 20261128T091500Z-3f9a1c: scene 'rain' has no keyframes"):
        build_sequence(run, uri=uri)
    run = manifest()
    run["scenes"][1]["picks"][-1]["key"] = "scenes/flight/gone.png"
    with pytest.raises(InputError, match="scene 'flight' picks 'scenes/flight/gone.png'"):
        build_sequence(run, uri=uri)


def test_the_schema_rejects_what_it_should():
    seq, _ = build_sequence(manifest(), uri=uri)
    for broken in (
        {k: v for k, v in seq.items() if k != "version"},
        seq | {"version": 2},
        seq | {"frames": [seq["frames"][0] | {"edit": {"mode": "subtract"}}]},
        seq | {"frames": [seq["frames"][0] | {"key": "/abs/000-sunrise.png"}]},
        seq | {"frames": [seq["frames"][0] | {"chosen_by": "magic"}]},
    ):
        with pytest.raises(jsonschema.ValidationError):
            VALIDATOR.validate(broken)


@pytest.fixture(params=["local", "s3"])
def run_store(request: pytest.FixtureRequest, tmp_path: Path):
    if request.param == "local":
        return open_store(str(tmp_path / "out")).child("bird-day/20261128T091500Z-3f9a1c")
    bucket = request.getfixturevalue("s3_env")
    return open_store(f"s3://{bucket}/out").child("bird-day/20261128T091500Z-3f9a1c")


def test_write_sequence_copies_in_story_order_and_writes_a_valid_sequence_json(run_store):
    run = manifest()
    for r in run["keyframes"]:
        run_store.put_bytes(r["key"], r["key"].encode(), "image/png")  # bytes that say where they came from
    run_store.put_bytes("sequence/005-old.png", b"stale")  # a leftover the folder must not keep
    seq = write_sequence(run_store, run, motion={"flight": "wings beat"})
    written = json.loads(run_store.get_bytes(SEQUENCE))
    assert written == valid(seq)
    assert run_store.list("sequence/") == ["sequence/000-sunrise.png", "sequence/001-flight.png",
                                           "sequence/002-rain.png"]
    for frame in seq["frames"]:
        assert run_store.get_bytes(frame["key"]) == frame["keyframe"]["key"].encode()
        assert frame["uri"] == f"{run_store.uri}/{frame['key']}"
    assert seq["frames"][1]["motion"] == "wings beat"
    before = run_store.get_bytes(SEQUENCE)
    write_sequence(run_store, run, motion={"flight": "wings beat"})  # a resumed run finishing again
    assert run_store.get_bytes(SEQUENCE) == before


def test_sequence_html_is_a_strip_of_relative_links_with_escaped_text():
    run = manifest()
    run["scenes"][0]["motion"] = "<b>zoom</b>"
    for r in run["keyframes"]:
        if r["scene"] == "flight":
            r["prompt"] = 'a bird <script>alert("x")</script> & "friends"'
    seq, _ = build_sequence(run, uri=uri)
    page = sequence_html(seq)
    assert page.index('src="sequence/000-sunrise.png"') < page.index('src="sequence/001-flight.png"') \
        < page.index('src="sequence/002-rain.png"')
    assert "<script>" not in page and "<b>zoom" not in page
    assert html.escape('a bird <script>alert("x")</script> & "friends"') in page
    assert 'href="sequence.json"' in page
    linked = sequence_html(seq, link=lambda key: f"https://h/{key}?sig=a&b=1")
    assert 'src="https://h/sequence/000-sunrise.png?sig=a&amp;b=1"' in linked
