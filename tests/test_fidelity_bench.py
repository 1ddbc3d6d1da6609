"""benchmarks/fidelity.py --quick runs as a user runs it, prints every figure, and its parity numbers hold.

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
    assert float(values["parity_max_embedding_diff"]) < 5e-6
    assert float(values["parity_max_delta_diff"]) < 2e-5
    assert int(values["keyframe_max_pixel_diff_fp32"]) == 0
    fp16, bf16 = float(values["fp16_delta_error"]), float(values["bf16_delta_error"])
    assert fp16 < float(values["auto_tolerance"]) < bf16  # why auto picks fp16 on CUDA and never bf16
