"""The storyboard pipeline end to end: the real Prefect flow (embedded server) into a real S3 server."""

from __future__ import annotations

import hashlib
import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from fastimagic import keyframes as kf
from fastimagic.merge import Subtract

STORY = """\
name: Beach Day
reference: {reference}
model: tiny
resolution: 64x72
source_prompt: a photo of two friends on the beach
finetune: {{steps: 6, min_steps: 6}}
defaults:
  seeds: 2
  steps: 4
  edit: {{subtract: {{gamma: [0.9, 1.2]}}}}
scenes:
  - id: walking
    prompt: a photo of two friends walking on the beach
    forget: [none, encoderattn]
  - id: dancing
    prompt: a photo of two friends dancing
    forget: decoderattn
    edit: {{project: {{alpha: [0.8], beta: [1.0, 1.5]}}}}
  - id: night
    prompt: a photo of two friends at night <script>alert(1)</script>
    negative_prompt: blurry
output: {output}
"""


@pytest.fixture
def board_on_s3(s3_server, s3_env, tmp_path, photo_bytes):
    """A storyboard file whose reference and output both live in the test S3 server."""
    bucket = s3_env
    s3_server.client().put_object(Bucket=bucket, Key="refs/friends.jpg", Body=photo_bytes)
    path = tmp_path / "story.yaml"
    path.write_text(STORY.format(reference=f"s3://{bucket}/refs/friends.jpg", output=f"s3://{bucket}/out"))
    return path, bucket


def _objects(client, bucket, prefix):
    keys, token = [], None
    while True:
        kw = {"ContinuationToken": token} if token else {}
        page = client.list_objects_v2(Bucket=bucket, Prefix=prefix, **kw)
        keys += [o["Key"] for o in page.get("Contents", [])]
        if not page.get("IsTruncated"):
            return keys
        token = page["NextContinuationToken"]


def test_storyboard_runs_end_to_end_into_s3_and_reuses_the_tuning(board_on_s3, s3_server):
    from flows.storyboard import storyboard_flow

    path, bucket = board_on_s3
    client = s3_server.client()
    state = storyboard_flow(storyboard=str(path), return_state=True)
    first = state.result()
    assert first["keyframes"] == 2 * 2 * 2 + 2 * 2 + 2 * 2
    assert first["tuning_reused"] is False
    run = f"out/beach-day/{first['run_id']}"
    manifest = json.loads(client.get_object(Bucket=bucket, Key=f"{run}/manifest.json")["Body"].read())

    assert manifest["status"] == "complete" and manifest["run_id"] == first["run_id"]
    assert manifest["storyboard"]["source"] == path.read_text()
    assert manifest["model"]["identity"] == "tiny:v1"
    assert manifest["source_prompt"] == "a photo of two friends on the beach" and manifest["caption"] is None
    assert manifest["tuning"]["key"] == first["tuning_key"]
    assert set(manifest["timings"]) >= {"finetune_seconds", "total_seconds"}
    assert {s["id"] for s in manifest["scenes"]} == {"walking", "dancing", "night"}
    forgets = {k["forget"] for k in manifest["keyframes"]}
    assert forgets == {"none", "encoderattn", "decoderattn"}
    for k in manifest["keyframes"]:
        data = client.get_object(Bucket=bucket, Key=f"{run}/{k['key']}")["Body"].read()
        assert hashlib.sha256(data).hexdigest() == k["sha256"]
        img = Image.open(io.BytesIO(data))
        img.load()
        assert img.size == (64, 72) == (k["width"], k["height"])
        assert {"scene", "prompt", "seed", "edit", "forget"} <= set(k)
    stored = set(_objects(client, bucket, run + "/"))
    assert {f"{run}/{k['key']}" for k in manifest["keyframes"]} <= stored
    for scene in ("walking", "dancing", "night"):
        assert f"{run}/scenes/{scene}/manifest.json" in stored
        sheet = client.get_object(Bucket=bucket, Key=f"{run}/scenes/{scene}/contact-sheet.jpg")["Body"].read()
        assert Image.open(io.BytesIO(sheet)).format == "JPEG"
    page = client.get_object(Bucket=bucket, Key=f"{run}/index.html")["Body"].read().decode()
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page and "<script>alert" not in page
    tuning_files = _objects(client, bucket, f"out/tunings/{first['tuning_key']}/")
    assert len(tuning_files) == 2  # tuning.json + one weights file

    second = storyboard_flow(storyboard=str(path))
    assert second["tuning_reused"] is True
    assert second["tuning_key"] == first["tuning_key"]
    assert second["run_id"] != first["run_id"]
    assert _objects(client, bucket, f"out/tunings/{first['tuning_key']}/") == tuning_files
    again = json.loads(client.get_object(Bucket=bucket, Key=f"out/beach-day/{second['run_id']}/manifest.json")
                       ["Body"].read())
    # the same tuning and seeds give the same keyframes
    assert [k["sha256"] for k in again["keyframes"]] == [k["sha256"] for k in manifest["keyframes"]]

    _check_prefect_records(state)


def _check_prefect_records(state):
    """Render tasks carry the gpu tag; the fine-tune left a progress artifact on the flow run."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, FlowRunFilter, FlowRunFilterId

    flow_run_id = state.state_details.flow_run_id
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
        renders = [r for r in runs if r.name.startswith("render ")]
        assert len(renders) == 3  # one unit of GPU work per scene: all its seeds and strategies
        assert all("gpu" in r.tags for r in renders)
        assert all(r.state.is_completed() for r in runs)
        artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(
            any_=[flow_run_id])))
        progress = [a for a in artifacts if a.type == "progress"]
        assert progress and progress[0].data == 100.0


def test_without_a_source_prompt_blip_captions_the_reference(tmp_path, photo_bytes):
    from flows.storyboard import storyboard_flow

    (tmp_path / "ref.jpg").write_bytes(photo_bytes)
    (tmp_path / "story.yaml").write_text(
        "name: captioned\nreference: ref.jpg\nmodel: tiny\nresolution: 64\nfinetune: {steps: 2, min_steps: 2}\n"
        "defaults: {seeds: 1, steps: 2, edit: {subtract: {gamma: [1.0]}}}\n"
        "scenes: [{id: a, prompt: A photo of a bird flying}]\noutput: out\n"
    )
    result = storyboard_flow(storyboard=str(tmp_path / "story.yaml"))
    manifest = json.loads(open(result["manifest"]).read())
    assert manifest["caption"]  # the tiny BLIP's words
    assert manifest["source_prompt"] == f"A photo of {manifest['caption']}"


def test_an_explicit_source_prompt_never_loads_blip(tmp_path, monkeypatch):
    import tasks.pipeline as pipeline
    from fastimagic.manifests import Reference, SourcePrompt
    from fastimagic.storyboard_yaml import load_storyboard

    def refuse(*args, **kwargs):
        raise AssertionError("BLIP must not be loaded when source_prompt is given")

    monkeypatch.setattr(pipeline, "load_captioner", refuse)
    (tmp_path / "s.yaml").write_text("name: x\nreference: r.jpg\nsource_prompt: a bird\nscenes: [{id: a, prompt: b}]\n")
    board = load_storyboard(tmp_path / "s.yaml")
    reference = Reference(data=b"", sha256="", uri="r.jpg", size=(64, 64))
    assert pipeline.caption_reference.fn(board, reference) == SourcePrompt("a bird", caption=None)


UNITS = """\
name: units
reference: ref.jpg
model: tiny
resolution: 64
source_prompt: a photo of a bird
finetune: {steps: 2, min_steps: 2}
scorer: none
defaults: {seeds: [5, 1, 3], steps: 3, edit: {subtract: {gamma: [0.8, 0.9, 1.0, 1.1]}}}
scenes:
  - {id: flying, prompt: a photo of a bird flying}
  - {id: singing, prompt: a photo of a bird singing, forget: encoderattn}
  - {id: sleeping, prompt: a photo of a bird sleeping, negative_prompt: blurry}
output: out
"""


def _units_board(tmp_path, photo_bytes):
    (tmp_path / "ref.jpg").write_bytes(photo_bytes)
    (tmp_path / "story.yaml").write_text(UNITS)
    return str(tmp_path / "story.yaml")


def test_a_scene_is_one_sampling_call_on_a_tuning_applied_once_and_matches_keyframes_rendered_alone(
    tmp_path, photo_bytes, tiny_model, monkeypatch
):
    """3 scenes x 3 seeds x 4 gammas: the tuning is applied once for the run (not per (scene, seed)), each scene
    is one sampling call of 12 rows (the sampler chunks it), and every keyframe is the one rendered on its own."""
    import fastimagic.editor as editor_module
    from fastimagic.editor import Editor
    from fastimagic.tuning import Tuning
    from flows.storyboard import storyboard_flow

    applied, rows = [], []
    apply, sample = Editor.__init__, editor_module.sample

    def counting_apply(self, model, tuning):
        applied.append(tuning.key)
        apply(self, model, tuning)

    def counting_sample(model, embeddings, seeds, **kw):
        rows.append(len(seeds))
        return sample(model, embeddings, seeds, **kw)

    monkeypatch.setattr(Editor, "__init__", counting_apply)
    monkeypatch.setattr(editor_module, "sample", counting_sample)
    result = storyboard_flow(storyboard=_units_board(tmp_path, photo_bytes))
    monkeypatch.undo()
    assert applied == [result["tuning_key"]]
    assert rows == [12, 12, 12]

    manifest = json.loads(open(result["manifest"]).read())
    run_dir = tmp_path / "out" / "units" / result["run_id"]
    stored = tmp_path / "out" / "tunings" / result["tuning_key"]
    tuning = Tuning.read(lambda name: (stored / name).read_bytes(), where=str(stored))
    records = manifest["keyframes"]
    assert [(r["scene"], r["seed"]) for r in records][::4] == [(s, seed) for s in ("flying", "singing", "sleeping")
                                                                for seed in (5, 1, 3)]
    with tiny_model.lock, Editor(tiny_model, tuning) as editor:
        for r in records:
            alone = editor.render(r["prompt"], seeds=[r["seed"]], edits=[r["edit"]], forget=r["forget"],
                                  sigma=r["sigma"], steps=r["steps"], guidance=r["guidance"],
                                  negative_prompt=r["negative_prompt"], max_batch=1)[0]
            data = (run_dir / r["key"]).read_bytes()
            assert kf.sha256(data) == r["sha256"]
            # seeds decide the noise; batched float arithmetic may round one 8-bit level differently
            diff = np.abs(np.asarray(alone.image, dtype=int) - np.asarray(Image.open(io.BytesIO(data)), dtype=int))
            assert diff.max() <= 1, r["key"]


def test_a_unit_writes_with_the_device_free_and_counted_as_writing_behind(tmp_path, photo_bytes, monkeypatch):
    """While a render unit writes its keyframes, the model is free for the next unit (another thread can take its
    lock; another scene may be rendering on it meanwhile) and the unit counts in ``units_writing`` (what a warm
    worker looks at before taking its next unit); afterwards nothing counts."""
    import threading

    from flows.storyboard import storyboard_flow
    from tasks import pipeline

    seen = []
    write = pipeline._write_unit

    def watching(unit):
        model = pipeline._model(unit.board)
        free = []

        def probe():  # from another thread (the lock is reentrant for its holder), once another scene's unit
            free.append(model.lock.acquire(timeout=120))  # rendering meanwhile lets go: not held by this writer
            if free[0]:
                model.lock.release()

        other = threading.Thread(target=probe)
        other.start()
        other.join()
        seen.append((unit.scene.id, free[0], pipeline.units_writing()))
        return write(unit)

    monkeypatch.setattr(pipeline, "_write_unit", watching)
    storyboard_flow(storyboard=_units_board(tmp_path, photo_bytes))
    assert sorted(s for s, _, _ in seen) == ["flying", "singing", "sleeping"]
    assert all(free and writing >= 1 for _, free, writing in seen), seen
    assert pipeline.units_writing() == 0


def test_a_failed_write_mid_scene_fails_the_run_and_a_resume_completes_it(tmp_path, photo_bytes):
    """A keyframe of the middle seed of a scene cannot be written (a folder sits at its path): the run fails without
    a manifest; once the path is free, ``--resume`` keeps what was written intact and renders the rest."""
    from fastimagic.store import StoreError
    from flows.storyboard import storyboard_flow
    from tasks import pipeline

    story = _units_board(tmp_path, photo_bytes)
    run_dir = tmp_path / "out" / "units" / "r1"
    blocker = run_dir / "scenes" / "singing" / kf.keyframe_name(1, Subtract(1.0), "encoderattn", 0.0)
    blocker.mkdir(parents=True)
    with pytest.raises(StoreError, match="cannot write"):
        storyboard_flow(storyboard=story, run_id="r1")
    assert not (run_dir / "manifest.json").exists()
    assert pipeline.units_writing() == 0  # a failed write leaves the unit's count
    progress = sorted(p.name for p in (run_dir / kf.PROGRESS / "singing").iterdir())
    assert progress == ["5-encoderattn.json"]  # the seed before the failed write is recorded, nothing after it

    blocker.rmdir()
    result = storyboard_flow(storyboard=story, run_id="r1", resume=True)
    assert result["keyframes"] == 36 and result["kept"] >= 4
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["status"] == "complete"
    for r in manifest["keyframes"]:
        assert kf.sha256((run_dir / r["key"]).read_bytes()) == r["sha256"]


def _stored_tunings(out):
    return sorted(p.parent.name for p in (out / "tunings").glob("*/tuning.json"))


def test_an_in_process_run_renders_while_its_fresh_tuning_is_written(tmp_path, photo_bytes, monkeypatch):
    """The tuning a run has just fine-tuned is written while its scenes render: here its write waits until a
    scene's keyframes are written (were it written first, as before, no scene would have rendered). The run ends
    once the tuning is stored whole, and its manifest names it."""
    import threading

    from flows.storyboard import storyboard_flow
    from tasks import pipeline

    rendered = threading.Event()
    write_unit, put_tuning = pipeline._write_unit, pipeline.put_tuning

    def unit(done):
        records = write_unit(done)
        rendered.set()
        return records

    def after_a_scene(store, tuning):
        assert rendered.wait(180), "no scene rendered while the tuning was written"
        put_tuning(store, tuning)

    monkeypatch.setattr(pipeline, "_write_unit", unit)
    monkeypatch.setattr(pipeline, "put_tuning", after_a_scene)
    result = storyboard_flow(storyboard=_units_board(tmp_path, photo_bytes), run_id="r1")
    assert result["keyframes"] == 36 and not result["tuning_reused"]
    assert _stored_tunings(tmp_path / "out") == [result["tuning_key"]]
    manifest = json.loads((tmp_path / "out" / "units" / "r1" / "manifest.json").read_text())
    assert manifest["tuning"]["key"] == result["tuning_key"]
    assert not pipeline._WRITING  # waited for and forgotten


def test_a_tuning_that_cannot_be_written_fails_the_run_after_its_scenes_and_a_resume_completes_it(
    tmp_path, photo_bytes, monkeypatch
):
    """The write behind retries what an object store may heal (as the tasks do: the write again, not the
    fine-tune) and gives up on a disk error; the run then fails with no manifest, its keyframes recorded, and a
    resume keeps them all, fine-tunes again (the key is the same) and stores the tuning."""
    from fastimagic.store import StoreError
    from flows.storyboard import storyboard_flow
    from tasks import pipeline

    failures = [StoreError("s3://bucket/tunings: throttled"), StoreError("out/tunings: cannot write (disk full)")]
    failures[1].__cause__ = OSError(28, "No space left on device")
    calls = []

    def failing(store, tuning):
        calls.append(tuning.key)
        raise failures[len(calls) - 1]

    monkeypatch.setattr(pipeline, "put_tuning", failing)
    monkeypatch.setitem(pipeline.STORAGE_RETRIES, "retry_delay_seconds", lambda retries: [0.01] * retries)
    story = _units_board(tmp_path, photo_bytes)
    with pytest.raises(StoreError, match="disk full"):
        storyboard_flow(storyboard=story, run_id="r1")
    assert len(calls) == 2  # retried once (a store's trouble), not after the disk error
    run_dir = tmp_path / "out" / "units" / "r1"
    assert not (run_dir / "manifest.json").exists() and _stored_tunings(tmp_path / "out") == []
    assert len(list((run_dir / kf.PROGRESS).glob("*/*.json"))) == 9  # every (scene, seed, strategy) recorded

    monkeypatch.undo()
    result = storyboard_flow(storyboard=story, run_id="r1", resume=True)
    assert result["kept"] == 36 and not result["tuning_reused"]
    assert _stored_tunings(tmp_path / "out") == [calls[0]] == [result["tuning_key"]]
    assert json.loads((run_dir / "manifest.json").read_text())["status"] == "complete"


def test_the_warm_up_primes_the_runs_own_shapes_on_the_thread_that_then_does_all_the_device_work(
    tmp_path, photo_bytes, monkeypatch
):
    """What `fastimagic run` does while Prefect's server starts, then the run: where the device has a cold start
    (a GPU; here the tiny model on CPU, told it has one), one fine-tune step at the run's own size (the reference's
    aspect: read from the local file) and batch and one sampling step per batch size the scenes start with, thrown away,
    leaving the weights bit for bit. Every UNet call, the warm-up's and the run's, runs on the device's one thread
    (torch keeps cuDNN's plans per thread: a warm-up elsewhere would warm nothing), and the run meets no shape
    the warm-up did not."""
    import threading

    from fastimagic import devices
    from flows.run import read_storyboard
    from flows.storyboard import storyboard_flow
    from tasks import pipeline

    monkeypatch.setattr(pipeline, "_cold_start", lambda model: True)
    story = _units_board(tmp_path, photo_bytes)
    wide = io.BytesIO()
    Image.open(io.BytesIO(photo_bytes)).convert("RGB").resize((120, 80)).save(wide, "JPEG")
    (tmp_path / "ref.jpg").write_bytes(wide.getvalue())  # 3:2, so the run's size is not the model's own square
    (tmp_path / "story.yaml").write_text(UNITS.replace("min_steps: 2}", "min_steps: 2, batch_size: 4}"))
    board = read_storyboard(story)
    model = pipeline._model(board)
    before = {n: p.clone() for n, p in model.unet.named_parameters()}
    calls = []  # (thread, grad enabled, UNet input shape)
    hook = model.unet.register_forward_pre_hook(
        lambda module, args: calls.append((threading.get_ident(), torch.is_grad_enabled(), tuple(args[0].shape)))
    )
    model.primed.clear()
    try:
        pipeline.preload_model(board)
        assert all(torch.equal(p, before[n]) for n, p in model.unet.named_parameters())
        primed = len(calls)
        pipeline.preload_model(board)  # the flow's own warm-up does it again: nothing more to pay
        assert len(calls) == primed
        result = storyboard_flow(storyboard=story)
    finally:
        hook.remove()
        model.primed.clear()
    assert result["keyframes"] == 36 and not result["tuning_reused"]
    threads = {thread for thread, _, _ in calls}
    assert threads == {devices.thread_ident(model.device)} and threading.get_ident() not in threads
    warm, run = calls[:primed], calls[primed:]
    width, height = pipeline.run_size(board, (120, 80))
    assert (width, height) == (96, 64)
    tune_shape = (4, 4, height // 8, width // 8)  # the storyboard's batch at the run's size, not the model's square
    assert {shape for _, grad, shape in warm if grad} == {shape for _, grad, shape in run if grad} == {tune_shape}
    sampled = {shape for _, grad, shape in run if not grad}  # 12 rows a scene: 8 then 4, guided (x2)
    assert sampled == {(16, 4, height // 8, width // 8), (8, 4, height // 8, width // 8)}
    assert sampled == {shape for _, grad, shape in warm if not grad}


@pytest.mark.parametrize("warm_up", [True, False], ids=["warm-up", "no-warm-up"])
def test_the_scorer_is_loaded_ahead_and_never_by_a_render_unit_on_the_devices_thread(
    tmp_path, photo_bytes, monkeypatch, warm_up
):
    """With scoring on, preload_model (which `fastimagic run` calls while Prefect's server boots, and the flow's own
    warm-up) reads and builds the scorer; without a warm-up (a warm worker's first units), the first unit starts
    loading it on a thread of its own while it samples. Either way it is loaded once, and never on the device's
    thread, where a unit samples and scores holding the model."""
    import threading

    import flows.storyboard
    from fastimagic import devices, scoring
    from flows.run import read_storyboard
    from flows.storyboard import storyboard_flow
    from tasks import pipeline

    loads = []  # the threads that read and built a scorer
    host_parts = scoring._host_parts
    monkeypatch.setattr(scoring, "_host_parts", lambda *a: loads.append(threading.current_thread()) or host_parts(*a))
    monkeypatch.setattr(scoring, "_CACHE", {})
    monkeypatch.setattr(scoring, "_HOST", {})
    (tmp_path / "ref.jpg").write_bytes(photo_bytes)
    (tmp_path / "story.yaml").write_text(
        "name: scored\nreference: ref.jpg\nmodel: tiny\nresolution: 64\nsource_prompt: a photo of a bird\n"
        "finetune: {steps: 2, min_steps: 2}\nscorer: tiny\n"
        "defaults: {seeds: [5, 1], steps: 2, edit: {subtract: {gamma: [0.9, 1.1]}}}\n"
        "scenes:\n  - {id: flying, prompt: a photo of a bird flying}\n"
        "  - {id: singing, prompt: a photo of a bird singing}\noutput: out\n"
    )
    board = read_storyboard(str(tmp_path / "story.yaml"))
    if warm_up:
        pipeline.preload_model(board)
        assert loads == [threading.current_thread()]
    else:
        monkeypatch.setattr(flows.storyboard, "warm_up", lambda board: None)
    result = storyboard_flow(storyboard=str(tmp_path / "story.yaml"))
    [loader] = loads
    if not warm_up:
        assert loader.name == "fastimagic-scorer"
    assert loader.ident != devices.thread_ident(pipeline._model(board).device)
    manifest = json.loads((tmp_path / result["manifest"]).read_text())  # an absolute path stays itself
    assert len(manifest["keyframes"]) == 8 and all(k["scores"]["clip"] >= 0 for k in manifest["keyframes"])


def test_a_render_that_misses_the_cache_reads_the_tuning_once_its_write_behind_is_done(tmp_path):
    """A tuning written behind that left the bounded cache is read from the store only after its write ends."""
    import threading

    from fastimagic.tuning import Tuning
    from tasks import pipeline
    from tasks.storage import output_store

    tuning = Tuning(key="k" * 32, source_prompt="a photo", source_embedding=torch.zeros(1, 77, 8),
                    deltas={"w": torch.ones(3, dtype=torch.float16)}, model_identity="m", finetune={}, width=64,
                    height=64)
    go, put_tuning = threading.Event(), pipeline.put_tuning
    store = output_store(str(tmp_path)).child(f"tunings/{tuning.key}")
    pipeline._TUNINGS.clear()
    try:
        pipeline.put_tuning = lambda s, t: (go.wait(60), put_tuning(s, t))
        pipeline._write_behind(store, tuning)
        got = []
        reader = threading.Thread(target=lambda: got.append(pipeline.load_tuning(str(tmp_path), tuning.key)))
        reader.start()
        reader.join(0.5)
        assert reader.is_alive() and not got  # waiting for the write, not failing on a missing file
        go.set()
        reader.join(60)
        assert torch.equal(got[0].deltas["w"], tuning.deltas["w"])
        pipeline.tuning_stored(tuning.key)
        assert not pipeline._WRITING
    finally:
        go.set()
        pipeline.put_tuning = put_tuning
        pipeline._TUNINGS.clear()
