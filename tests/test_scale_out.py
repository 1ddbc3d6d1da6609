"""Scale-out for real: `prefect server start` on loopback, a SeaweedFS S3 server, process workers on the work
pools of deploy/prefect.yaml (deployed by deploy/setup.sh), a storyboard submitted with `fastimagic submit`.

Every process started here is stopped by its PID (process group) at the end, also when a test fails.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from s3server import free_ports

from fastimagic import keyframes as kf

ROOT = Path(__file__).resolve().parents[1]
PREFECT = str(Path(sys.executable).with_name("prefect"))


class Processes:
    """Processes started in their own process groups, all stopped by PID at the end."""

    def __init__(self, logs: Path):
        self.logs = logs
        self.procs: dict[str, subprocess.Popen] = {}

    def start(self, name: str, args: list[str], env: dict) -> subprocess.Popen:
        log = open(self.logs / f"{name}.log", "wb")  # noqa: SIM115 - closed with the process
        proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        self.procs[name] = proc
        return proc

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        proc = self.procs[name]
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                pass
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()

    def stop_all(self) -> None:
        for name in list(self.procs):
            self.kill(name, signal.SIGTERM)

    def tail(self, name: str, n: int = 3000) -> str:
        return (self.logs / f"{name}.log").read_bytes()[-n:].decode(errors="replace")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, s3_server):
    """A Prefect server with fastimagic deployed, one CPU worker and two GPU-pool workers, all on loopback."""
    work = tmp_path_factory.mktemp("cluster")
    (port,) = free_ports(1)
    api = f"http://127.0.0.1:{port}/api"
    base_env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    base_env.update(
        PREFECT_HOME=str(work / "prefect-home"),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_LOGGING_LEVEL="INFO",
        PYTHONPATH=str(ROOT),
        FASTIMAGIC_HOME=str(ROOT),
        **s3_server.env(),
    )
    procs = Processes(work)
    try:
        procs.start("server", [PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                    {**base_env, "PREFECT_SERVER_API_HOST": "127.0.0.1"})
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(f"{api}/health", timeout=2).read()
                break
            except OSError:
                if time.monotonic() > deadline or procs.procs["server"].poll() is not None:
                    raise AssertionError("prefect server did not start: " + procs.tail("server")) from None
                time.sleep(0.5)
        env = {**base_env, "PREFECT_API_URL": api}
        setup = subprocess.run(["bash", "deploy/setup.sh", "2"], cwd=ROOT, env=env, capture_output=True,
                               text=True, timeout=300)
        assert setup.returncode == 0, setup.stdout[-2000:] + setup.stderr[-3000:]
        procs.start("cpu-worker", [PREFECT, "worker", "start", "--pool", "fastimagic-cpu", "--type", "process",
                                   "--name", "cpu-worker"], env)
        for name in ("gpu-worker-a", "gpu-worker-b"):
            procs.start(name, [PREFECT, "worker", "start", "--pool", "fastimagic-gpu", "--type", "process",
                               "--limit", "1", "--name", name], env)
        yield {"api": api, "env": env, "procs": procs, "work": work}
    finally:
        procs.stop_all()


def _client(api: str):
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    class _Ctx:
        def __enter__(self):
            self._settings = temporary_settings({PREFECT_API_URL: api})
            self._settings.__enter__()
            self._client = get_client(sync_client=True)
            return self._client.__enter__()

        def __exit__(self, *exc):
            self._client.__exit__(*exc)
            self._settings.__exit__(*exc)

    return _Ctx()


def _upload_story(s3_server, bucket: str, photo_bytes: bytes, scenes: int, steps: int, name: str) -> str:
    client = s3_server.client()
    client.put_object(Bucket=bucket, Key="refs/r.jpg", Body=photo_bytes)
    text = (
        f"name: {name}\nreference: s3://{bucket}/refs/r.jpg\nmodel: tiny\nresolution: 64\n"
        "source_prompt: a photo of a bird\nfinetune: {steps: 4, min_steps: 4}\n"
        f"defaults: {{seeds: 2, steps: {steps}, edit: {{subtract: {{gamma: [0.9, 1.2]}}}}}}\n"
        f"output: s3://{bucket}/out\nscenes:\n"
        + "".join(f"  - {{id: scene-{i}, prompt: a photo of a bird number {i}}}\n" for i in range(scenes))
    )
    client.put_object(Bucket=bucket, Key=f"storyboards/{name}.yaml", Body=text.encode())
    return f"s3://{bucket}/storyboards/{name}.yaml"


def _submit(cluster, uri: str) -> str:
    r = subprocess.run([sys.executable, "-m", "flows.cli", "submit", uri, "--deployment", "storyboard/storyboard"],
                       cwd=ROOT, env=cluster["env"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout.split("(")[1].split(")")[0]  # "submitted flow run NAME (ID) of ..."


def _wait_parent(cluster, flow_run_id: str, timeout: float = 900):
    deadline = time.monotonic() + timeout
    with _client(cluster["api"]) as client:
        while time.monotonic() < deadline:
            fr = client.read_flow_run(flow_run_id)
            if fr.state and fr.state.is_final():
                return fr
            time.sleep(2)
    logs = "\n".join(cluster["procs"].tail(n) for n in ("cpu-worker", "gpu-worker-a", "gpu-worker-b"))
    raise AssertionError(f"flow run {flow_run_id} did not finish:\n{logs}")


def _child_runs(cluster, deployment_name: str):
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName

    with _client(cluster["api"]) as client:
        return client.read_flow_runs(deployment_filter=DeploymentFilter(name=DeploymentFilterName(
            any_=[deployment_name])))


def _manifest(s3_server, bucket: str, name: str) -> dict:
    client = s3_server.client()
    keys = [o["Key"] for o in client.list_objects_v2(Bucket=bucket, Prefix=f"out/{name}/").get("Contents", [])]
    (key,) = [k for k in keys if k.endswith("/manifest.json") and k.count("/") == 3]
    return json.loads(client.get_object(Bucket=bucket, Key=key)["Body"].read()), key.rsplit("/", 1)[0]


def _check_keyframes(s3_server, bucket: str, manifest: dict, run: str, scenes: int) -> None:
    client = s3_server.client()
    keys = [k["key"] for k in manifest["keyframes"]]
    assert len(keys) == len(set(keys)) == scenes * 2 * 2
    assert {k.split("/")[1] for k in keys} == {f"scene-{i}" for i in range(scenes)}
    for k in manifest["keyframes"]:
        data = client.get_object(Bucket=bucket, Key=f"{run}/{k['key']}")["Body"].read()
        assert kf.sha256(data) == k["sha256"]


def test_a_storyboard_submitted_to_the_server_spreads_its_scenes_over_both_gpu_workers(
    cluster, s3_server, s3_env, photo_bytes
):
    uri = _upload_story(s3_server, s3_env, photo_bytes, scenes=4, steps=20, name="spread")
    parent = _wait_parent(cluster, _submit(cluster, uri))
    assert parent.state.is_completed(), parent.state
    manifest, run = _manifest(s3_server, s3_env, "spread")
    assert manifest["status"] == "complete"
    _check_keyframes(s3_server, s3_env, manifest, run, scenes=4)
    assert len(_child_runs(cluster, "finetune")) == 1
    renders = [r for r in _child_runs(cluster, "render-scene") if r.parameters.get("storyboard") == uri]
    assert len(renders) == 4 and all(r.state.is_completed() for r in renders)
    workers = {r.labels.get("prefect.worker.name") for r in renders}
    assert workers == {"gpu-worker-a", "gpu-worker-b"}, workers


def test_a_worker_killed_mid_scene_is_resubmitted_and_nothing_is_missing_or_duplicated(
    cluster, s3_server, s3_env, photo_bytes
):
    procs = cluster["procs"]
    uri = _upload_story(s3_server, s3_env, photo_bytes, scenes=2, steps=60, name="killed")
    parent_id = _submit(cluster, uri)
    client = s3_server.client()

    def some_progress():
        page = client.list_objects_v2(Bucket=s3_env, Prefix="out/killed/")
        return any(f"/{kf.PROGRESS}/scene-" in o["Key"] for o in page.get("Contents", []))

    deadline = time.monotonic() + 600
    while not some_progress():
        assert time.monotonic() < deadline, procs.tail("gpu-worker-a") + procs.tail("gpu-worker-b")
        time.sleep(0.3)
    victim = "gpu-worker-a"  # kill one worker and everything it runs, mid-scene
    procs.kill(victim)
    try:
        parent = _wait_parent(cluster, parent_id)
        assert parent.state.is_completed(), parent.state
        manifest, run = _manifest(s3_server, s3_env, "killed")
        _check_keyframes(s3_server, s3_env, manifest, run, scenes=2)
        renders = [r for r in _child_runs(cluster, "render-scene") if r.parameters.get("storyboard") == uri]
        runs = {(r.parameters["scene_id"], r.parameters["resume"], r.state_name) for r in renders}
        lost = {scene for scene, resume, state in runs if state != "Completed"}
        # the killed worker's scene ended crashed and was submitted again with resume, and completed
        assert lost and all((scene, True, "Completed") in runs for scene in lost), runs
    finally:
        procs.start(victim, [PREFECT, "worker", "start", "--pool", "fastimagic-gpu", "--type", "process",
                             "--limit", "1", "--name", victim], cluster["env"])
