"""Warm GPU workers for real: `prefect server start` on loopback, a SeaweedFS S3 server holding the keyframes and
the shared result storage, `deploy/setup.sh`, a CPU process worker (the storyboard deployment) and two
`fastimagic worker` processes (background tasks, one task at a time each).

Every process started here is stopped by its PID (process group) at the end, also when a test fails.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from pathlib import Path

import pytest
from s3server import free_ports
from test_cli import as_typed_in_a_terminal

from fastimagic import keyframes as kf

ROOT = Path(__file__).resolve().parents[1]
PREFECT = str(Path(sys.executable).with_name("prefect"))
WORKERS = ("gpu-worker-a", "gpu-worker-b")
BLOCK = "s3-bucket/fastimagic-results"


class Processes:
    """Processes started in their own process groups, all stopped by PID at the end."""

    def __init__(self, logs: Path):
        self.logs = logs
        self.procs: dict[str, subprocess.Popen] = {}

    def start(self, name: str, args: list[str], env: dict) -> subprocess.Popen:
        log = open(self.logs / f"{name}.log", "wb")  # noqa: SIM115 - closed with the process
        proc = subprocess.Popen(args, cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True, preexec_fn=as_typed_in_a_terminal)
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


def _start_worker(procs, name: str, env: dict) -> None:
    procs.start(name, [sys.executable, "-m", "flows.cli", "worker"], env)


def _wait_for(procs, names, text: str, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    for name in names:
        while text not in procs.tail(name, 100_000):
            assert procs.procs[name].poll() is None, procs.tail(name)
            assert time.monotonic() < deadline, procs.tail(name)
            time.sleep(0.3)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, s3_server):
    """A Prefect server with fastimagic deployed, one CPU worker and two warm GPU workers, all on loopback."""
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
        FASTIMAGIC_RESULTS_BUCKET=s3_server.make_bucket(),
        FASTIMAGIC_LEASE_FLOOR_SECONDS="10",  # a killed worker's task is taken back quickly here
        OMP_NUM_THREADS="1",
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
        setup = subprocess.run(["bash", "deploy/setup.sh"], cwd=ROOT, env=env, capture_output=True,
                               text=True, timeout=300)
        assert setup.returncode == 0, setup.stdout[-2000:] + setup.stderr[-3000:]
        env["PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK"] = BLOCK
        # The operator's policy, in the workers' environment only: each storyboard's own bucket, the tiny models
        # and folders under pytest's temporary root (a test's broken model), no pickle. Submitters do not set it.
        policy = work / "operator-policy.yaml"
        policy.write_text(f"models: [tiny, tiny-sd2, tiny-sdxl, {tmp_path_factory.getbasetemp()}]\n")
        worker_env = {**env, "FASTIMAGIC_POLICY": str(policy)}
        procs.start("cpu-worker", [PREFECT, "worker", "start", "--pool", "fastimagic-cpu", "--type", "process",
                                   "--name", "cpu-worker"], worker_env)
        for name in WORKERS:
            _start_worker(procs, name, worker_env)
        _wait_for(procs, WORKERS, "serving caption")
        yield {"api": api, "env": env, "worker_env": worker_env, "procs": procs, "work": work}
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


def _upload_story(s3_server, bucket: str, photo_bytes: bytes, scenes: int, steps: int, name: str,
                  subject: str = "bird") -> str:
    client = s3_server.client()
    client.put_object(Bucket=bucket, Key="refs/r.jpg", Body=photo_bytes)
    text = (
        f"name: {name}\nreference: s3://{bucket}/refs/r.jpg\nmodel: tiny\nresolution: 64\n"
        f"source_prompt: a photo of a {subject}\nfinetune: {{steps: 4, min_steps: 4}}\n"
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


def _run(cluster, path_or_uri: str, *args: str, env: dict | None = None, timeout: float = 600):
    return subprocess.run([sys.executable, "-m", "flows.cli", "run", path_or_uri, "--workers", "-v", *args],
                          cwd=ROOT, env=env or cluster["env"], capture_output=True, text=True, timeout=timeout)


def _worker_counts(cluster, pattern: str) -> dict[str, Counter]:
    return {w: Counter(re.findall(pattern, cluster["procs"].tail(w, 10_000_000))) for w in WORKERS}


def test_two_storyboards_load_the_model_once_per_worker_and_fetch_each_tuning_once(
    cluster, s3_server, s3_env, photo_bytes
):
    first = _upload_story(s3_server, s3_env, photo_bytes, scenes=4, steps=8, name="first")
    r = _run(cluster, first)
    assert r.returncode == 0, r.stderr[-3000:]
    # the second storyboard goes through the deployment: the CPU worker's pull step, the flow, the same workers
    second = _upload_story(s3_server, s3_env, photo_bytes, scenes=4, steps=8, name="second", subject="cat")
    parent = _wait_parent(cluster, _submit(cluster, second))
    assert parent.state.is_completed(), parent.state
    for name in ("first", "second"):
        manifest, run = _manifest(s3_server, s3_env, name)
        assert manifest["status"] == "complete"
        _check_keyframes(s3_server, s3_env, manifest, run, scenes=4)
    loads = _worker_counts(cluster, r"loaded base model (\S+)")
    fetches = _worker_counts(cluster, r"fetched tuning (\S+)")
    took = _worker_counts(cluster, r"took task run (render)")
    assert all(took[w]["render"] > 0 for w in WORKERS), took  # both workers rendered
    assert all(n == 1 for w in WORKERS for n in loads[w].values()), loads
    assert all(n == 1 for w in WORKERS for n in fetches[w].values()), fetches


def test_a_worker_takes_its_next_unit_when_its_device_is_free_with_one_unit_writing_behind_at_most():
    from flows.workers import may_take_next

    # (runs in flight, of which writing their keyframes) on a worker with one device slot
    assert may_take_next(0, 0, slots=1)
    assert not may_take_next(1, 0, slots=1)  # the one run is on the device
    assert may_take_next(1, 1, slots=1)  # it is writing: the device renders the next meanwhile
    assert not may_take_next(2, 1, slots=1)  # the next is on the device
    assert not may_take_next(2, 2, slots=1)  # two writing behind already: memory stays bounded
    assert may_take_next(3, 2, slots=2) and not may_take_next(4, 2, slots=2)


@pytest.mark.parametrize("model,family", [("tiny-sdxl", "sdxl"), ("tiny-sd2", "sd2")])
def test_sdxl_and_sd2_storyboards_scale_out_on_the_warm_workers(cluster, s3_server, s3_env, photo_bytes, model, family):
    uri = _upload_story(s3_server, s3_env, photo_bytes, scenes=2, steps=3, name=f"scaled-{family}")
    r = _run(cluster, uri, "--model", model)
    assert r.returncode == 0, r.stderr[-3000:]
    manifest, run = _manifest(s3_server, s3_env, f"scaled-{family}")
    assert manifest["status"] == "complete" and manifest["model"]["family"] == family
    _check_keyframes(s3_server, s3_env, manifest, run, scenes=2)
    loads = _worker_counts(cluster, r"loaded base model (\S+)")
    assert all(n == 1 for w in WORKERS for n in loads[w].values()), loads  # warm: loaded once, whatever the family
    assert any(f"{model}:v1" in loads[w] for w in WORKERS), loads


def _renders(cluster, worker: str) -> tuple[int, int]:
    """How many renders ``worker`` has taken and said it rendered, from its log: its "rendered ..." line comes after
    the unit's writes and before the unit's result is stored and its run Completed."""
    log = cluster["procs"].tail(worker, 10_000_000)
    return log.count("took task run render"), log.count(": rendered ")


def test_a_worker_killed_mid_render_is_replaced_by_the_other_and_nothing_is_missing_or_duplicated(
    cluster, s3_server, s3_env, photo_bytes
):
    procs = cluster["procs"]
    before = {w: _renders(cluster, w) for w in WORKERS}  # this run's renders are counted from here

    def inside_a_render(worker: str) -> bool:  # took one of this run's renders and has not said it rendered it
        (took, rendered), (took0, rendered0) = _renders(cluster, worker), before[worker]
        return took - took0 > rendered - rendered0

    uri = _upload_story(s3_server, s3_env, photo_bytes, scenes=2, steps=60, name="killed")
    run = subprocess.Popen([sys.executable, "-m", "flows.cli", "run", uri, "--workers", "-v"], cwd=ROOT,
                           env=cluster["env"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    victim = None
    try:
        deadline = time.monotonic() + 600
        while not (victim := next((w for w in WORKERS if inside_a_render(w)), None)):
            assert time.monotonic() < deadline and run.poll() is None, procs.tail(WORKERS[0]) + procs.tail(WORKERS[1])
            time.sleep(0.1)
        procs.kill(victim)  # SIGKILL, mid-render
        out, err = run.communicate(timeout=600)
        assert run.returncode == 0, err[-3000:]
        # The unit the victim died in is rendered by the other worker. Killed before it acknowledged the unit (a
        # worker does so once its device is free for the next, flows.workers.IdleTaskWorker), the server hands the
        # unit to the other worker; killed after (while writing behind), the unit stays Running until its lease
        # runs out, the worker is presumed dead, and the unit is submitted again, unless its keyframes are all
        # stored intact (the kill landed between its last write and its result): they are kept, nothing re-rendered.
        kept = "its work is stored intact: kept" in err
        if "worker presumed dead" in err:
            assert kept or "submitted again" in err, err[-3000:]
        if not kept:  # its own unit, if it had one, and the lost one: two of the two scenes' units
            (survivor,) = set(WORKERS) - {victim}
            assert _renders(cluster, survivor)[1] - before[survivor][1] == 2, procs.tail(survivor)
        manifest, folder = _manifest(s3_server, s3_env, "killed")
        assert manifest["status"] == "complete"
        _check_keyframes(s3_server, s3_env, manifest, folder, scenes=2)
    finally:
        if run.poll() is None:
            run.kill()
            run.wait()
        if victim:
            _start_worker(procs, victim, cluster["worker_env"])
            _wait_for(procs, [victim], "serving caption")


def test_a_worker_without_the_storage_block_refuses_to_start_naming_the_setting(cluster):
    env = {k: v for k, v in cluster["env"].items() if k != "PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK"}
    r = subprocess.run([sys.executable, "-m", "flows.cli", "worker"], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 2
    [line] = r.stderr.strip().splitlines()
    assert line.startswith("fastimagic: PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK is not set"), line


def test_shared_storage_unreachable_when_work_is_submitted_is_one_line_and_exit_1(
    cluster, s3_server, s3_env, photo_bytes
):
    (dead,) = free_ports(1)
    make = (
        "from prefect_aws import MinIOCredentials, S3Bucket\n"
        "S3Bucket(bucket_name='results', credentials=MinIOCredentials(minio_root_user='u', minio_root_password='p',"
        f" aws_client_parameters={{'endpoint_url': 'http://127.0.0.1:{dead}'}})).save('unreachable', overwrite=True)"
    )
    subprocess.run([sys.executable, "-c", make], env=cluster["env"], check=True, timeout=120)
    uri = _upload_story(s3_server, s3_env, photo_bytes, scenes=1, steps=2, name="unreachable")
    r = _run(cluster, uri, env={**cluster["env"], "PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK": "s3-bucket/unreachable"},
             timeout=300)
    assert r.returncode == 1
    [line] = r.stderr.strip().splitlines()
    assert line.startswith("fastimagic: PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK=s3-bucket/unreachable: shared storage"
                           " unreachable"), line


def test_a_model_no_worker_can_load_fails_the_run_with_the_reason_and_nothing_hangs(
    cluster, s3_server, s3_env, photo_bytes, tmp_path
):
    model = tmp_path / "broken-model"
    (model / "unet").mkdir(parents=True)
    (model / "model_index.json").write_text("{}")  # a folder that looks like a model and is not one
    (model / "unet" / "config.json").write_text("{not json")
    uri = _upload_story(s3_server, s3_env, photo_bytes, scenes=1, steps=2, name="broken")
    r = _run(cluster, uri, "--model", str(model), timeout=300)
    assert r.returncode in (1, 2), r.stderr[-2000:]
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("fastimagic: ") and "broken-model" in last, last


def test_with_no_worker_connected_the_run_says_so_at_once_and_gives_up_after_the_wait(
    cluster, s3_server, s3_env, photo_bytes
):
    from prefect.client.schemas.filters import TaskRunFilter, TaskRunFilterState, TaskRunFilterStateType
    from prefect.client.schemas.objects import StateType

    procs = cluster["procs"]
    for name in WORKERS:
        procs.kill(name, signal.SIGTERM)
    try:
        uri = _upload_story(s3_server, s3_env, photo_bytes, scenes=1, steps=2, name="no-worker")
        r = _run(cluster, uri, env={**cluster["env"], "FASTIMAGIC_WORKER_WAIT_SECONDS": "8"}, timeout=300)
        assert r.returncode == 1, r.stderr[-3000:]
        assert "no fastimagic worker serving fine-tune once is connected" in r.stderr
        assert "waiting up to 8 s" in r.stderr
        last = r.stderr.strip().splitlines()[-1]
        assert last.startswith("fastimagic: fine-tune once")
        assert "no fastimagic worker connected to the Prefect server for 8 s" in last
        with _client(cluster["api"]) as client:  # cancelled: a worker started later does not run it for nobody
            cancelled = client.read_task_runs(task_run_filter=TaskRunFilter(
                state=TaskRunFilterState(type=TaskRunFilterStateType(any_=[StateType.CANCELLED]))))
        assert any(t.state.message == "no worker connected to run it" for t in cancelled)
    finally:
        for name in WORKERS:
            _start_worker(procs, name, cluster["worker_env"])
        _wait_for(procs, WORKERS, "serving caption")


# --- the trust boundary (issue 21): the worker obeys its operator, parameters are data ---------------------------


def _private_files(tmp_path, photo_bytes) -> tuple[Path, Path]:
    """A private image on the workers' disk, and a folder a hostile storyboard would write there."""
    private = tmp_path / "private" / "face.jpg"
    private.parent.mkdir()
    private.write_bytes(photo_bytes)
    return private, tmp_path / "planted"


def _hostile_story(s3_server, bucket: str, name: str, reference: str, output: str) -> tuple[str, str]:
    text = (f"name: {name}\nreference: {reference}\nmodel: tiny\nresolution: 64\nsource_prompt: a photo\n"
            f"finetune: {{steps: 2, min_steps: 2}}\ndefaults: {{seeds: 1, steps: 2}}\noutput: {output}\n"
            "scenes:\n  - {id: s, prompt: a photo of a cat}\n")
    s3_server.client().put_object(Bucket=bucket, Key=f"storyboards/{name}.yaml", Body=text.encode())
    return f"s3://{bucket}/storyboards/{name}.yaml", text


def _delay(cluster, code: str) -> str:
    """Run ``code`` as a submitter would (the cluster's environment, the shared storage block) and return the task
    run id it prints: a task created directly, as anyone with the Prefect API and the storage could."""
    prelude = (
        "import contextvars, os\n"
        "from prefect.settings import temporary_settings\n"
        "from tasks.pipeline import caption_reference, finetune_once, render_keyframes\n"
        "def delay(task, *args):\n"
        "    def submit():\n"  # from an empty context, as flows.workers.Warm submits
        f"        with temporary_settings(updates={{'tasks.scheduling.default_storage_block': '{BLOCK}'}}):\n"
        "            return task.delay(*args).task_run_id\n"
        "    return contextvars.Context().run(submit)\n"
    )
    r = subprocess.run([sys.executable, "-c", prelude + code], cwd=ROOT, env=cluster["env"], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout.strip().splitlines()[-1]


def _task_run_end(cluster, task_run_id: str, timeout: float = 180):
    """The task run once final, or None once the worker deleted it (Prefect's answer to unreadable parameters)."""
    from prefect.exceptions import ObjectNotFound

    deadline = time.monotonic() + timeout
    with _client(cluster["api"]) as client:
        while time.monotonic() < deadline:
            try:
                run = client.read_task_run(task_run_id)
            except ObjectNotFound:
                return None
            if run.state and run.state.is_final():
                return run
            time.sleep(0.5)
    raise AssertionError(f"task run {task_run_id} did not end: " + "".join(cluster["procs"].tail(w) for w in WORKERS))


def test_a_submitters_policy_never_reaches_the_worker_which_obeys_its_own(
    cluster, s3_server, s3_env, photo_bytes, tmp_path
):
    private, planted = _private_files(tmp_path, photo_bytes)
    lenient = tmp_path / "lenient.yaml"
    lenient.write_text(f"references: [{tmp_path}]\noutputs: [{tmp_path}]\n")
    uri, _ = _hostile_story(s3_server, s3_env, "lenient", str(private), str(planted))
    # the submitter's --policy is a pre-check only: it passes here, and the worker refuses with its own policy
    r = subprocess.run([sys.executable, "-m", "flows.cli", "submit", uri, "--deployment", "storyboard/storyboard",
                        "--policy", str(lenient)], cwd=ROOT, env=cluster["env"], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    run = _wait_parent(cluster, r.stdout.split("(")[1].split(")")[0])
    assert run.state.is_failed(), run.state
    assert "refused by the policy" in (run.state.message or ""), run.state.message
    # a policy sent as a parameter anyway is no parameter of the flow: refused before anything runs
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: cluster["api"]}):
        try:
            smuggled = run_deployment("storyboard/storyboard", timeout=0, parameters={
                "storyboard": uri, "policy": {"references": [str(tmp_path)], "outputs": [str(tmp_path)]}})
        except Exception as e:  # noqa: BLE001 - refused at creation is the other good answer
            smuggled = e
    if not isinstance(smuggled, Exception):
        assert not _wait_parent(cluster, smuggled.id).state.is_completed()
    assert not planted.exists()


def test_pickled_task_parameters_are_refused_unread_on_the_worker(cluster, tmp_path):
    marker = tmp_path / "ran-on-the-worker"
    code = (
        "class Evil:\n"
        f"    def __reduce__(self): return (os.system, ('touch {marker}',))\n"
        "print(delay(finetune_once.with_options(result_serializer='pickle'), Evil(), None, None, 'x'))\n"
    )
    task_run_id = _delay(cluster, code)
    said = (f"Failed to read parameters for task run UUID('{task_run_id}')",
            "refused unread: serialized as 'pickle', not plain JSON")
    deadline = time.monotonic() + 180
    while not any(all(line in cluster["procs"].tail(w, 1_000_000) for line in said) for w in WORKERS):
        assert time.monotonic() < deadline, "".join(cluster["procs"].tail(w) for w in WORKERS)
        time.sleep(0.5)
    run = _task_run_end(cluster, task_run_id)  # Prefect deletes a run whose parameters cannot be read
    assert run is None or not run.state.is_completed()
    assert not marker.exists()


def test_a_task_submitted_directly_is_checked_against_the_workers_policy(
    cluster, s3_server, s3_env, photo_bytes, tmp_path
):
    private, planted = _private_files(tmp_path, photo_bytes)
    s3_server.client().put_object(Bucket=s3_env, Key="refs/r.jpg", Body=photo_bytes)
    _, local_out = _hostile_story(s3_server, s3_env, "direct", f"s3://{s3_env}/refs/r.jpg", str(planted))
    _, fine = _hostile_story(s3_server, s3_env, "fine", f"s3://{s3_env}/refs/r.jpg", f"s3://{s3_env}/out")
    sha = kf.sha256(photo_bytes)

    def finetune(text: str, name: str, output: str) -> str:
        board = {"storyboard": f"s3://{s3_env}/storyboards/{name}.yaml", "text": text, "overrides": {}}
        params = (board, {"uri": f"s3://{s3_env}/refs/r.jpg", "sha256": sha},
                  {"source_prompt": "a photo", "caption": None, "captioner": None}, output)
        return _delay(cluster, f"print(delay(finetune_once.with_options(result_serializer='json'), *{params!r}))")

    # a worker-local output the worker's policy does not allow; the storyboard's own bucket with another output;
    # a worker-local reference slipped in as an override
    refused = _task_run_end(cluster, finetune(local_out, "direct", str(planted)))
    other = _task_run_end(cluster, finetune(fine, "fine", str(planted)))
    board = {"storyboard": f"s3://{s3_env}/storyboards/fine.yaml", "text": fine,
             "overrides": {"reference": str(private)}}
    smuggled = _task_run_end(cluster, _delay(cluster, "print(delay(caption_reference.with_options(result_serializer="
                                                      f"'json'), {board!r}, {{'uri': '{private}', 'sha256': ''}}))"))
    for run in (refused, other, smuggled):
        assert run is not None and run.state.is_failed(), run and run.state
    assert "refused by the policy" in refused.state.message and "output" in refused.state.message
    assert "the output is not the storyboard's" in other.state.message
    assert "overrides may set output and model only" in smuggled.state.message
    assert not planted.exists()
