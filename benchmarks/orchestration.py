"""Orchestration overhead: one tiny storyboard through the Prefect flow and through direct fastimagic calls.

Both sides do the same model work in the same process: load the tiny model, fine-tune once, render every
(scene, seed) with ``Editor.render`` (the same batches the flow's render tasks use) and write PNGs to a local
folder. The flow also does what the pipeline adds around that: Prefect flow/task runs and their states on the
embedded server, the stored tuning, progress records, SHA-256s, contact sheets, manifests and index.html. The
difference per keyframe is the price of orchestration on a CPU-bound tiny model; on a GPU the model work
shrinks and this per-keyframe overhead stays.

Prefect's embedded server starts on the first flow run of a process (seconds): a throwaway one-keyframe flow
run goes first and is reported apart. The two sides then alternate ``--repeat`` times; the best of each counts.
Scoring is off (``scorer: none``) so the flow renders exactly what the direct side renders.

Prints ``name=value`` lines; run: ``python benchmarks/orchestration.py [--scenes 3] [--seeds 2] [--steps 4]``.
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.gpu import (  # noqa: E402  (the repository root must be importable first)
    SCENE_FORGETS,
    SCENE_PROMPTS,
    SOURCE_PROMPT,
    prefect_env,
    reference_png,
    storyboard_yaml,
)

GAMMAS = (0.9, 1.2)
RESOLUTION = 64


def write_story(folder: Path, reference: Path, *, scenes: int, seeds: int, gammas, steps: int, ft_steps: int):
    folder.mkdir(parents=True, exist_ok=True)
    story = folder / "story.yaml"
    story.write_text(
        storyboard_yaml(
            name="orchestration",
            reference=str(reference),
            model="tiny",
            output=str(folder / "out"),
            resolution=RESOLUTION,
            scenes=scenes,
            seeds=seeds,
            gammas=gammas,
            steps=steps,
            finetune_steps=ft_steps,
        )
    )
    return story


def run_flow(story: Path) -> tuple[float, int]:
    """(seconds, keyframes) of the storyboard flow, with the model loaded inside it as in a fresh worker."""
    from fastimagic import models
    from flows.storyboard import storyboard_flow

    models._WARM.clear()  # the flow loads its own model, as the direct side does
    t = time.perf_counter()
    result = storyboard_flow(storyboard=str(story))
    return time.perf_counter() - t, result["keyframes"]


def run_direct(reference: Path, out: Path, *, scenes: int, seeds: int, gammas, steps: int, ft_steps: int):
    """(seconds, keyframes) of the same work through fastimagic alone, as a notebook would do it."""
    from fastimagic.editor import Editor
    from fastimagic.finetuning import FinetuneConfig, finetune
    from fastimagic.images import load_reference
    from fastimagic.models import load_base_model

    t = time.perf_counter()
    data = reference.read_bytes()
    model = load_base_model("tiny")
    image = load_reference(data, str(reference))
    config = FinetuneConfig(steps=ft_steps, min_steps=ft_steps, batch_size=10)
    tuning = finetune(
        model,
        image,
        SOURCE_PROMPT,
        config,
        width=RESOLUTION,
        height=RESOLUTION,
        image_sha256=hashlib.sha256(data).hexdigest(),
    )
    count = 0
    with Editor(model, tuning) as editor:
        for i in range(scenes):
            folder = out / f"scene-{i + 1}"
            folder.mkdir(parents=True, exist_ok=True)
            forget = SCENE_FORGETS[i % len(SCENE_FORGETS)]
            for seed in range(seeds):
                frames = editor.render(
                    SCENE_PROMPTS[i % len(SCENE_PROMPTS)],
                    seeds=[seed],
                    edits=[{"mode": "subtract", "gamma": g} for g in gammas],
                    forget=forget,
                    steps=steps,
                    guidance=7.5,
                )
                for f in frames:
                    f.image.save(folder / f"{seed}-{f.edit.label()}-{forget}.png")
                    count += 1
    return time.perf_counter() - t, count


def measure(work: Path, reference: Path, sizes: dict, repeat: int) -> dict:
    # Throwaway: starts Prefect's embedded server, imports everything, builds the tiny model once.
    throwaway = write_story(work / "throwaway", reference, scenes=1, seeds=1, gammas=(1.0,), steps=1, ft_steps=1)
    first_seconds, _ = run_flow(throwaway)
    flow_times, direct_times, keyframes = [], [], 0
    for r in range(repeat):
        seconds, direct_count = run_direct(reference, work / f"direct-{r}", **sizes)
        direct_times.append(seconds)
        # A fresh output folder each time: a stored tuning would otherwise be reused and the fine-tune skipped.
        seconds, keyframes = run_flow(write_story(work / f"flow-{r}", reference, **sizes))
        flow_times.append(seconds)
        if keyframes != direct_count:
            raise RuntimeError(f"the flow wrote {keyframes} keyframes, the direct calls {direct_count}")
    return {"first": first_seconds, "flow": min(flow_times), "direct": min(direct_times), "keyframes": keyframes}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scenes", type=int, default=3)
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--steps", type=int, default=4, help="DDIM steps per keyframe")
    ap.add_argument("--finetune-steps", type=int, default=4)
    ap.add_argument("--repeat", type=int, default=2, help="best of N, flow and direct alternating")
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="fastimagic-orchestration-"))
    prefect_env(work / "prefect")
    reference = work / "reference.png"
    reference.write_bytes(reference_png(RESOLUTION))
    sizes = dict(scenes=args.scenes, seeds=args.seeds, gammas=GAMMAS, steps=args.steps, ft_steps=args.finetune_steps)
    try:
        m = measure(work, reference, sizes, args.repeat)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print(
        f"keyframes={m['keyframes']} scenes={args.scenes} seeds={args.seeds} gammas={len(GAMMAS)} "
        f"steps={args.steps} finetune_steps={args.finetune_steps} model=tiny resolution={RESOLUTION} "
        f"repeat={args.repeat}"
    )
    print(f"prefect_first_flow_seconds={m['first']:.2f}")
    print(f"flow_seconds={m['flow']:.2f} direct_seconds={m['direct']:.2f}")
    print(f"flow_vs_direct_ratio={m['flow'] / m['direct']:.2f}")
    print(f"orchestration_overhead_seconds_per_keyframe={(m['flow'] - m['direct']) / m['keyframes']:.3f}")


if __name__ == "__main__":
    main()
