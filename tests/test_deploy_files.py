"""Static checks of deploy/: the Prefect project file, the compose file, the Dockerfile and the setup script agree
with each other and with the code. Nothing here starts Docker or a Prefect server."""

from __future__ import annotations

import ast
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
CPU_POOL = "fastimagic-cpu"
RESULTS_BLOCK = "s3-bucket/fastimagic-results"


def _load(name: str) -> dict:
    return yaml.safe_load((DEPLOY / name).read_text())


@pytest.fixture(scope="module")
def project() -> dict:
    return _load("prefect.yaml")


@pytest.fixture(scope="module")
def compose() -> dict:
    return _load("docker-compose.yml")


def _deployments() -> list[dict]:
    return _load("prefect.yaml")["deployments"]


def _by_name(project: dict) -> dict[str, dict]:
    return {d["name"]: d for d in project["deployments"]}


def _flow_function(path: Path, name: str) -> ast.FunctionDef | None:
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name == name:
            return node
    return None


def _is_flow(fn: ast.FunctionDef) -> bool:
    for d in fn.decorator_list:
        target = d.func if isinstance(d, ast.Call) else d
        if (isinstance(target, ast.Name) and target.id == "flow") or (
            isinstance(target, ast.Attribute) and target.attr == "flow"
        ):
            return True
    return False


def _entrypoint_params():
    for d in _deployments():
        yield pytest.param(d, id=d["name"])


def _worker_pools(compose: dict) -> dict[str, str]:
    """service name -> the --pool its `prefect worker start` command polls."""
    pools = {}
    for name, service in compose["services"].items():
        command = service.get("command") or ""
        command = " ".join(command) if isinstance(command, list) else command
        if "worker start" in command:
            match = re.search(r"--pool[ =](\S+)", command)
            assert match, f"service {name}: worker command without --pool"
            pools[name] = match.group(1).strip("'\"")
    return pools


# -- prefect.yaml ------------------------------------------------------------------------------------------------


def test_the_project_file_declares_the_two_deployments_on_the_cpu_pool(project):
    # the GPU work is not a deployment: background tasks on warm workers (flows/workers.py)
    deployments = _by_name(project)
    assert set(deployments) == {"storyboard", "inbox"}
    assert deployments["storyboard"]["entrypoint"] == "flows/storyboard.py:storyboard_flow"
    assert deployments["inbox"]["entrypoint"] == "flows/inbox.py:inbox_flow"
    pools = {n: d["work_pool"]["name"] for n, d in deployments.items()}
    assert pools == {"storyboard": CPU_POOL, "inbox": CPU_POOL}


@pytest.mark.parametrize("deployment", _entrypoint_params())
def test_every_entrypoint_is_a_flow_function_taking_the_deployment_parameters(deployment):
    path, function = deployment["entrypoint"].split(":", 1)
    assert (ROOT / path).is_file(), f"{path} does not exist"
    fn = _flow_function(ROOT / path, function)
    assert fn is not None, f"{path} defines no function {function}"
    assert _is_flow(fn), f"{path}:{function} is not decorated with @flow"
    accepted = {a.arg for a in fn.args.args + fn.args.kwonlyargs}
    assert set(deployment.get("parameters") or {}) <= accepted


def _flow_name(entrypoint: str) -> str:
    """The ``name=`` of an entrypoint's ``@flow(...)`` decorator (Prefect's default: the function name, with '-')."""
    path, function = entrypoint.split(":", 1)
    fn = _flow_function(ROOT / path, function)
    for d in fn.decorator_list:
        if isinstance(d, ast.Call):
            for kw in d.keywords:
                if kw.arg == "name" and isinstance(kw.value, ast.Constant):
                    return kw.value.value
    return function.replace("_", "-")


def test_the_storyboard_deployment_uses_the_warm_workers_so_the_cpu_pool_only_orchestrates(project):
    storyboard = _by_name(project)["storyboard"]
    assert storyboard["work_pool"]["name"] == CPU_POOL and storyboard["parameters"] == {"scale_out": True}


def test_deployment_names_used_in_code_exist_in_the_project_file(project):
    names = {
        f"{_flow_name(d['entrypoint'])}/{d['name']}"
        for d in project["deployments"]
        if (ROOT / d["entrypoint"].split(":", 1)[0]).is_file()
    }
    used = {_by_name(project)["inbox"]["parameters"]["deployment"]}
    for path in (ROOT / "flows").glob("*.py"):  # deployment constants, e.g. X_DEPLOYMENT = "storyboard/storyboard"
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant):
                if any(isinstance(t, ast.Name) and t.id.endswith("_DEPLOYMENT") for t in node.targets):
                    used.add(node.value.value)
    assert used <= names, f"deployments named in code but not in deploy/prefect.yaml: {sorted(used - names)}"


def test_workers_run_from_their_checkout_named_by_fastimagic_home_read_on_the_worker(project):
    # `{{ $VAR }}` would be filled in by `prefect deploy` on the deploying machine: the path is read by a step that
    # runs on the worker (run_shell_script expands the worker's environment), then changed into.
    read, chdir = project["pull"]
    shell = read["prefect.deployments.steps.run_shell_script"]
    assert shell["script"] == "echo $FASTIMAGIC_HOME" and shell["expand_env_vars"] is True
    assert "{{" not in yaml.safe_dump(project["pull"]).replace("{{ " + shell["id"] + ".stdout }}", "")
    directory = "{{ " + shell["id"] + ".stdout }}"
    assert chdir == {"prefect.deployments.steps.set_working_directory": {"directory": directory}}
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    home = re.search(r"FASTIMAGIC_HOME=(\S+)", dockerfile)
    workdir = re.search(r"^WORKDIR\s+(\S+)", dockerfile, re.M)
    assert home and workdir and home.group(1) == workdir.group(1)


def test_the_inbox_runs_every_two_minutes_on_a_valid_cron_schedule(project, compose):
    from prefect.client.schemas.schedules import CronSchedule

    inbox = _by_name(project)["inbox"]
    [schedule] = inbox["schedules"]
    cron = CronSchedule(cron=schedule["cron"], timezone=schedule.get("timezone"))  # prefect's own validation
    try:
        from croniter import croniter
    except ImportError:
        try:
            from prefect._vendor.croniter import croniter  # prefect vendors croniter
        except ImportError:
            croniter = None
    if croniter is not None:
        from datetime import datetime

        it = croniter(cron.cron, datetime(2026, 1, 1, 0, 1))
        first, second = it.get_next(datetime), it.get_next(datetime)
        assert (second - first).total_seconds() == 120
    else:
        assert re.fullmatch(r"\*/2 \* \* \* \*", cron.cron)
    # the inbox it watches is in the bucket the compose file creates, and its inbox/ folder exists there
    bucket, _, prefix = inbox["parameters"]["inbox"].removeprefix("s3://").partition("/")
    script = "\n".join(compose["services"]["createbuckets"]["command"])
    assert f"local/{bucket}" in script and f"{prefix}/inbox" in script
    assert inbox["parameters"]["run"] == "deployment"
    assert inbox["parameters"]["deployment"] == "storyboard/storyboard"


def test_only_one_inbox_trigger_runs_at_a_time_and_an_overlapping_one_is_cancelled(project):
    from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy

    limit = ConcurrencyLimitConfig.model_validate(_by_name(project)["inbox"]["concurrency_limit"])  # prefect's schema
    assert limit.limit == 1 and limit.collision_strategy == ConcurrencyLimitStrategy.CANCEL_NEW
    assert "concurrency_limit" not in _by_name(project)["storyboard"]  # storyboard runs are many at once


# -- docker-compose.yml ------------------------------------------------------------------------------------------


def test_every_work_pool_has_a_compose_worker_polling_it(project, compose):
    used = {d["work_pool"]["name"] for d in project["deployments"]}
    assert used == set(_worker_pools(compose).values()) == {CPU_POOL}
    for name in _worker_pools(compose):
        command = compose["services"][name]["command"]
        assert "--type process" in command


def test_compose_services_volumes_and_dependencies_are_consistent(compose):
    services = compose["services"]
    assert {"minio", "createbuckets", "prefect-server", "cpu-worker"} <= set(services) and _gpu_workers(compose)
    declared = set(compose.get("volumes") or {})
    for name, service in services.items():
        for volume in service.get("volumes", []):
            source = volume["source"] if isinstance(volume, dict) else volume.split(":", 1)[0]
            if not source.startswith((".", "/", "~", "$")):
                assert source in declared, f"service {name}: volume {source!r} is not declared under volumes:"
        depends = service.get("depends_on") or []
        for other in depends if isinstance(depends, list) else depends.keys():
            assert other in services, f"service {name} depends on unknown service {other!r}"
    assert any(v.startswith("minio-data:") for v in services["minio"]["volumes"])
    assert "healthcheck" in services["minio"] and "healthcheck" in services["prefect-server"]
    assert "9001:9001" in services["minio"]["ports"]
    server = services["prefect-server"]
    assert "prefect server start --host 0.0.0.0" in server["command"]
    db_folder = server["environment"]["PREFECT_HOME"]
    assert any(v.split(":")[1] == db_folder for v in server["volumes"])
    assert db_folder in server["environment"]["PREFECT_API_DATABASE_CONNECTION_URL"]


def _gpu_workers(compose: dict) -> dict[str, dict]:
    return {n: s for n, s in compose["services"].items() if n.startswith("gpu-worker")}


def test_workers_reach_minio_and_prefect_and_keep_weights_in_a_volume(compose):
    for name in ("cpu-worker", *_gpu_workers(compose)):
        service = compose["services"][name]
        env = service["environment"]
        assert env["PREFECT_API_URL"] == "http://prefect-server:4200/api"
        assert env["AWS_ENDPOINT_URL"] == "http://minio:9000"
        assert env["AWS_ACCESS_KEY_ID"].startswith("${MINIO_ROOT_USER")
        assert env["AWS_SECRET_ACCESS_KEY"].startswith("${MINIO_ROOT_PASSWORD")
        mounts = {v.split(":")[1]: v.split(":")[0] for v in service["volumes"]}
        assert mounts.get(env["HF_HOME"]) in compose["volumes"], f"{name}: HF_HOME is not on a named volume"
        assert service["build"]["dockerfile"] == "deploy/Dockerfile"
        assert (DEPLOY / service["build"]["context"] / service["build"]["dockerfile"]).resolve().is_file()


def test_one_warm_gpu_worker_per_gpu_each_with_its_own_device_index_and_the_storage_block(compose):
    workers = _gpu_workers(compose)
    assert len(workers) >= 2
    devices = sorted(w["environment"]["CUDA_VISIBLE_DEVICES"] for w in workers.values())
    assert devices == [str(i) for i in range(len(workers))], devices  # 0, 1, ...: each GPU once
    for name, w in workers.items():
        assert w["command"] == "fastimagic worker", name
        assert w["environment"]["PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK"] == RESULTS_BLOCK
        [device] = w["deploy"]["resources"]["reservations"]["devices"]
        assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    assert "deploy" not in compose["services"]["cpu-worker"]


# -- Dockerfile --------------------------------------------------------------------------------------------------


def test_the_dockerfile_builds_on_cuda_pytorch_installs_the_project_and_starts_a_worker(compose):
    text = (DEPLOY / "Dockerfile").read_text()
    [base] = re.findall(r"^FROM\s+(\S+)", text, re.M)
    assert re.fullmatch(r"pytorch/pytorch:[\d.]+-cuda[\d.]+-cudnn\d+-(runtime|devel)", base)
    assert re.search(r"pip install\b[^\n]*-e \.", text)
    assert re.search(r'^CMD \["fastimagic", "worker"\]', text, re.M)
    # the workers' Prefect is the server's
    version = re.search(r"ARG PREFECT_VERSION=(\S+)", text).group(1)
    assert compose["services"]["prefect-server"]["image"] == f"prefecthq/prefect:{version}-python3.11"


# -- setup.sh ----------------------------------------------------------------------------------------------------


def test_the_setup_script_creates_the_pool_and_the_result_storage_block_removes_the_gpu_limit_and_deploys():
    text = (DEPLOY / "setup.sh").read_text()
    assert f"CPU_POOL={CPU_POOL}" in text and "GPU_POOL" not in text
    assert 'prefect work-pool create "$pool" --type process' in text
    assert f"RESULTS_BLOCK={RESULTS_BLOCK.split('/', 1)[1]}" in text and "S3Bucket(" in text
    assert "GPU_TAG=gpu" in text and "delete_concurrency_limit_by_tag(tag)" in text
    assert "concurrency-limit create" not in text
    assert "prefect deploy --all --prefect-file" in text and "PREFECT_FILE=deploy/prefect.yaml" in text
    if shutil.which("bash"):
        subprocess.run(["bash", "-n", str(DEPLOY / "setup.sh")], check=True)


# -- secrets -----------------------------------------------------------------------------------------------------


def test_no_secret_is_committed():
    env = {}
    for line in (DEPLOY / ".env.example").read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.partition("=")
            env[key.strip()] = value.strip()
    assert {"MINIO_ROOT_USER", "MINIO_ROOT_PASSWORD", "PREFECT_AUTH_STRING", "INBOX_UPLOADER_USER"} <= set(env)
    for key, value in env.items():
        if re.search(r"USER|PASSWORD|SECRET|KEY|TOKEN|AUTH", key):
            assert value.startswith("change-me"), f".env.example {key} must be a change-me placeholder"
    if shutil.which("git"):
        tracked = subprocess.run(["git", "ls-files", "deploy"], cwd=ROOT, capture_output=True, text=True).stdout
        assert "deploy/.env\n" not in tracked, "deploy/.env (real credentials) is tracked by git"
    compose = _load("docker-compose.yml")
    for name, service in compose["services"].items():
        for key, value in (service.get("environment") or {}).items():
            if re.search(r"PASSWORD|SECRET|ACCESS_KEY|TOKEN|AUTH", key):
                assert str(value).startswith("${"), f"service {name}: {key} must come from deploy/.env"
    for path in DEPLOY.iterdir():
        if path.is_file():
            assert "minioadmin" not in path.read_text(errors="replace"), f"{path.name}: default MinIO credentials"


# -- k8s/gpu-workers.yaml ------------------------------------------------------------------------------------------


def test_the_kubernetes_gpu_workers_take_one_gpu_each_and_read_the_same_settings_as_compose(compose):
    docs = [d for d in yaml.safe_load_all((DEPLOY / "k8s" / "gpu-workers.yaml").read_text()) if d]
    [deployment] = [d for d in docs if d["kind"] == "Deployment"]
    spec = deployment["spec"]
    assert spec["selector"]["matchLabels"].items() <= spec["template"]["metadata"]["labels"].items()
    [container] = spec["template"]["spec"]["containers"]
    assert container["command"] == ["fastimagic", "worker"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK"] == RESULTS_BLOCK
    assert "CUDA_VISIBLE_DEVICES" not in env  # the device plugin shows each pod its one GPU
    compose_env = next(iter(_gpu_workers(compose).values()))["environment"]
    for name in ("PREFECT_API_URL", "AWS_ENDPOINT_URL", "HF_HOME"):
        assert env[name] == compose_env[name], name
    assert not any(re.search(r"SECRET|PASSWORD|ACCESS_KEY", name) for name in env)  # credentials from a Secret
    assert container["envFrom"][0]["secretRef"]["name"]
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    volumes = {v["name"] for v in spec["template"]["spec"]["volumes"]}
    assert mounts.get("hf-cache") == env["HF_HOME"] and set(mounts) <= volumes


# -- who is trusted with what (issue 21) ---------------------------------------------------------------------------


def test_the_prefect_api_is_behind_authentication_and_every_client_sends_it(compose):
    server = compose["services"]["prefect-server"]
    assert server["environment"]["PREFECT_SERVER_API_AUTH_STRING"].startswith("${PREFECT_AUTH_STRING:?")
    assert "/api/health" in " ".join(server["healthcheck"]["test"])  # Prefect leaves GET /health open for probes
    for name in ("cpu-worker", *_gpu_workers(compose)):
        assert compose["services"][name]["environment"]["PREFECT_API_AUTH_STRING"].startswith(
            "${PREFECT_AUTH_STRING:?"), name
    k8s = (DEPLOY / "k8s" / "gpu-workers.yaml").read_text()
    assert "--from-literal=PREFECT_API_AUTH_STRING=" in k8s  # from the Secret the pods read with envFrom


def test_task_parameters_and_results_live_in_a_bucket_inbox_uploaders_cannot_write(project, compose):
    import json

    inbox_bucket = _by_name(project)["inbox"]["parameters"]["inbox"].removeprefix("s3://").split("/")[0]
    results = compose["services"]["cpu-worker"]["environment"]["FASTIMAGIC_RESULTS_BUCKET"]
    assert results != inbox_bucket
    assert all(compose["services"][n]["environment"]["FASTIMAGIC_RESULTS_BUCKET"] == results
               for n in _gpu_workers(compose))
    setup = (DEPLOY / "setup.sh").read_text()
    assert f'os.environ.get("FASTIMAGIC_RESULTS_BUCKET", "{results}")' in setup  # the default too
    [command] = compose["services"]["createbuckets"]["command"]
    assert f"mc mb --ignore-existing local/{results}" in command
    statements = json.loads(re.search(r"printf '%s' '(\{.*?\})' >", command, re.S).group(1))["Statement"]
    resources = [r for st in statements for r in st["Resource"]]
    assert not any(r.split(":::")[1].startswith(results) for r in resources)
    [put] = [st for st in statements if "s3:PutObject" in st["Action"]]
    arn = f"arn:aws:s3:::{inbox_bucket}"
    assert put["Resource"] == [f"{arn}/storyboards/inbox/*", f"{arn}/refs/*"]
    assert 'mc admin policy attach local inbox-uploader --user "$$INBOX_UPLOADER_USER"' in command
