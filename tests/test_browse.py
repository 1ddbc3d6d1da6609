"""Automatic keyframe selection and browsing through the real flow: scores, forget: auto, picks, pages."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from browser import check_page
from test_cli import fastimagic

STORY = """\
name: browse
reference: ref.jpg
model: tiny
resolution: 64
source_prompt: a photo of a bird
finetune: {steps: 3, min_steps: 3}
defaults: {seeds: 2, steps: 3, edit: {subtract: {gamma: [0.9, 1.2]}}, select: {top: 2}}
scenes:
  - id: picked
    prompt: a photo of a bird <b>singing</b> & "whistling"
  - id: overfits
    prompt: a photo of a bird jumping
    forget: auto
    auto: {clip: 100, clip_image: -1}
  - id: fine
    prompt: a red bird
    forget: auto
    auto: {clip: 0}
    select: {top: 1, min_clip: 0}
output: out
"""


@pytest.fixture(scope="module")
def run(tmp_path_factory, photo_bytes):
    from flows.storyboard import storyboard_flow

    folder = tmp_path_factory.mktemp("browse")
    (folder / "ref.jpg").write_bytes(photo_bytes)
    (folder / "story.yaml").write_text(STORY)
    state = storyboard_flow(storyboard=str(folder / "story.yaml"), return_state=True)
    result = state.result()
    run_dir = Path(result["manifest"]).parent
    return folder, run_dir, json.loads(Path(result["manifest"]).read_text()), state


def test_every_keyframe_has_scores_from_the_scorer(run):
    _, _, manifest, _ = run
    for k in manifest["keyframes"]:
        s = k["scores"]
        assert set(s) == {"clip", "fidelity", "fidelity_metric"}
        assert s["fidelity_metric"] in ("clip_image", "lpips") and 0 <= s["clip"] <= 100


def test_picks_are_the_best_by_clip_in_order_and_easy_to_find(run):
    _, run_dir, manifest, _ = run
    scene = next(s for s in manifest["scenes"] if s["id"] == "picked")
    records = [k for k in manifest["keyframes"] if k["scene"] == "picked"]
    best = sorted(records, key=lambda k: -k["scores"]["clip"])[:2]
    assert [p["key"] for p in scene["picks"]] == [k["key"] for k in best]
    assert [p["rank"] for p in scene["picks"]] == [1, 2]
    for p in scene["picks"]:
        assert (run_dir / p["copy"]).read_bytes() == (run_dir / p["key"]).read_bytes()
        assert p["copy"].startswith(f"picks/picked/{p['rank']:02d}-")
    assert sorted(k.get("pick") or 0 for k in records)[-2:] == [1, 2]
    scene_manifest = json.loads((run_dir / "scenes/picked/manifest.json").read_text())
    assert scene_manifest["picks"] == scene["picks"]


def test_forget_auto_re_renders_with_the_strategy_the_prompt_calls_for_when_overfitted(run):
    _, _, manifest, _ = run
    scene = next(s for s in manifest["scenes"] if s["id"] == "overfits")
    auto = scene["auto"]
    assert auto["overfitted"] is True and auto["strategies"] == ["encoderattn"]  # "jumping" is a structure edit
    assert "jumping" in auto["reason"] and auto["chosen"] in ("none", "encoderattn")
    assert {"best_clip", "mean_fidelity", "fidelity_metric"} <= set(auto["scores"])
    forgets = [k["forget"] for k in manifest["keyframes"] if k["scene"] == "overfits"]
    assert forgets.count("none") == 4 and forgets.count("encoderattn") == 4
    chosen = auto["chosen"]
    by_key = {k["key"]: k for k in manifest["keyframes"]}
    assert all(by_key[p["key"]]["forget"] == chosen for p in scene["picks"])


def test_forget_auto_keeps_the_first_pass_when_not_overfitted(run):
    _, _, manifest, _ = run
    auto = next(s for s in manifest["scenes"] if s["id"] == "fine")["auto"]
    assert auto["overfitted"] is False and auto["strategies"] == [] and auto["chosen"] == "none"
    assert {k["forget"] for k in manifest["keyframes"] if k["scene"] == "fine"} == {"none"}


def test_index_page_in_a_real_browser(run):
    if not Path("/usr/bin/chromium").exists() and not os.environ.get("FASTIMAGIC_REQUIRE_BROWSER"):
        pytest.skip("Debian's chromium is not installed (apt-get install chromium); .ci/run installs it")
    _, run_dir, manifest, _ = run
    page = check_page(run_dir / "index.html")
    assert page["images"] and all(img["complete"] and img["naturalWidth"] > 0 for img in page["images"])
    assert page["console_errors"] == [] and page["network_errors"] == []
    assert 'a photo of a bird <b>singing</b> & "whistling"' in page["text"]  # shown as text, not markup
    for scene in manifest["scenes"]:
        assert scene["prompt"] in page["text"]
    assert "overfitted" in page["text"]
    srcs = {img["src"] for img in page["images"]}
    assert all(not s.startswith(("/", "file:", "http")) for s in srcs)  # relative: works when downloaded


def test_the_flow_run_gets_a_markdown_summary_with_links(run):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    _, _, _, state = run
    flow_run_id = state.state_details.flow_run_id
    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]))
        )
    md = next(a for a in artifacts if a.type == "markdown")
    assert md.key == "keyframes-browse"
    assert "| picked |" in md.data and "| overfits |" in md.data and "[#1](file://" in md.data


def test_fastimagic_open_prints_the_local_index(run):
    folder, run_dir, _, _ = run
    r = fastimagic("open", str(folder / "story.yaml"))
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == f"{run_dir}/index.html"
    r = fastimagic("open", str(run_dir))
    assert r.stdout.strip() == f"{run_dir}/index.html"


def test_fastimagic_open_on_s3_gives_a_page_whose_presigned_images_load(s3_server, s3_env, run, tmp_path):
    """On a private bucket: a page on this machine (one per run, replaced each time) whose image links are
    presigned; nothing is written into the bucket (a presigned link carries the access key id)."""
    import urllib.request

    _, run_dir, _, _ = run
    client = s3_server.client()
    for p in run_dir.rglob("*"):
        if p.is_file():
            client.put_object(Bucket=s3_env, Key=f"runs/r1/{p.relative_to(run_dir)}", Body=p.read_bytes())
    before = [o["Key"] for o in client.list_objects_v2(Bucket=s3_env)["Contents"]]
    env = {**s3_server.env(), "XDG_CACHE_HOME": str(tmp_path / "cache")}
    r = fastimagic("open", f"s3://{s3_env}/runs/r1", "--expires", "600", env=env)
    assert r.returncode == 0, r.stderr
    url = r.stdout.strip()
    assert url == f"file://{tmp_path}/cache/fastimagic/pages/{s3_env}/runs/r1/index.html"
    html = urllib.request.urlopen(url, timeout=10).read().decode()
    assert "X-Amz-Expires=600" in html and s3_server.secret_key not in html  # image links are presigned
    again = fastimagic("open", f"s3://{s3_env}/runs/r1", env=env)
    assert again.returncode == 0 and again.stdout.strip() == url, again.stderr  # the same page, renewed
    assert [o["Key"] for o in client.list_objects_v2(Bucket=s3_env)["Contents"]] == before
    if Path("/usr/bin/chromium").exists():
        page = check_page(Path(url.removeprefix("file://")))
        assert page["images"] and all(img["naturalWidth"] > 0 for img in page["images"])


def test_fastimagic_open_escapes_every_manifest_value_and_refuses_damaged_ones_or_bad_arguments(
    s3_server, s3_env, run
):
    import urllib.request

    _, run_dir, manifest, _ = run
    client = s3_server.client()
    client.put_object(Bucket=s3_env, Key="runs/evil/manifest.json", Body=json.dumps({
        **manifest,
        "keyframes": [{**k, "pick": "<script>alert(1)</script>"} for k in manifest["keyframes"]],
        "storyboard": {**manifest["storyboard"], "name": "<script>alert(2)</script>"},
    }).encode())
    r = fastimagic("open", f"s3://{s3_env}/runs/evil", env=s3_server.env())
    assert r.returncode == 0, r.stderr
    html = urllib.request.urlopen(r.stdout.strip(), timeout=10).read().decode()
    assert "<script" not in html and "&lt;script&gt;alert(1)" in html
    client.put_object(Bucket=s3_env, Key="runs/broken/manifest.json",
                      Body=json.dumps({**manifest, "scenes": {"an": "object where a list belongs"}}).encode())
    ranks = [{**s, "picks": [{**p, "rank": "<script>3</script>"} for p in s["picks"]]} for s in manifest["scenes"]]
    client.put_object(Bucket=s3_env, Key="runs/seed/manifest.json",
                      Body=json.dumps({**manifest, "scenes": ranks}).encode())
    for args, said in (
        ((f"s3://{s3_env}/runs/broken",), "manifest.json: damaged, not a fastimagic run manifest"),
        ((f"s3://{s3_env}/runs/seed",), "manifest.json: damaged, not a fastimagic run manifest"),
        ((f"s3://{s3_env}/runs/../evil",), "'..'"),
        ((f"s3://{s3_env}/runs/evil", "--expires", "-5"), "--expires -5: a link lives 1 to 604800 seconds"),
        ((f"s3://{s3_env}/runs/evil", "--expires", "0"), "--expires 0: a link lives 1 to 604800 seconds"),
    ):
        r = fastimagic("open", *args, env=s3_server.env())
        [line] = r.stderr.strip().splitlines()
        assert r.returncode == 2 and line.startswith("fastimagic: ") and said in line, (args, r.stderr)
    r = fastimagic("submit", f"s3://{s3_env}/x.yaml", "--deployment", "nosuch")
    assert r.returncode == 2 and "a deployment is named FLOW/DEPLOYMENT" in r.stderr, r.stderr
