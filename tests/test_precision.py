"""Precision policy: names, per-device choices, one-line refusals, half-stored UNet weights that compute as autocast
would and learn in float32, fp16 loss scaling."""

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


def _stored(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.unet.named_parameters()}


def _kind(name: str, model) -> str:
    module = model.unet.get_submodule(name.rsplit(".", 1)[0])
    return "matmul" if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)) else "other"


def test_the_loaded_model_records_its_precision_and_stores_convolutions_and_linears_in_it():
    model = load_base_model("tiny", device="cpu", precision="bf16")
    assert model.precision.name == "bf16" and model.dtype == torch.bfloat16
    assert next(model.text_encoder.parameters()).dtype == torch.bfloat16
    dtypes = {(_kind(n, model), p.dtype) for n, p in model.unet.named_parameters()}
    assert dtypes == {("matmul", torch.bfloat16), ("other", torch.float32)}  # norms stay float32
    with model.autocast():
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16
    fp32 = load_base_model("tiny", device="cpu")
    assert fp32.precision.name == "fp32" and all(p.dtype == torch.float32 for p in fp32.unet.parameters())
    assert load_base_model("tiny", device="cpu", dtype="bfloat16").precision.name == "bf16"  # the older override
    with pytest.raises(InputError, match="disagree"):
        load_base_model("tiny", device="cpu", dtype="float32", precision="bf16")


@pytest.mark.parametrize("name", ["tiny", "tiny-sd2", "tiny-sdxl"])
def test_half_stored_weights_compute_bit_for_bit_what_autocast_makes_of_float32_ones(name):
    half = load_base_model(name, device="cpu", precision="bf16")
    full = load_base_model(name, device="cpu", precision="fp32")
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10, 500])
    embeddings = full.encode_prompts(["a photo of a cat", ""])
    ids = torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]]) if full.family.pooled else None
    with half.autocast():
        stored = half.unet(x, t, **half.unet_inputs(embeddings, ids)).sample
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cast_on_the_fly = full.unet(x, t, **full.unet_inputs(embeddings, ids)).sample
    assert torch.equal(stored, cast_on_the_fly)


def test_half_stored_tensors_learn_in_float32_and_come_back_bit_for_bit(photo):
    from fastimagic.editor import Editor

    model = load_base_model("tiny-sdxl", device="cpu", precision="bf16")
    before = _stored(model)
    tuning = finetune(model, photo, "a bird", FinetuneConfig(steps=3, min_steps=3), width=64, height=64)
    after = _stored(model)
    assert all(torch.equal(before[n], after[n]) and before[n].dtype == after[n].dtype for n in before)
    # Trained in float32, the changes are there; added to the bfloat16 weights, about half would round to nothing.
    changed = sum(int((d != 0).sum()) for d in tuning.deltas.values())
    assert changed > 0.9 * tuning.trained_parameters
    lost = sum(
        int((((before[n].float() + d.float()).to(before[n].dtype) == before[n]) & (d != 0)).sum())
        for n, d in tuning.deltas.items()
        if before[n].dtype == torch.bfloat16
    )
    assert lost > 0.25 * changed

    params = dict(model.unet.named_parameters())
    with Editor(model, tuning) as editor:
        for n, delta in tuning.deltas.items():
            # base + change added in float32, rounded once to the dtype the UNet computes the weight in
            assert params[n].dtype == before[n].dtype
            assert torch.equal(params[n], (before[n].float() + delta.float()).to(before[n].dtype))
        editor.forget("encoder")
        editor.render("a bird flying", seeds=[0], edits=[{"mode": "subtract", "gamma": 1.0}], steps=2)
    after = _stored(model)
    assert all(torch.equal(before[n], after[n]) and before[n].dtype == after[n].dtype for n in before)


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
