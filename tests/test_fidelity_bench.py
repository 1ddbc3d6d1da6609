"""benchmarks/fidelity.py --quick and benchmarks/tedbench.py (tiny model) run as a user runs them.

Shapes and tolerances only, never a time. The precision figures are checked for their order (bf16 loses more of
the learned change than fp16), which is arithmetic, not a measurement that drifts.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_fidelity_benchmark_quick_prints_every_figure_within_tolerance():
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests")]), CUDA_VISIBLE_DEVICES="")
    run = subprocess.run(
        [sys.executable, "benchmarks/fidelity.py", "--quick"], cwd=ROOT, env=env, capture_output=True, text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    values = dict(line.split("=", 1) for line in run.stdout.splitlines() if "=" in line and " " not in line)
    for name in ("parity_max_loss_diff", "parity_max_embedding_diff", "parity_max_delta_diff", "fp16_delta_error",
                 "bf16_delta_error", "tf32_delta_error", "keyframe_max_pixel_diff_fp32",
                 "keyframe_max_pixel_diff_bf16", "auto_tolerance"):
        assert name in values, run.stdout
    assert float(values["parity_max_loss_diff"]) < 1e-6
    assert float(values["parity_max_embedding_diff"]) < 5e-5  # the bounds of tests/test_parity.py, and why
    assert float(values["parity_max_delta_diff"]) < 2.5e-4
    assert int(values["keyframe_max_pixel_diff_fp32"]) == 0
    fp16, bf16 = float(values["fp16_delta_error"]), float(values["bf16_delta_error"])
    assert fp16 < float(values["auto_tolerance"]) < bf16  # why auto picks fp16 on CUDA and never bf16


def _two_originals(folder: Path) -> Path:
    """TEdBench-shaped data: the shared copy's first two originals when present, else two drawn images."""
    import json

    from conftest import drawn_photo

    shared = ROOT.parent / "shared" / "data" / "tedbench"
    if (shared / "input_list.json").is_file():
        return shared
    (folder / "originals").mkdir(parents=True)
    (folder / "originals" / "a.png").write_bytes(drawn_photo(96, 64))
    (folder / "originals" / "b.png").write_bytes(drawn_photo(64, 96))
    entries = [{"img_name": "a.png", "target_text": "A photo of a dog sitting."},
               {"img_name": "a.png", "target_text": "A photo of a dog jumping."},
               {"img_name": "b.png", "target_text": "A photo of a red apple."}]
    (folder / "input_list.json").write_text(json.dumps(entries))
    return folder


def test_tedbench_runs_two_originals_through_the_cli_with_the_tiny_model(tmp_path):
    data = _two_originals(tmp_path / "data")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests")]), CUDA_VISIBLE_DEVICES="")
    env.pop("PREFECT_API_URL", None)
    run = subprocess.run(
        [sys.executable, "benchmarks/tedbench.py", "--data", str(data), "--model", "tiny", "--limit", "2",
         "--output", str(tmp_path / "out")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    values = dict(line.split("=", 1) for line in run.stdout.splitlines() if "=" in line)
    assert values["originals"] == "2" and int(values["picks"]) == int(values["edits"]) >= 2
    assert 0.0 <= float(values["clip_score"]) <= 2.5
    assert values["fidelity_metric"] in ("lpips", "clip_image")
    storyboards = sorted((tmp_path / "out").glob("tedbench-*.yaml"))
    assert len(storyboards) == 2
    import yaml

    board = yaml.safe_load(storyboards[0].read_text())
    assert board["defaults"]["edit"] == {"subtract": {"gamma": {"from": 0.8, "to": 1.6, "step": 0.1}}}
    assert board["defaults"]["forget"] == "auto" and board["defaults"]["select"] == {"top": 1}
    assert board["defaults"]["guidance"] == 7.5
