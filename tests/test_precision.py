"""Precision policy: names, per-device choices, one-line refusals, fp32 master weights, fp16 loss scaling."""

import dataclasses
import subprocess
import sys

import pytest
import torch

from fastimagic.errors import FinetuneError, InputError
from fastimagic.finetuning import FinetuneConfig, finetune
from fastimagic.models import load_base_model
from fastimagic.precision import PRECISIONS, Precision, resolve_precision


def test_auto_is_fp16_with_loss_scaling_on_cuda_and_fp32_elsewhere():
    cuda = resolve_precision("auto", "cuda")
    assert (cuda.name, cuda.compute, cuda.frozen, cuda.tf32, cuda.grad_scaler) == (
        "fp16", "float16", "float16", False, True
    )
    assert resolve_precision("auto", torch.device("cpu")).name == "fp32"
    assert resolve_precision("auto", "mps").name == "fp32"
    tf32 = resolve_precision("tf32", "cuda:1")
    assert (tf32.compute, tf32.frozen, tf32.tf32, tf32.autocast) == ("float32", "float32", True, False)
    assert resolve_precision("bf16", "cpu").compute_dtype == torch.bfloat16
    assert PRECISIONS == ("auto", "fp32", "tf32", "fp16", "bf16")


@pytest.mark.parametrize(
    "name, device, message",
    [
        ("fp8", "cpu", "unknown precision 'fp8'; allowed: auto, fp32, tf32, fp16, bf16"),
        ("fp16", "cpu", "fp16 is not offered on CPU .*; use fp32 or bf16"),
        ("tf32", "cpu", "tf32 is a CUDA matmul mode and this device is cpu; use fp32"),
        ("tf32", "mps", "tf32 is a CUDA matmul mode and this device is mps"),
        ("bf16", "mps", "bf16 is not supported on this mps device; use fp16 or fp32"),
    ],
)
def test_bad_precisions_are_one_clear_line(name, device, message):
    with pytest.raises(InputError, match=message) as e:
        resolve_precision(name, device)
    assert "\n" not in str(e.value)


def test_bf16_on_a_cuda_card_without_it_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    with pytest.raises(InputError, match="bf16 is not supported on this cuda device"):
        resolve_precision("bf16", "cuda")


def test_precision_names_load_without_torch():
    code = "import sys, fastimagic.precision, fastimagic.images; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_the_loaded_model_records_its_precision_and_keeps_fp32_master_weights():
    model = load_base_model("tiny", device="cpu", precision="bf16")
    assert model.precision.name == "bf16" and model.dtype == torch.bfloat16
    assert next(model.text_encoder.parameters()).dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in model.unet.parameters())
    with model.autocast():
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16
    assert load_base_model("tiny", device="cpu").precision.name == "fp32"
    assert load_base_model("tiny", device="cpu", dtype="bfloat16").precision.name == "bf16"  # the older override
    with pytest.raises(InputError, match="disagree"):
        load_base_model("tiny", device="cpu", dtype="float32", precision="bf16")


# fp16 autocast exists on CPU in torch 2.x even though the policy does not offer it there: it lets the loss-scaling
# path run for real on this machine.
CPU_FP16 = Precision(name="fp16", device_type="cpu", compute="float16", frozen="float32", tf32=False,
                     grad_scaler=True)


def test_loss_scaling_keeps_fp16_gradients_that_would_underflow():
    torch.manual_seed(0)
    layer = torch.nn.Linear(16, 16)
    x = torch.randn(4, 16)

    def grad(scaler):
        layer.zero_grad()
        with torch.autocast("cpu", dtype=torch.float16):
            # A float32 loss, as in finetune; d loss / d weight ~ 1e-9, below float16's smallest subnormal (6e-8).
            loss = 1e-9 * layer(x).float().sum()
        scaler.scale(loss).backward()
        scaler.unscale_(torch.optim.SGD(layer.parameters(), lr=0.0))
        return layer.weight.grad.clone()

    exact = 1e-9 * x.sum(0).expand(16, -1)
    assert torch.count_nonzero(grad(torch.amp.GradScaler("cpu", enabled=False))) == 0
    scaled = grad(torch.amp.GradScaler("cpu"))
    assert torch.allclose(scaled, exact, rtol=1e-2, atol=0)  # x itself is rounded to float16


def test_fp16_finetune_runs_with_loss_scaling(tiny_model, photo, monkeypatch):
    made = []
    real = torch.amp.GradScaler

    class Spy(real):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            made.append(self.is_enabled())

    monkeypatch.setattr(torch.amp, "GradScaler", Spy)
    model = dataclasses.replace(tiny_model, precision=CPU_FP16)
    t = finetune(model, photo, "a bird", FinetuneConfig(steps=3, min_steps=3), width=64, height=64)
    assert made == [True]
    assert t.finetune["precision"] == "fp16" and len(t.losses) == 3
    assert any(d.abs().max() > 0 for d in t.deltas.values())
    plain = finetune(tiny_model, photo, "a bird", FinetuneConfig(steps=3, min_steps=3), width=64, height=64)
    assert made == [True, False] and plain.key != t.key


def test_fp16_nan_loss_still_names_the_step(tiny_model, photo):
    calls = {"n": 0}

    def poison(module, args, output):
        calls["n"] += 1
        if calls["n"] == 2:
            output.sample.fill_(float("nan"))
        return output

    model = dataclasses.replace(tiny_model, precision=CPU_FP16)
    handle = model.unet.register_forward_hook(poison)
    try:
        with pytest.raises(FinetuneError, match="at step 2"):
            finetune(model, photo, "a bird", FinetuneConfig(steps=4, min_steps=4), width=64, height=64)
    finally:
        handle.remove()


def test_a_tuning_at_another_precision_is_not_reused_and_the_log_says_why(tmp_path, photo_bytes):
    from test_cli import _board, fastimagic

    first = fastimagic("run", str(_board(tmp_path, photo_bytes, precision="fp32")), "-q")
    assert first.returncode == 0, first.stderr[-2000:]
    second = fastimagic("run", str(_board(tmp_path, photo_bytes, precision="bf16")), "-v")
    assert second.returncode == 0, second.stderr[-2000:]
    assert "(reused stored tuning)" not in second.stdout
    assert "made at precision fp32 is stored" in second.stderr
    assert "precision bf16 is a different content key, so this fine-tunes afresh" in second.stderr
    assert len(list((tmp_path / "out" / "tunings").iterdir())) == 2
