"""Faults: a killed process, a storage server that restarts, a corrupted tuning, two runs at once, a full disk.

Each ends with the run complete, or failed with one clear line, and a rerun completes with nothing lost or
duplicated.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from test_cli import ROOT, as_typed_in_a_terminal, fastimagic

from fastimagic import keyframes as kf


def _story(tmp_path: Path, photo_bytes: bytes, output: str, scenes: int = 4, steps: int = 12, seeds: int = 2,
           gammas: str = "[0.9, 1.2]") -> Path:
    (tmp_path / "ref.jpg").write_bytes(photo_bytes)
    text = (
        "name: faults\nreference: ref.jpg\nmodel: tiny\nresolution: 64\n"
        "source_prompt: a photo of a bird\nfinetune: {steps: 4, min_steps: 4}\n"
        f"defaults: {{seeds: {seeds}, steps: {steps}, edit: {{subtract: {{gamma: {gammas}}}}}}}\n"
        f"output: {output}\nscenes:\n"
    )
    text += "".join(f"  - {{id: scene-{i}, prompt: a photo of a bird number {i}}}\n" for i in range(scenes))
    path = tmp_path / "story.yaml"
    path.write_text(text)
    return path


def _expected_keys(scenes: int, seeds: int, gammas: list[float]) -> set[str]:
    return {
        f"scenes/scene-{i}/{kf.keyframe_name(s, {'mode': 'subtract', 'gamma': g}, 'none')}"
        for i in range(scenes)
        for s in range(seeds)
        for g in gammas
    }


def _check_complete_local(run_dir: Path, expected: set[str]) -> dict:
    manifest = json.loads((run_dir / "manifest.json").read_text())
    keys = [k["key"] for k in manifest["keyframes"]]
    assert len(keys) == len(set(keys)) and set(keys) == expected
    on_disk = {str(p.relative_to(run_dir)) for p in (run_dir / "scenes").rglob("*.png")}
    assert on_disk == expected
    for k in manifest["keyframes"]:
        assert kf.sha256((run_dir / k["key"]).read_bytes()) == k["sha256"]
    assert not list(run_dir.rglob("*.fastimagic-tmp"))
    return manifest


def _spawn(*args: str, env: dict | None = None) -> subprocess.Popen:
    full_env = {**os.environ, **(env or {}), "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(
        [sys.executable, "-m", "flows.cli", *args],
        cwd=ROOT,
        env=full_env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        preexec_fn=as_typed_in_a_terminal,
        # its own process group; the embedded Prefect server (a group of its own) dies with it (PR_SET_PDEATHSIG)
        start_new_session=True,
    )


def _wait_for(predicate, timeout: float, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"process ended early ({proc.returncode}): {proc.stdout.read()[-3000:]}")
        time.sleep(0.2)
    raise AssertionError("timed out waiting")


def test_sigkill_mid_render_then_resume_keeps_verified_keyframes_and_renders_the_rest(tmp_path, photo_bytes):
    path = _story(tmp_path, photo_bytes, "out", scenes=4, steps=25)
    run_dir = tmp_path / "out" / "faults" / "killed-run"
    proc = _spawn("run", str(path), "--run-id", "killed-run")
    try:
        _wait_for(lambda: len(list((run_dir / kf.PROGRESS).glob("*/*.json"))) >= 2, 240, proc)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert not (run_dir / "manifest.json").exists()
    written = sorted((run_dir / "scenes").rglob("*.png"))
    assert written
    # a keyframe damaged after the crash must not be trusted: it is rendered again
    damaged = written[0]
    damaged.write_bytes(damaged.read_bytes()[:-10])

    r = fastimagic("run", str(path), "--resume", "killed-run")
    assert r.returncode == 0, r.stderr[-3000:]
    manifest = _check_complete_local(run_dir, _expected_keys(4, 2, [0.9, 1.2]))
    assert manifest["resumed"]["kept"] >= 2 and manifest["resumed"]["rendered"] >= 2
    assert manifest["resumed"]["kept"] + manifest["resumed"]["rendered"] == 16
    assert "keyframes verified and kept" in r.stdout


def test_resume_of_a_complete_run_renders_nothing(tmp_path, photo_bytes):
    path = _story(tmp_path, photo_bytes, "out", scenes=1, steps=2, seeds=1)
    assert fastimagic("run", str(path), "--run-id", "r1").returncode == 0
    r = fastimagic("run", str(path), "--resume", "r1")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "resumed r1: 2 keyframes verified and kept, 0 rendered" in r.stdout


def test_resume_treats_edited_progress_records_as_damaged_and_renders_them_again(tmp_path, photo_bytes):
    path = _story(tmp_path, photo_bytes, "out", scenes=1, steps=2, seeds=2)
    assert fastimagic("run", str(path), "--run-id", "r1").returncode == 0
    [first, second] = sorted((tmp_path / "out" / "faults" / "r1" / kf.PROGRESS / "scene-0").iterdir())
    records = json.loads(first.read_text())
    records[0]["seed"] = "<script>alert(1)</script>"  # key and sha256 still right: only the schema catches it
    first.write_text(json.dumps(records))
    second.write_text(json.dumps({"key": "an object where a list belongs"}))
    r = fastimagic("run", str(path), "--resume", "r1")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "resumed r1: 0 keyframes verified and kept, 4 rendered" in r.stdout
    page = (tmp_path / "out" / "faults" / "r1" / kf.INDEX).read_text()
    assert "<script" not in page and "alert(1)" not in page


def test_reusing_a_run_id_without_resume_is_refused(tmp_path, photo_bytes):
    path = _story(tmp_path, photo_bytes, "out", scenes=1, steps=2, seeds=1)
    assert fastimagic("run", str(path), "--run-id", "same").returncode == 0
    r = fastimagic("run", str(path), "--run-id", "same")
    assert r.returncode == 2 and "run same already exists" in r.stderr


def test_s3_server_stopped_mid_run_and_restarted_the_run_completes(tmp_path, photo_bytes, s3_server, s3_env):
    bucket = s3_env
    path = _story(tmp_path, photo_bytes, f"s3://{bucket}/out", scenes=4, steps=25)
    client = s3_server.client()
    proc = _spawn("run", str(path), "--run-id", "blip", env=s3_server.env())
    restarted = False
    try:
        def progress_written():
            page = client.list_objects_v2(Bucket=bucket, Prefix=f"out/faults/blip/{kf.PROGRESS}/")
            return page.get("KeyCount", 0) >= 1

        _wait_for(progress_written, 240, proc)
        s3_server.stop(graceful=False)
        time.sleep(3)
        s3_server.start()
        restarted = True
        out, _ = proc.communicate(timeout=600)
    finally:
        if not s3_server.running:
            s3_server.start()
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert restarted
    assert proc.returncode == 0, out[-3000:]
    manifest = json.loads(client.get_object(Bucket=bucket, Key="out/faults/blip/manifest.json")["Body"].read())
    keys = [k["key"] for k in manifest["keyframes"]]
    assert set(keys) == _expected_keys(4, 2, [0.9, 1.2]) and len(keys) == 16
    for k in manifest["keyframes"]:
        data = client.get_object(Bucket=bucket, Key=f"out/faults/blip/{k['key']}")["Body"].read()
        assert kf.sha256(data) == k["sha256"]


def test_storage_that_stays_down_mid_run_fails_in_one_line_exit_1_and_the_run_resumes_later(tmp_path, photo_bytes):
    from s3server import start_s3_server

    server = start_s3_server(tmp_path / "s3")  # its own server: this one stays down for a while
    try:
        bucket = server.make_bucket()
        client = server.client()
        path = _story(tmp_path, photo_bytes, f"s3://{bucket}/out", scenes=2, steps=25)
        proc = _spawn("run", str(path), "--run-id", "down", env=server.env())
        started = time.monotonic()
        try:
            def progress_written():
                page = client.list_objects_v2(Bucket=bucket, Prefix=f"out/faults/down/{kf.PROGRESS}/")
                return page.get("KeyCount", 0) >= 1

            _wait_for(progress_written, 240, proc)
            server.stop(graceful=False)  # and it stays down: retries run out
            down = time.monotonic()
            out, _ = proc.communicate(timeout=600)
            print(f"run to outage {down - started:.0f} s, outage to exit {time.monotonic() - down:.0f} s")
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
        assert proc.returncode == 1, out[-3000:]
        last = out.rstrip().splitlines()[-1]
        assert last.startswith("fastimagic: ") and server.endpoint_url.split("//")[1] in last, out[-3000:]
        assert "Traceback" not in out
        assert server.secret_key not in out and server.access_key not in out  # never a credential

        server.start()  # storage is back: the same run is resumed, nothing lost or duplicated
        r = fastimagic("run", str(path), "--resume", "down", env=server.env())
        assert r.returncode == 0, r.stderr[-3000:]
        manifest = json.loads(client.get_object(Bucket=bucket, Key="out/faults/down/manifest.json")["Body"].read())
        keys = [k["key"] for k in manifest["keyframes"]]
        assert set(keys) == _expected_keys(2, 2, [0.9, 1.2]) and len(keys) == 8
        assert manifest["resumed"]["kept"] >= 1
        for k in manifest["keyframes"]:
            data = client.get_object(Bucket=bucket, Key=f"out/faults/down/{k['key']}")["Body"].read()
            assert kf.sha256(data) == k["sha256"]
    finally:
        server.close()


def test_a_corrupted_stored_tuning_is_detected_and_fine_tuned_again(tmp_path, photo_bytes):
    from flows.storyboard import storyboard_flow

    path = _story(tmp_path, photo_bytes, "out", scenes=1, steps=2, seeds=1)
    first = storyboard_flow(storyboard=str(path))
    (weights,) = (tmp_path / "out" / "tunings" / first["tuning_key"]).glob("weights-*.safetensors")
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x55
    weights.write_bytes(bytes(data))

    second = storyboard_flow(storyboard=str(path))
    assert second["tuning_key"] == first["tuning_key"] and second["tuning_reused"] is False
    manifest = json.loads(Path(second["manifest"]).read_text())
    assert "does not match its recorded SHA-256" in manifest["tuning"]["replaced_corrupt"]
    third = storyboard_flow(storyboard=str(path))
    assert third["tuning_reused"] is True  # the replacement is intact


def test_two_runs_of_the_same_storyboard_at_once_are_isolated(tmp_path, photo_bytes):
    path = _story(tmp_path, photo_bytes, "out", scenes=2, steps=6)
    procs = [_spawn("run", str(path), "-v") for _ in range(2)]
    outs = ["", ""]

    def read(i: int) -> None:  # both at once: a run must never wait on a full pipe that nobody reads
        outs[i] = procs[i].communicate(timeout=600)[0]

    readers = [threading.Thread(target=read, args=(i,)) for i in range(2)]
    for reader in readers:
        reader.start()
    for reader in readers:
        reader.join()
    # The whole of both outputs on failure (a list would be cut to a few hundred characters).
    assert [p.returncode for p in procs] == [0, 0], "\n".join(f"--- run {i}:\n{out}" for i, out in enumerate(outs))
    # Never two embedded Prefect servers on one SQLite file: a run beside another keeps Prefect's records in a
    # database of its own (flows/embedded.py), deleted when it ends.
    notes = [line for out in outs for line in out.splitlines() if line.startswith("note: another local run")]
    assert notes, outs
    assert not any((Path(os.environ["PREFECT_HOME"]) / "fastimagic-runs").glob("*"))
    runs = sorted((tmp_path / "out" / "faults").iterdir())
    assert len(runs) == 2
    for run_dir in runs:
        _check_complete_local(run_dir, _expected_keys(2, 2, [0.9, 1.2]))
    tunings = list((tmp_path / "out" / "tunings").iterdir())
    assert len(tunings) == 1
    files = sorted(p.name for p in tunings[0].iterdir())
    assert files[0] == "tuning.json" and len(files) >= 2 and all(f.startswith("weights-") for f in files[1:])
    from fastimagic.store import LocalStore
    from fastimagic.tuning import Tuning

    Tuning.read(LocalStore(tunings[0]).get_bytes)  # whichever writer finished last, metadata and weights agree


@pytest.fixture
def small_disk(tmp_path):
    mount = tmp_path / "small-disk"
    mount.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=700k", "tmpfs", str(mount)], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here (needs root): {r.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_full_disk_fails_with_one_clear_line_and_no_manifest(tmp_path, photo_bytes, small_disk):
    path = _story(tmp_path, photo_bytes, str(small_disk), scenes=4, steps=2, seeds=4,
                  gammas="[0.8, 0.9, 1.0, 1.1, 1.2, 1.3, 1.4, 1.5]")
    r = fastimagic("run", str(path), "--run-id", "full")
    assert r.returncode == 1, r.stdout[-2000:]
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("fastimagic: ") and "No space left on device" in last, last
    assert not list(small_disk.rglob("manifest.json"))
    assert not list(small_disk.rglob("*.fastimagic-tmp"))


def test_concurrent_renders_in_one_process_share_the_model_safely(tiny_model, tuning):
    """Prefect runs tasks in threads: the model lock keeps in-place forgetting from interleaving."""
    from fastimagic.editor import Editor

    results: dict[str, bytes] = {}

    def work(strategy: str) -> None:
        with tiny_model.lock, Editor(tiny_model, tuning) as ed:
            frame = ed.render("a bird", seeds=[0], edits=[{"mode": "subtract", "gamma": 1.0}], steps=3,
                              forget=strategy)[0]
        results[strategy] = frame.image.tobytes()

    threads = [threading.Thread(target=work, args=(s,)) for s in ("encoder", "decoder", "encoder", "decoder")]
    alone = {}
    for s in ("encoder", "decoder"):
        work(s)
        alone[s] = results[s]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == alone
