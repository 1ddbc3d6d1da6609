"""The operator's policy: a trust boundary for storyboards someone else wrote (the inbox, ``fastimagic submit``).

The inbox cases run the real inbox flow against the real S3 server (SeaweedFS)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_cli import fastimagic
from test_inbox import STORY, _keys

from fastimagic.policy import PolicyError, check, default_policy, for_home, load_policy
from fastimagic.storyboard_yaml import load_storyboard

STUDIO_POLICY = """\
references: [s3://studio-inbox/refs/]        # URI prefixes a storyboard's reference may use
outputs: [s3://studio-keyframes/]            # URI prefixes its output may use
models: [stable-diffusion-v1-5/stable-diffusion-v1-5, tiny]
allow_pickle: false
caps: {keyframes: 2000, seeds: 16, side: 1024, prompt_chars: 1000, reference_bytes: 20000000, storyboard_bytes: 1000000}
"""


def _write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_the_issue_example_policy_loads(tmp_path):
    policy = load_policy(_write(tmp_path, "policy.yaml", STUDIO_POLICY))
    assert policy.references == ("s3://studio-inbox/refs/",)
    assert policy.models == ("stable-diffusion-v1-5/stable-diffusion-v1-5", "tiny")
    assert policy.caps.seeds == 16 and policy.caps.storyboard_bytes == 1_000_000
    assert policy.source == str(tmp_path / "policy.yaml")


def test_a_broken_policy_file_names_every_problem_with_its_line(tmp_path):
    path = _write(tmp_path, "p.yaml", "references: s3://x\ncaps: {keyframes: 0, sids: 3}\nmodels: [./rel]\nfoo: 1\n")
    with pytest.raises(PolicyError) as info:
        load_policy(path)
    problems = info.value.problems
    assert problems[0].startswith(f"{path}:1 references: must be a list")
    assert f"{path}:2 caps.keyframes: must be at least 1 (got 0)" in problems
    assert f"{path}:2 caps.sids: unknown key 'sids' (did you mean 'side'?)" in problems
    assert any(p.startswith(f"{path}:3 models:") and "absolute" in p for p in problems)
    assert any(p.startswith(f"{path}:4 foo: unknown key 'foo'") for p in problems)


def test_policy_files_are_plain_yaml_and_regular_files(tmp_path):
    with pytest.raises(PolicyError, match="not allowed"):
        load_policy(_write(tmp_path, "p.yaml", "caps: !!python/object/apply:os.system [echo hi]\n"))
    with pytest.raises(PolicyError, match="no such file"):
        load_policy(tmp_path / "missing.yaml")
    with pytest.raises(PolicyError, match="is a device"):
        load_policy("/dev/zero")


HOSTILE = """\
name: hostile
reference: /etc/passwd
model: ./weights.ckpt
allow_pickle: true
output: /tmp/planted
max_seeds: 1000
max_keyframes: 100000
defaults: {seeds: 100, edit: {subtract: {gamma: [1.0]}}}
scenes:
  - {id: a, prompt: a photo}
"""


def test_validate_with_a_policy_reports_each_violation_at_its_line_and_exits_2(tmp_path):
    story = _write(tmp_path, "story.yaml", HOSTILE)
    policy = _write(tmp_path, "policy.yaml", STUDIO_POLICY)
    r = fastimagic("validate", "--policy", str(policy), str(story))
    assert r.returncode == 2, r.stderr
    # the storyboard raised max_seeds to 1000: only the operator's cap counts, and it counts first, while the
    # storyboard is read (nothing over it is ever made)
    [line] = r.stderr.removeprefix("fastimagic: ").splitlines()
    assert line == f"{story}:8 defaults.seeds: 100 seeds is more than the cap of 16 (caps.seeds), refused by the policy"
    story.write_text(HOSTILE.replace("seeds: 100", "seeds: 10"))
    r = fastimagic("validate", "--policy", str(policy), str(story))
    lines = r.stderr.removeprefix("fastimagic: ").splitlines()
    assert [line.split(": refused by the policy")[0] for line in lines] == [
        f"{story}:2 reference",
        f"{story}:3 model",
        f"{story}:4 allow_pickle",
        f"{story}:5 output",
    ]
    assert "/etc/passwd is not under allowed prefixes: s3://studio-inbox/refs/" in lines[0]
    # FASTIMAGIC_POLICY names it too
    r = fastimagic("validate", str(story), env={"FASTIMAGIC_POLICY": str(policy)})
    assert r.returncode == 2 and r.stderr.count("refused by the policy") == 4
    # a broken policy is exit 2 with its own lines
    r = fastimagic("validate", "--policy", str(_write(tmp_path, "bad.yaml", "caps: 3\n")), str(story))
    assert r.returncode == 2 and "bad.yaml:1 caps: must be a mapping" in r.stderr


def test_a_storyboards_own_caps_only_lower_the_operators(tmp_path):
    story = _write(tmp_path, "s.yaml", "name: x\nreference: s3://studio-inbox/refs/a.png\nmax_seeds: 4\n"
                   "output: s3://studio-keyframes/out\n"
                   "defaults: {edit: {subtract: {gamma: [1.0]}}}\nscenes:\n  - {id: a, prompt: p, seeds: 5}\n")
    policy = load_policy(_write(tmp_path, "policy.yaml", STUDIO_POLICY))
    with pytest.raises(Exception, match="5 seeds is more than max_seeds"):  # the storyboard's lower cap holds
        load_storyboard(story)
    ok = load_storyboard(_write(tmp_path, "ok.yaml", story.read_text().replace("seeds: 5", "seeds: 4")))
    assert check(ok, policy) == []


def test_caps_on_keyframes_prompts_side_and_size(tmp_path):
    policy = for_home(
        default_policy().model_copy(update={"caps": default_policy().caps.model_copy(
            update={"keyframes": 3, "prompt_chars": 20, "side": 256, "storyboard_bytes": 100})}),
        "s3://studio-inbox/",
    )
    story = _write(tmp_path, "s.yaml", "name: x\nreference: s3://studio-inbox/a.png\noutput: s3://studio-inbox/o\n"
                   "resolution: 512\nsource_prompt: " + "s" * 30 + "\n"
                   "defaults: {seeds: 2, edit: {subtract: {gamma: [1.0, 1.1]}}}\n"
                   "scenes:\n  - {id: a, prompt: " + "p" * 40 + "}\n")
    problems = check(load_storyboard(story), policy)
    text = "\n".join(problems)
    assert "4 keyframes is more than the cap of 3" in text
    assert "scenes[0].prompt: refused by the policy: 40 characters is more than the cap of 20" in text
    assert "source_prompt" in text and "512 px is more than the cap of 256" in text
    assert "bytes, more than the cap of 100" in text


def test_the_default_policy_allows_only_the_storyboards_own_bucket(tmp_path):
    text = STORY.format(reference="s3://studio-inbox/refs/x.jpg", output="s3://studio-inbox/out")
    board = load_storyboard("s3://studio-inbox/storyboards/inbox/a.yaml", text=text)
    assert check(board, default_policy()) == []
    elsewhere = text.replace("s3://studio-inbox/out", "s3://other-bucket/out")
    [problem] = check(load_storyboard("s3://studio-inbox/storyboards/inbox/a.yaml", text=elsewhere), default_policy())
    assert "output: refused by the policy: s3://other-bucket/out is not under the storyboard's home" in problem
    # a local storyboard has no home: the default allows no local paths
    local = load_storyboard(_write(tmp_path, "a.yaml", STORY.format(reference="x.jpg", output="out")))
    assert len(check(local, default_policy())) == 2
    # `..` cannot climb out of an allowed prefix: such keys are refused by the schema itself
    with pytest.raises(Exception, match="'..' segment"):
        load_storyboard("s3://studio-inbox/a.yaml", text=text.replace("refs/x.jpg", "refs/../../private/x.jpg"))


def test_a_symlink_inside_an_allowed_folder_that_points_out_is_outside(tmp_path):
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    (allowed / "link.jpg").symlink_to("/etc/hostname")
    story = _write(allowed, "s.yaml", STORY.format(reference="link.jpg", output="out"))
    policy = for_home(default_policy(), str(allowed))
    [problem] = check(load_storyboard(story), policy)
    assert "reference: refused by the policy" in problem


def test_submit_checks_the_policy_before_contacting_any_server(tmp_path, photo_bytes):
    (tmp_path / "x.jpg").write_bytes(photo_bytes)
    story = _write(tmp_path, "s.yaml", STORY.format(reference="x.jpg", output="out"))
    r = fastimagic("submit", str(story), "--deployment", "storyboard/storyboard",
                   env={"PREFECT_API_URL": "http://127.0.0.1:9/api"})
    assert r.returncode == 2, r.stderr
    assert "s.yaml:2 reference: refused by the policy" in r.stderr and "s.yaml:14 output" in r.stderr
    assert "policy file (--policy FILE or $FASTIMAGIC_POLICY: references: [...])" in r.stderr
    assert "Traceback" not in r.stderr


# --- the inbox, on the real S3 server -------------------------------------------------------------------------


@pytest.fixture
def inbox(s3_server, s3_env, photo_bytes):
    bucket = s3_env
    client = s3_server.client()
    client.put_object(Bucket=bucket, Key="refs/x.jpg", Body=photo_bytes)
    return client, bucket, f"s3://{bucket}/storyboards"


def _upload(client, bucket: str, name: str, text: str | bytes) -> None:
    body = text.encode() if isinstance(text, str) else text
    client.put_object(Bucket=bucket, Key=f"storyboards/inbox/{name}", Body=body)


def _error(client, bucket: str, name: str) -> str:
    return client.get_object(Bucket=bucket, Key=f"storyboards/failed/{name}.error.txt")["Body"].read().decode()


def test_inbox_refuses_what_the_policy_forbids_and_says_only_that(inbox, tmp_path, s3_server):
    from flows.inbox import inbox_flow

    client, bucket, uri = inbox
    other = s3_server.make_bucket()
    client.put_object(Bucket=other, Key="private/p.jpg", Body=b"secret")
    (tmp_path / "weights.ckpt").write_bytes(b"not really")
    ok_ref, ok_out = f"s3://{bucket}/refs/x.jpg", f"s3://{bucket}/out"
    cases = {
        "worker-file.yaml": STORY.format(reference="/etc/hostname", output=ok_out),
        "worker-missing.yaml": STORY.format(reference="/etc/no-such-file-here", output=ok_out),
        "cross-bucket.yaml": STORY.format(reference=f"s3://{other}/private/p.jpg", output=f"s3://{other}/out"),
        "plant.yaml": STORY.format(reference=ok_ref, output=str(tmp_path / "planted")),
        "pickle.yaml": STORY.format(reference=ok_ref, output=ok_out).replace(
            "model: tiny", f"model: {tmp_path / 'weights.ckpt'}\nallow_pickle: true"),
        "caps.yaml": STORY.format(reference=ok_ref, output=ok_out).replace("seeds: 1", "seeds: 200").replace(
            "name: Inbox Story", "name: Inbox Story\nmax_seeds: 500\nmax_keyframes: 100000"),
    }
    for name, text in cases.items():
        _upload(client, bucket, name, text)

    results = {r["name"]: r for r in inbox_flow(inbox=uri)}

    assert {n: r["status"] for n, r in results.items()} == dict.fromkeys(cases, "failed")
    errors = {name: _error(client, bucket, name) for name in cases}
    for name, error in errors.items():
        assert "refused by the policy" in error, (name, error)
    assert f"reference: refused by the policy: /etc/hostname is not under allowed prefixes: s3://{bucket}/" in errors[
        "worker-file.yaml"]
    # an existing and a missing worker file get the same answer: the uploader learns nothing about the disk
    assert errors["worker-file.yaml"].replace("/etc/hostname", "X") == errors["worker-missing.yaml"].replace(
        "/etc/no-such-file-here", "X").replace("worker-missing", "worker-file")
    assert "output: refused" in errors["cross-bucket.yaml"] and "reference: refused" in errors["cross-bucket.yaml"]
    assert "output: refused" in errors["plant.yaml"] and not (tmp_path / "planted").exists()
    assert "model: refused" in errors["pickle.yaml"] and "allow_pickle: refused" in errors["pickle.yaml"]
    assert "200 seeds is more than the cap of 64" in errors["caps.yaml"]
    assert _keys(client, bucket, "out/") == [] and _keys(client, other, "out/") == []


def test_inbox_with_an_operator_policy_file_runs_what_it_allows(inbox, tmp_path, s3_server, monkeypatch):
    from flows.inbox import inbox_flow

    client, bucket, uri = inbox
    out_bucket = s3_server.make_bucket()
    policy = _write(tmp_path, "policy.yaml", f"references: [s3://{bucket}/refs/]\noutputs: [s3://{out_bucket}/]\n"
                    "models: [tiny]\ncaps: {seeds: 1}\n")
    _upload(client, bucket, "a.yaml", STORY.format(reference=f"s3://{bucket}/refs/x.jpg", output=f"s3://{out_bucket}/o"))
    _upload(client, bucket, "b.yaml", STORY.format(reference=f"s3://{bucket}/refs/x.jpg", output=f"s3://{bucket}/o"))

    monkeypatch.setenv("FASTIMAGIC_POLICY", str(policy))  # the inbox's own environment: never a parameter
    results = {r["name"]: r for r in inbox_flow(inbox=uri)}

    assert results["a.yaml"]["status"] == "done", results
    assert results["b.yaml"]["status"] == "failed"
    assert f"not under allowed prefixes: s3://{out_bucket}/" in _error(client, bucket, "b.yaml")
    assert any(k.endswith("/manifest.json") for k in _keys(client, out_bucket, "o/"))


def test_one_bad_inbox_object_fails_alone(inbox):
    from flows.inbox import inbox_flow

    client, bucket, uri = inbox
    good = STORY.format(reference=f"s3://{bucket}/refs/x.jpg", output=f"s3://{bucket}/out")
    _upload(client, bucket, "tab\tname.yaml", good)
    _upload(client, bucket, "huge.yaml", "name: x\n" + "#" * 1_100_000 + "\n")
    _upload(client, bucket, "latin1.yaml", good.replace("a photo of a bird on a branch", "caf\xe9").encode("latin-1"))
    _upload(client, bucket, "good.yaml", good)

    results = {r["name"]: r for r in inbox_flow(inbox=uri)}

    assert results["good.yaml"]["status"] == "done"
    assert results["tab\\tname.yaml"]["status"] == "skipped" and "control character" in results["tab\\tname.yaml"][
        "reason"]
    assert results["huge.yaml"]["status"] == "failed"
    assert "more than the cap of 1000000 bytes (storyboard_bytes)" in _error(client, bucket, "huge.yaml")
    assert "storyboards/failed/huge.yaml" not in _keys(client, bucket, "storyboards/failed/")  # not copied
    assert results["latin1.yaml"]["status"] == "failed"
    assert "not UTF-8 text" in _error(client, bucket, "latin1.yaml")
    manifests = [k for k in _keys(client, bucket, "out/") if k.endswith("/manifest.json") and "/scenes/" not in k]
    assert len(manifests) == 1


def test_an_inbox_failure_on_the_worker_does_not_leak_its_details(inbox, monkeypatch):
    import flows.storyboard
    from flows.inbox import inbox_flow

    client, bucket, uri = inbox

    from prefect import flow

    @flow(name="storyboard")
    def broken(storyboard: str, run_id: str | None = None, resume: bool = False, policy: dict | None = None):
        raise OSError("/srv/worker/secret-path/model.bin: permission denied")

    monkeypatch.setattr(flows.storyboard, "storyboard_flow", broken)
    _upload(client, bucket, "a.yaml", STORY.format(reference=f"s3://{bucket}/refs/x.jpg", output=f"s3://{bucket}/o"))
    [result] = inbox_flow(inbox=uri)
    error = _error(client, bucket, "a.yaml")
    assert result["status"] == "failed" and "secret-path" not in error and "OSError" in error
    [record] = _keys(client, bucket, "storyboards/runs/")
    assert "secret-path" not in client.get_object(Bucket=bucket, Key=record)["Body"].read().decode()
    assert json.loads(client.get_object(Bucket=bucket, Key=record)["Body"].read())["status"] == "failed"


@pytest.mark.parametrize(
    "caps, found",
    [
        # the reference is read with the cap: a larger file is refused before it is decoded
        ("{reference_bytes: 1000}", "story.yaml:2 reference: "),
        # one number keeps the reference's aspect: 64 on a 320x240 reference is 88x64, over the cap of 64 a side
        ("{side: 64}", "story.yaml:4 resolution: 64 on a 320x240 reference gives 88x64, over the policy cap"
                       " (caps.side) 64"),
    ],
    ids=["reference_bytes", "side"],
)
def test_run_applies_the_policys_run_time_caps_in_one_line_exit_2_and_writes_nothing(tmp_path, caps, found):
    from test_cli import _board

    from fastimagic.tiny import drawn_photo

    story = _board(tmp_path, drawn_photo(320, 240), resolution="64")
    policy = _write(tmp_path, "policy.yaml", f"references: ['{tmp_path}/']\noutputs: ['{tmp_path}/']\n"
                    f"models: [tiny]\ncaps: {caps}\n")
    r = fastimagic("run", "--policy", str(policy), str(story))
    assert r.returncode == 2, r.stderr[-2000:]
    [line] = r.stderr.strip().splitlines()
    assert line.startswith("fastimagic: ") and found in line, line
    if "reference_bytes" in caps:
        assert line.endswith("bytes, more than the limit of 1,000"), line
    assert not (tmp_path / "out").exists()
    assert fastimagic("validate", "--policy", str(policy), str(story)).returncode == 0  # known only at run time


def test_a_vae_override_is_a_model_to_the_policy_and_every_tiny_model_can_be_listed(tmp_path):
    head = "name: x\nreference: s3://studio-inbox/refs/a.png\noutput: s3://studio-keyframes/out\n"
    tail = "defaults: {edit: {subtract: {gamma: [1.0]}}}\nscenes:\n  - {id: a, prompt: p}\n"
    studio = load_policy(_write(tmp_path, "policy.yaml", STUDIO_POLICY.replace(", tiny]", ", tiny, tiny-sdxl]")))
    assert studio.models[-1] == "tiny-sdxl"
    assert check(load_storyboard(_write(tmp_path, "xl.yaml", head + "model: tiny-sdxl\n" + tail)), studio) == []
    hub_vae = load_storyboard(_write(tmp_path, "v.yaml", head + "vae: madebyollin/sdxl-vae-fp16-fix\n" + tail))
    [problem] = check(hub_vae, studio)
    assert problem.startswith(f"{tmp_path}/v.yaml:4 vae: refused by the policy")
    assert "model madebyollin/sdxl-vae-fp16-fix is not one of the allowed models" in problem
    (tmp_path / "my-vae").mkdir()
    local_vae = load_storyboard(_write(tmp_path, "l.yaml", head + f"vae: {tmp_path}/my-vae\n" + tail))
    no_models = STUDIO_POLICY.replace("models: [stable-diffusion-v1-5/stable-diffusion-v1-5, tiny]\n", "")
    [problem] = check(local_vae, load_policy(_write(tmp_path, "no-models.yaml", no_models)))
    assert problem.startswith(f"{tmp_path}/l.yaml:4 vae: refused by the policy") and "local models are not" in problem


# --- a worker obeys its operator; what a submitter sends is plain data (issue 21) ---------------------------------


def _record(serializer: dict, result: str) -> bytes:
    return json.dumps({"metadata": {"storage_key": "k", "serializer": serializer}, "result": result}).encode()


def test_task_records_are_read_as_plain_json_whatever_serializer_they_name(tmp_path):
    import base64
    import os
    import pickle

    from flows.workers import NotPlain, plain_record

    marker = tmp_path / "ran"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    pickled = base64.b64encode(pickle.dumps({"parameters": {"board": Evil()}})).decode()
    with pytest.raises(NotPlain, match="refused unread: serialized as 'pickle'"):
        plain_record(_record({"type": "pickle", "picklelib": "cloudpickle"}, pickled), "parameters/x")
    # JSON naming its own decoder (any importable callable, called on every object): parsed as data, nothing called
    evil_json = {"type": "json", "jsonlib": "os", "object_decoder": "os.system"}
    assert plain_record(_record(evil_json, json.dumps({"parameters": {"a": {"b": 1}}})), "p") == {
        "parameters": {"a": {"b": 1}}}
    for raw in (b"\x80\x04not json", b"[]", _record({"type": "json"}, "{not json"), b"x" * (65 * 2**20)):
        with pytest.raises(NotPlain):
            plain_record(raw, "p")
    assert not marker.exists()


def test_warm_task_parameters_are_checked_against_the_storyboard_and_the_workers_policy(tmp_path, monkeypatch):
    from fastimagic.policy import PolicyRefused
    from tasks.params import BadParameters, render_args, render_params, worker_board

    text = STORY.format(reference="s3://studio/refs/x.jpg", output="s3://studio/out")
    board = load_storyboard("s3://studio/storyboards/a.yaml", text=text)
    params = render_params(board, board.scenes[0], [0], "0" * 32, "s3://studio/out", f"{board.slug}/run-1", ("none",))
    assert json.loads(json.dumps(params)) == list(params)  # plain data, nothing else
    policy = _write(tmp_path, "policy.yaml", "references: [s3://studio/refs/]\noutputs: [s3://studio/]\n")
    monkeypatch.setenv("FASTIMAGIC_POLICY", str(policy))  # the worker's own: no storyboard fetch needed
    got_board, scene, seeds, key, output, run_prefix, strategies = render_args(*params)
    assert (scene.id, seeds, output, strategies) == (board.scenes[0].id, [0], "s3://studio/out", ("none",))
    bad = [  # the parameter replaced, its value, what the worker says
        (4, "/tmp/planted", "the output is not the storyboard's"),
        (1, "nope", "no such scene"),
        (2, [999], "the seeds are not the scene's"),
        (2, 0, "the seeds are not the scene's"),  # a list, as a unit is a scene's seeds
        (2, [0, 0], "the seeds are not the scene's"),
        (3, "../../etc", "the tuning key is not a content key"),
        (5, "elsewhere/run-1", "the run folder is not the storyboard's"),
        (6, ["rm -rf"], "unknown forgetting strategies"),
    ]
    for i, value, said in bad:
        with pytest.raises(BadParameters, match=said):
            render_args(*params[:i], value, *params[i + 1:])
    for data in ({"storyboard": "s3://x/a.yaml"}, {**params[0], "overrides": {"reference": "/etc/passwd"}}):
        with pytest.raises(BadParameters):
            worker_board(data)
    # the worker's policy applies to the plain data, whatever the submitter's allowed
    strict = _write(tmp_path, "strict.yaml", "references: [s3://studio/refs/]\noutputs: [s3://elsewhere/]\n")
    monkeypatch.setenv("FASTIMAGIC_POLICY", str(strict))
    with pytest.raises(PolicyRefused, match="output: refused by the policy"):
        render_args(*params)


def test_the_storyboard_flow_and_the_inbox_take_no_policy_parameter():
    import inspect

    from flows.inbox import inbox_flow
    from flows.storyboard import storyboard_flow

    assert "policy" not in inspect.signature(storyboard_flow.fn).parameters
    assert "policy" not in inspect.signature(inbox_flow.fn).parameters


def test_a_deployments_storyboard_is_an_s3_uri_or_under_the_policys_local_references(tmp_path):
    from fastimagic.policy import PolicyRefused
    from flows.storyboard import storyboard_allowed

    storyboard_allowed("s3://studio/storyboards/a.yaml", default_policy())
    with pytest.raises(PolicyRefused, match="/etc/passwd: refused by the policy"):
        storyboard_allowed("/etc/passwd", default_policy())  # never opened for someone else
    policy = load_policy(_write(tmp_path, "p.yaml", f"references: [{tmp_path / 'inbox'}]\n"))
    storyboard_allowed(str(tmp_path / "inbox" / "a.yaml"), policy)
    with pytest.raises(PolicyRefused):
        storyboard_allowed(str(tmp_path / "inbox" / ".." / "p.yaml"), policy)


def test_the_policy_bounds_compute_with_defaults_a_real_storyboard_fits_in(tmp_path):
    story = STORY.format(reference="s3://studio/refs/x.jpg", output="s3://studio/out")
    paper = story.replace("{steps: 2, min_steps: 2}", "{steps: 40, batch_size: 10}").replace(
        "steps: 2\n", "steps: 50\n")
    assert check(load_storyboard("s3://studio/a.yaml", text=paper), default_policy()) == []
    heavy = (story.replace("{steps: 2, min_steps: 2}", "{steps: 1000, batch_size: 64, min_steps: 2}")
             .replace("resolution: 64", "resolution: 2048x2048").replace("steps: 2\n", "steps: 1000\n"))
    path = _write(tmp_path, "heavy.yaml", heavy)
    r = fastimagic("validate", "--policy", str(_write(tmp_path, "p.yaml", "{}\n")), str(path))
    assert r.returncode == 2
    said = {line.split(": refused by the policy")[0].removeprefix("fastimagic: "): line.split("): ", 1)[1]
            for line in r.stderr.strip().splitlines()}
    assert said[f"{path}:4 resolution"] == "4194304 pixels a keyframe is more than the cap of 2097152" \
                                           " (caps.keyframe_pixels)"
    assert said[f"{path}:6 finetune.steps"] == "1000 is more than the cap of 200 (caps.finetune_steps)"
    assert said[f"{path}:6 finetune.batch_size"] == "64 is more than the cap of 16 (caps.finetune_batch)"
    assert said[f"{path}:9 defaults.steps"] == "1000 sampling steps is more than the cap of 200 (caps.sampling_steps)"
    # many cheap keyframes still add up: the budget (megapixel-steps) is the run's, not one keyframe's
    many = story.replace("resolution: 64", "resolution: 1024").replace("steps: 2\n", "steps: 200\n").replace(
        "seeds: 1", "seeds: 64").replace("gamma: [1.0]", "gamma: {from: 0.5, to: 2.0, step: 0.1}")
    [line] = check(load_storyboard("s3://studio/a.yaml", text=many), default_policy())
    assert "megapixel-steps" in line and "more than the budget of 200000 (caps.budget)" in line
    raised = default_policy().model_copy(update={"caps": default_policy().caps.model_copy(update={"budget": 10**7})})
    assert check(load_storyboard("s3://studio/a.yaml", text=many), raised) == []


def test_seed_and_range_bombs_are_counted_against_the_policy_before_anything_is_made(tmp_path):
    story = STORY.format(reference="s3://studio/refs/x.jpg", output="s3://studio/out")
    raised = story.replace("name: Inbox Story", "name: Inbox Story\nmax_seeds: 100000\nmax_keyframes: 1000000")
    bombs = {
        "seeds.yaml": raised.replace("  seeds: 1\n", "  seeds: 100000\n"),
        "range.yaml": raised.replace("gamma: [1.0]", "gamma: {from: 0, to: 0.09, step: 0.0000001}"),
        "scenes.yaml": raised.replace("  seeds: 1\n", "  seeds: 64\n").replace(
            "gamma: [1.0]", "gamma: {from: 0, to: 1.99, step: 0.01}").replace("scenes:\n", "scenes:\n" + "".join(
                f"  - {{id: s{i}, prompt: p}}\n" for i in range(2000))),
    }
    policy = _write(tmp_path, "p.yaml", "{}\n")
    for name, text in bombs.items():
        r = fastimagic("validate", "--policy", str(policy), str(_write(tmp_path, name, text)))
        assert r.returncode == 2, (name, r.stderr[-500:])
        assert "refused by the policy" in r.stderr and ("caps.seeds" in r.stderr or "caps.keyframes" in r.stderr), (
            name, r.stderr[-2000:])
    # counted, never made: reading the 900,000-value range under the policy allocates next to nothing
    import tracemalloc

    from fastimagic.storyboard_yaml import StoryboardError

    tracemalloc.start()
    with pytest.raises(StoryboardError, match="caps.keyframes"):
        load_storyboard(tmp_path / "range.yaml", caps=default_policy().caps)
    assert tracemalloc.get_traced_memory()[1] < 20_000_000
    tracemalloc.stop()
    # no policy at all: a storyboard cannot raise its own limits past the ceilings
    [line] = fastimagic("validate", str(_write(tmp_path, "sky.yaml", story.replace(
        "name: Inbox Story", "name: Inbox Story\nmax_seeds: 400000000")))).stderr.strip().splitlines()
    assert "max_seeds: must be at most 100000" in line or "less than or equal to 100000" in line, line


def test_a_reference_swapped_for_a_link_after_the_policy_check_is_refused_as_opened(tmp_path, photo_bytes):
    from fastimagic.policy import enforce
    from fastimagic.store import OutsideAllowed
    from tasks.pipeline import fetch_reference

    allowed, private = tmp_path / "refs", tmp_path / "private"
    allowed.mkdir()
    private.mkdir()
    (private / "face.jpg").write_bytes(photo_bytes + b"private")
    (allowed / "ok.jpg").write_bytes(photo_bytes)
    policy = load_policy(_write(tmp_path, "p.yaml", f"references: [{allowed}]\noutputs: [{tmp_path / 'out'}]\n"))
    story = _write(tmp_path, "s.yaml", STORY.format(reference=allowed / "r.jpg", output=tmp_path / "out"))
    (allowed / "r.jpg").write_bytes(photo_bytes)
    board = load_storyboard(story)
    enforce(board, policy)  # the path is fine now
    (allowed / "r.jpg").unlink()
    (allowed / "r.jpg").symlink_to(private / "face.jpg")  # and is a link out when it is read
    with pytest.raises(OutsideAllowed, match="refused by the policy: as opened"):
        fetch_reference.fn(board)
    (allowed / "r.jpg").unlink()
    (allowed / "r.jpg").symlink_to(allowed / "ok.jpg")  # a link that stays inside is read
    assert fetch_reference.fn(board).data == photo_bytes
