"""Load: a 50-scene storyboard (50 x 2 seeds x 2 gamma = 200 keyframes) on the tiny model through the real flow,
with a Prefect concurrency limit of 2 on the ``gpu`` tag. Prints the peak RSS when scene 5 and scene 50 are
written (memory must stay flat across scenes) and checks the manifest lists all 200 keyframes.

Run: ``python benchmarks/load.py [--scenes 50] [--steps 4]``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _rss_mib() -> tuple[float, float]:
    """(current RSS, peak RSS) of this process in MiB."""
    current = 0.0
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            current = int(line.split()[1]) / 1024
    return current, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scenes", type=int, default=50)
    ap.add_argument("--steps", type=int, default=4, help="DDIM steps per keyframe")
    ap.add_argument("--limit", type=int, default=2, help="concurrency limit on the gpu tag")
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="fastimagic-load-"))
    os.environ.setdefault("PREFECT_HOME", str(work / "prefect"))
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    from prefect.client.orchestration import get_client

    from fastimagic.tiny import reference_photo_bytes
    from flows.storyboard import storyboard_flow

    (work / "ref.jpg").write_bytes(reference_photo_bytes())
    scenes = "".join(
        f"  - {{id: scene-{i:02d}, prompt: a photo of a bird in scene {i}}}\n" for i in range(1, args.scenes + 1)
    )
    story = work / "story.yaml"
    story.write_text(
        "name: load\nreference: ref.jpg\nmodel: tiny\nresolution: 64\nsource_prompt: a photo of a bird\n"
        "finetune: {steps: 10, min_steps: 10}\n"
        f"defaults: {{seeds: 2, steps: {args.steps}, edit: {{subtract: {{gamma: [0.9, 1.2]}}}}}}\n"
        f"output: out\nscenes:\n{scenes}"
    )
    with get_client(sync_client=True) as client:
        client.create_concurrency_limit(tag="gpu", concurrency_limit=args.limit)

    marks: dict[int, tuple[float, float]] = {}
    done = threading.Event()

    def watch() -> None:
        # A scene's manifest is written when all its keyframes are: sample memory at that moment.
        while not done.is_set():
            for n in (5, args.scenes):
                if n not in marks and (work / "out/load").exists():
                    if any(
                        (run / f"scenes/scene-{n:02d}/manifest.json").exists() for run in (work / "out/load").iterdir()
                    ):
                        marks[n] = _rss_mib()
            time.sleep(0.05)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    started = time.perf_counter()
    result = storyboard_flow(storyboard=str(story))
    elapsed = time.perf_counter() - started
    done.set()
    watcher.join()
    manifest = json.loads(Path(result["manifest"]).read_text())
    expected = args.scenes * 2 * 2
    assert len(manifest["keyframes"]) == expected, len(manifest["keyframes"])
    assert len({k["key"] for k in manifest["keyframes"]}) == expected
    print(
        f"scenes={args.scenes} keyframes={len(manifest['keyframes'])} gpu_concurrency_limit={args.limit} "
        f"seconds={elapsed:.1f}"
    )
    for n in (5, args.scenes):
        current, peak = marks.get(n, (float("nan"), float("nan")))
        print(f"rss_mib_at_scene_{n}={current:.0f} peak_rss_mib_at_scene_{n}={peak:.0f}")
    a, b = marks.get(5, (0, 0))[1], marks.get(args.scenes, (0, 0))[1]
    print(f"peak_rss_growth_scene_5_to_{args.scenes}_mib={b - a:.0f}")


if __name__ == "__main__":
    main()
