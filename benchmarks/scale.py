"""Warm workers against one process: the same storyboards, side by side, on loopback.

One run starts a real ``prefect server start``, a SeaweedFS S3 server (keyframes and the shared result storage),
``deploy/setup.sh`` and two ``fastimagic worker`` processes. Then two storyboards (different source prompts, so two
tunings) run in a row twice: ``fastimagic run FILE`` (in one process) and ``fastimagic run FILE --workers`` (the
fine-tune and every render on the warm workers). Both sides talk to the same Prefect server and write to the same
S3 server, so the difference is who does the GPU work. Prints ``name=value`` lines:

* ``scaleout_vs_inprocess``: wall time of both storyboards with ``--workers`` over without (each a fresh
  ``fastimagic run`` process, so both pay its start and imports; the warm side does not pay the model load);
* ``model_loads_per_worker``: the most base-model loads any worker did, its warm-up at start included (from its
  log; the workers run with ``FASTIMAGIC_WORKER_MODEL=tiny``, so they load it before serving);
* ``tuning_fetches_per_worker_per_key``: the most fetches of one tuning by one worker;
* ``renders_per_worker`` and ``device_busy_fraction_per_worker``: render units each worker ran, and the share of the
  ``--workers`` storyboards' wall time each spent rendering on its device (from its ``rendered ...`` log lines);
* ``scene_start_seconds``: from submitting a scene's first render to its start on a warm worker (Prefect's task
  run ``created`` to ``start_time``), median over the first render wave of the second storyboard (workers warm
  and idle); later waves also wait for a free worker, which is queueing, not start cost.

Each worker stands for one GPU, so it gets an equal share of this machine's cores (``OMP_NUM_THREADS``, unless set);
the in-process side uses all of them.

Run: ``python benchmarks/scale.py [--scenes 4] [--seeds 2] [--steps 20]``. Every process it starts is stopped by
its PID at the end.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for path in (ROOT, ROOT / "tests"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from s3server import free_ports, start_s3_server  # noqa: E402
from test_warm_workers import BLOCK, WORKERS, Processes  # noqa: E402

from fastimagic.tiny import reference_photo_bytes  # noqa: E402

PREFECT = str(Path(sys.executable).with_name("prefect"))


def storyboard(bucket: str, side: str, name: str, subject: str, scenes: int, seeds: int, steps: int) -> str:
    # each side writes (and fine-tunes) under its own output prefix: neither reuses the other's tunings
    return (
        f"name: {side}-{name}\nreference: s3://{bucket}/refs/r.jpg\nmodel: tiny\nresolution: 64\n"
        f"source_prompt: a photo of a {subject}\nfinetune: {{steps: 8, min_steps: 8}}\nscorer: none\n"
        f"defaults: {{seeds: {seeds}, steps: {steps}, edit: {{subtract: {{gamma: [0.9, 1.2]}}}}}}\n"
        f"output: s3://{bucket}/out-{side}\nscenes:\n"
        + "".join(f"  - {{id: scene-{i}, prompt: a photo of a {subject} number {i}}}\n" for i in range(scenes))
    )


def run(env: dict, uri: str, *args: str) -> float:
    t = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "flows.cli", "run", uri, "-q", *args], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=1800)
    if r.returncode != 0:
        raise SystemExit(f"fastimagic run {uri} {' '.join(args)} failed:\n{r.stderr[-3000:]}")
    return time.perf_counter() - t


def first_wave_start_seconds(api: str, since: datetime, until: datetime, wave: int) -> list[float]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import TaskRunFilter, TaskRunFilterName, TaskRunFilterStartTime
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: api}), get_client(sync_client=True) as client:
        runs = client.read_task_runs(task_run_filter=TaskRunFilter(
            name=TaskRunFilterName(like_="render scene"), start_time=TaskRunFilterStartTime(after_=since)))
    runs = sorted((r for r in runs if r.created and r.start_time and r.created <= until), key=lambda r: r.created)
    return [(r.start_time - r.created).total_seconds() for r in runs[:wave]]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--scenes", type=int, default=4)
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--steps", type=int, default=20)
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="fastimagic-scale-"))
    s3 = start_s3_server(work / "seaweedfs")
    procs = Processes(work)
    try:
        (port,) = free_ports(1)
        api = f"http://127.0.0.1:{port}/api"
        env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
        env.update(PREFECT_HOME=str(work / "prefect-home"), PREFECT_SERVER_ANALYTICS_ENABLED="false",
                   PREFECT_LOGGING_LEVEL="INFO", PYTHONPATH=str(ROOT), FASTIMAGIC_HOME=str(ROOT),
                   FASTIMAGIC_RESULTS_BUCKET=s3.make_bucket(), HF_HUB_OFFLINE="1", **s3.env())
        procs.start("server", [PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)], env)
        while True:
            try:
                urllib.request.urlopen(f"{api}/health", timeout=2).read()
                break
            except OSError:
                time.sleep(0.5)
        env["PREFECT_API_URL"] = api
        subprocess.run(["bash", "deploy/setup.sh"], cwd=ROOT, env=env, check=True, capture_output=True, timeout=600)
        env["PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK"] = BLOCK
        # the operator names the model its workers keep warm: they load (and on a GPU prime) it before serving
        worker_env = env | {"FASTIMAGIC_WORKER_MODEL": "tiny"}
        # Each worker stands for a GPU of its own: here it gets its share of the cores (two torch processes with a
        # thread per core each fight over them: renders of 0.4 s took 13-69 s), the in-process side all of them.
        worker_env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // len(WORKERS))))
        for name in WORKERS:
            procs.start(name, [sys.executable, "-m", "flows.cli", "worker"], worker_env)
        for name in WORKERS:
            while "serving caption" not in procs.tail(name, 1_000_000):
                time.sleep(0.3)

        bucket = s3.make_bucket()
        client = s3.client()
        client.put_object(Bucket=bucket, Key="refs/r.jpg", Body=reference_photo_bytes())
        uris = {}
        for side in ("inprocess", "warm"):
            for name, subject in (("first", "bird"), ("second", "cat")):
                key = f"storyboards/{side}-{name}.yaml"
                text = storyboard(bucket, side, name, subject, args.scenes, args.seeds, args.steps)
                client.put_object(Bucket=bucket, Key=key, Body=text.encode())
                uris[side, name] = f"s3://{bucket}/{key}"

        seconds = {}
        windows = {}
        for name in ("first", "second"):  # side by side, storyboard by storyboard
            seconds["inprocess", name] = run(env, uris["inprocess", name])
            since = datetime.now(timezone.utc)
            seconds["warm", name] = run(env, uris["warm", name], "--workers")
            windows[name] = (since, datetime.now(timezone.utc))

        logs = {w: procs.tail(w, 100_000_000) for w in WORKERS}
        loads = {w: len(re.findall(r"loaded base model ", log)) for w, log in logs.items()}
        fetches = {w: Counter(re.findall(r"fetched tuning (\S+)", log)) for w, log in logs.items()}
        starts = {n: first_wave_start_seconds(api, *windows[n], wave=len(WORKERS)) for n in windows}
        inprocess = seconds["inprocess", "first"] + seconds["inprocess", "second"]
        warm = seconds["warm", "first"] + seconds["warm", "second"]
        units = args.scenes * args.seeds
        print(f"storyboards=2 scenes={args.scenes} seeds={args.seeds} steps={args.steps} keyframes={units * 2 * 2}")
        for (side, name), s in sorted(seconds.items()):
            print(f"{side}_{name}_seconds={s:.2f}")
        print(f"scaleout_vs_inprocess={warm / inprocess:.2f}")
        print(f"model_loads_per_worker={max(loads.values())} ({', '.join(f'{w}: {n}' for w, n in loads.items())})")
        worst = max((n for c in fetches.values() for n in c.values()), default=0)
        detail = "; ".join(f"{w}: {dict(c)}" for w, c in fetches.items())
        print(f"tuning_fetches_per_worker_per_key={worst} ({detail})")
        # each worker's share of the --workers storyboards' wall time spent rendering on its device
        warm_seconds = seconds["warm", "first"] + seconds["warm", "second"]
        device = r"rendered .*?, ([\d.]+) s on the device"
        busy = {w: sum(map(float, re.findall(device, log))) for w, log in logs.items()}
        renders = {w: len(re.findall(r"rendered ", log)) for w, log in logs.items()}
        print("renders_per_worker=" + ", ".join(f"{w}: {n}" for w, n in renders.items()))
        print("device_busy_fraction_per_worker=" + ", ".join(f"{w}: {b / warm_seconds:.2f}" for w, b in busy.items()))
        print(f"scene_start_seconds={statistics.median(starts['second']):.2f}"
              f" (first storyboard: {statistics.median(starts['first']):.2f}; workers idle, first render wave)")
    finally:
        procs.stop_all()
        s3.close()


if __name__ == "__main__":
    main()
