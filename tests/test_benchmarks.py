"""The benchmarks still run: ``benchmarks/gpu.py --tiny`` and ``benchmarks/method.py`` as a user runs them.

Only the shape of their output is checked (exit status, figure names, keys), never a time: the numbers belong in
docs/performance.md, not in assertions. Both scripts run at once to keep the wall time down on 2 cores.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = {
    "gpu": [sys.executable, "benchmarks/gpu.py", "--tiny"],
    "method": [sys.executable, "benchmarks/method.py", "--steps", "4", "--repeat", "1"],
}


@pytest.fixture(scope="module")
def outputs() -> dict[str, subprocess.CompletedProcess]:
    env = dict(os.environ)
    # method.py imports tests/conftest.py, which imports tests/s3server.py as a top-level module.
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "tests")])
    env.pop("PREFECT_API_URL", None)  # gpu.py runs its own embedded Prefect server in a temporary home
    # Side by side, each torch process gets one thread: with a thread per core in both, on a busy 2-core machine,
    # their threads fought and gpu.py --tiny ran past 600 s (about 90 s otherwise).
    env["OMP_NUM_THREADS"] = "1"
    procs = {
        name: subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for name, cmd in COMMANDS.items()
    }
    done = {}
    try:
        for name, proc in procs.items():
            out, err = proc.communicate(timeout=600)
            done[name] = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
    return done


def _figures(stdout: str) -> dict[str, dict]:
    records = [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]
    return {r["figure"]: r for r in records}


def test_gpu_benchmark_tiny_prints_every_figure_as_one_json_line(outputs):
    run = outputs["gpu"]
    assert run.returncode == 0, run.stderr[-3000:]
    figures = _figures(run.stdout)
    assert list(figures) == [
        "device", "equivalence", "finetune", "sample", "batch1", "flops", "forget_switch", "profile", "storyboard"
    ]
    assert {"gpu", "torch", "diffusers", "date"} <= set(figures["device"])
    assert figures["equivalence"]["max_pixel_diff"] == 0  # no switch on: two renders of one keyframe agree
    assert {"seconds", "first_call_seconds", "steps", "batch", "resolution", "peak_gib"} <= set(figures["finetune"])
    assert figures["finetune"]["steps"] == 4 and figures["finetune"]["resolution"] == 64
    assert {"images_per_second", "batch", "steps", "resolution", "sweep"} <= set(figures["sample"])
    assert set(figures["sample"]["sweep"]) == {"1", "4"}
    assert figures["batch1"]["seconds_per_image"] > 0 and figures["batch1"]["host_syncs_per_step"] is None  # CPU
    flops = figures["flops"]  # counted by torch.utils.flop_counter: the keyframe is 2 x steps UNet images + decode
    expected = 2 * figures["sample"]["steps"] * flops["unet_tflop_per_image"] + flops["vae_decode_tflop"]
    assert flops["tflop_per_keyframe"] == pytest.approx(expected, rel=1e-3) and flops["finetune_tflop_per_step"] > 0
    assert flops["sample_fraction_of_peak"] is None  # the fraction of an H200 is for an H200
    assert figures["forget_switch"]["seconds"] > 0
    profile = figures["profile"]  # where the time goes, by kind of operator: shares of the profiled time
    for part in ("unet_best_batch", "unet_batch1", "vae_decode", "finetune_2_steps"):
        assert sum(profile[part]["by_kind"].values()) == pytest.approx(1, abs=0.01), part
        assert profile[part]["top"] and profile[part]["device_busy"] is None  # kernel time vs wall: a GPU's
    assert profile["unet_best_batch"]["batch"] == figures["sample"]["batch"]
    assert "convolution" in profile["unet_best_batch"]["by_kind"]
    assert figures["storyboard"]["keyframes"] == 2 * 2 * 2
    assert figures["storyboard"]["model_prewarmed"] is True  # the flow used the model the figure loaded
    assert figures["storyboard"]["sampling_calls"] == 2  # one per scene: all its seeds and edits in one call
    assert figures["storyboard"]["sample_reference"] == "the sample figure's best"
    assert figures["storyboard"]["flow_efficiency"] > 0 and 0 < figures["storyboard"]["gpu_busy_fraction"] <= 1
    for name in ("finetune", "sample", "batch1", "forget_switch", "storyboard"):
        assert figures[name]["meets_target"] is None  # targets are for a GPU, not the tiny model
        assert figures[name]["target"]


def test_method_benchmark_prints_its_ratios(outputs):
    run = outputs["method"]
    assert run.returncode == 0, run.stderr[-3000:]
    values = dict(pair.split("=", 1) for line in run.stdout.splitlines() for pair in line.split())
    for key in ("batched_vs_per_image_speedup", "forget_inplace_vs_deepcopy_speedup", "finetune_seconds_per_step"):
        assert float(values[key]) > 0
    # the tuning file figure runs on an SD 1.5 reference-sized tuning, as the docs quote it
    assert values["tuning_file"] == "sd15" and values["tuning_file_tensors"] == "518"
    assert int(values["tuning_file_bytes"]) > 2 * 587_000_000
    for key in ("tuning_file_speedup", "tuning_file_stall_seconds", "tuning_file_stall_safetensors_seconds"):
        assert float(values[key]) > 0


def test_gpu_benchmark_tiny_sdxl_reports_the_tuning_size():
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests")]))
    env.pop("PREFECT_API_URL", None)
    cmd = [sys.executable, "benchmarks/gpu.py", "--tiny", "--arch", "sdxl", "--only", "finetune,forget_switch"]
    run = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    figures = _figures(run.stdout)
    assert figures["device"]["model"] == "tiny-sdxl (random)"
    assert figures["finetune"]["tuning_bytes"] > 2 * figures["finetune"]["trained_parameters"]  # fp16 + e_src
    assert figures["finetune"]["target"] == {"seconds_max": 30.0, "peak_gib_max": 60.0}
    assert figures["forget_switch"]["meets_target"] is None  # CPU: no verdict
    assert figures["finetune"]["unet_weights_bytes"] > 4 * figures["finetune"]["trained_parameters"]  # fp32 on CPU


SAMPLING = ("finetune", "sample", "batch1", "flops", "forget_switch", "profile")


@pytest.mark.parametrize(
    "argv, figures",
    [  # the command lines of ../shared/device/gpu-check.sh, which the next GPU run uses as they are
        ("--arch sd15 --only finetune,sample,forget_switch", [*SAMPLING]),
        ("--arch sdxl --only finetune,sample,forget_switch --batches 1,4,8", [*SAMPLING]),
        ("--arch sd15 --only storyboard", ["storyboard"]),
        ("--arch sd15 --only sample --compile --batches 1,32", ["compile", "sample", "batch1", "flops", "profile"]),
        ("--arch sd15", ["equivalence", *SAMPLING[:4], "forget_switch", "profile", "storyboard"]),
    ],
)
def test_gpu_check_command_lines_select_the_figures_of_the_table(argv, figures):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from gpu import parse_args

    assert parse_args(argv.split()).figures == figures


BREAK_ONE = """
import sys
sys.path[:0] = [{root!r}, {root!r} + "/benchmarks", {root!r} + "/tests"]
import gpu

def broken(*args, **kwargs):
    raise RuntimeError("broken on purpose")

setattr(gpu, {name!r}, broken)
sys.exit(gpu.main(["--tiny", "--only", "finetune,forget_switch"]))
"""


@pytest.mark.parametrize(
    "broken, expected",
    [  # a figure that raises costs that figure; one that the others need costs them, and says so
        ("figure_finetune", {"finetune": "error", "forget_switch": "seconds"}),
        ("assemble", {"model": "error", "finetune": "skipped", "forget_switch": "skipped"}),
    ],
)
def test_a_figure_that_fails_on_the_gpu_costs_that_figure_and_not_the_rest_of_the_run(broken, expected):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests")]), OMP_NUM_THREADS="1")
    env.pop("PREFECT_API_URL", None)
    script = BREAK_ONE.format(root=str(ROOT), name=broken)
    run = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 1, run.stderr[-2000:]
    figures = _figures(run.stdout)
    assert list(figures) == ["device", *expected]
    for name, key in expected.items():
        assert key in figures[name], figures[name]
    failed = next(r for r in figures.values() if "error" in r)
    assert failed["error"] == "RuntimeError: broken on purpose" and failed["where"][-1].endswith(" broken")
    assert "figures that failed: " + failed["figure"] in run.stderr
