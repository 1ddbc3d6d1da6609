"""What the GPU's speed depends on, held on the CPU: no weight cast per UNet call while sampling, no host sync per
sampling step, and keyframes unchanged by each of these optimisations (docs/performance.md)."""

import dataclasses

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from fastimagic.editor import Editor
from fastimagic.forgetting import Forgetting
from fastimagic.models import load_base_model
from fastimagic.precision import Precision, float32_working, store_unet

# fp16 autocast runs on CPU in torch 2.x although the precision policy does not offer it there (see test_precision).
CPU_FP16 = Precision(name="fp16", device_type="cpu", compute="float16", frozen="float32", tf32=False,
                     grad_scaler=True)
EDITS = [{"mode": "subtract", "gamma": 1.0}, {"mode": "subtract", "gamma": 1.2}]
# Ops that hand a tensor's value to Python: on a GPU each one waits for every kernel queued before it.
READ_BACK = {"aten::_local_scalar_dense", "aten::item", "aten::is_nonzero", "aten::nonzero", "aten::equal"}


class Ops(TorchDispatchMode):
    """Counts what reaches the kernels: casts (``_to_copy``) of the given tensors, and read-backs to Python."""

    def __init__(self, weights=()):
        super().__init__()
        self.weights = {w.untyped_storage().data_ptr() for w in weights}
        self.weight_casts = 0
        self.read_backs = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._to_copy.default and args[0].untyped_storage().data_ptr() in self.weights:
            self.weight_casts += 1
        if func.name().split(".")[0] in READ_BACK:
            self.read_backs += 1
        return func(*args, **(kwargs or {}))


def _half_model(precision: str):
    if precision == "bf16":
        return load_base_model("tiny", device="cpu", precision="bf16")
    model = dataclasses.replace(load_base_model("tiny", device="cpu"), precision=CPU_FP16)
    store_unet(model.unet, CPU_FP16)
    return model


def _calls(unet) -> list:
    calls = []
    unet.register_forward_hook(lambda *_: calls.append(1))
    return calls


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_sampling_casts_no_frozen_or_tuned_weight_per_unet_call(tuning, precision):
    model = _half_model(precision)
    calls = _calls(model.unet)
    with Editor(model, tuning) as editor:
        editor.forget("decoderattn", sigma=0.5)  # a blend, too, is rounded once
        with Ops(model.unet.parameters()) as ops:
            editor.render("a bird flying", seeds=[0], edits=EDITS[:1], steps=3)
    assert len(calls) == 3 and ops.weight_casts == 0
    # The probe sees autocast's casts: float32 weights under the same autocast are cast on every call.
    full = load_base_model("tiny", device="cpu")
    x, t, context = torch.zeros(1, 4, 8, 8), torch.tensor(10), full.encode_prompts(["a bird"])
    with Ops(full.unet.parameters()) as ops, torch.no_grad(), model.autocast():
        full.unet(x, t, encoder_hidden_states=context)
    assert ops.weight_casts > 100


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_a_tuning_rounded_once_renders_what_float32_working_copies_rendered(tuning, precision):
    """The tuned tensors are base + delta added in float32 and rounded once to the stored dtype; before, they were
    float32 copies that autocast rounded on every call. Same rounding, so the same keyframes, blends included."""
    model = _half_model(precision)

    def frames(editor):
        out = []
        for forget, sigma in (("none", 0.0), ("encoderattn", 0.0), ("decoder", 0.3)):
            out += editor.render("a bird flying", seeds=[0, 1], edits=EDITS, forget=forget, sigma=sigma, steps=3)
        return [np.asarray(f.image) for f in out]

    with Editor(model, tuning) as editor:
        assert {p.dtype for p in dict(model.unet.named_parameters()).values()} == {model.precision.compute_dtype,
                                                                                    torch.float32}
        rounded_once = frames(editor)
    # The way it was: float32 working copies of the tuned tensors, learned values blended in place.
    params = dict(model.unet.named_parameters())
    originals = float32_working(params, tuning.deltas)
    with torch.no_grad():
        for n, delta in tuning.deltas.items():
            params[n].add_(delta.float())
    editor = Editor.__new__(Editor)
    editor.model, editor.tuning, editor._closed = model, tuning, False
    editor._source, editor._originals = tuning.source_embedding, {}
    editor.forgetting = Forgetting(model.unet, originals, model.family)
    working_copies = frames(editor)
    assert all(np.array_equal(a, b) for a, b in zip(rounded_once, working_copies))


def test_no_sampling_step_reads_a_value_back_from_the_device(tiny_model, tuning):
    """On a GPU a read-back (``.item()``, ``bool(tensor)``, ...) waits for the queue to drain; the step loop has
    none (diffusers' DDIM step is given a Python int timestep, whose tensor form made it read back twice)."""
    counts = {}
    with Editor(tiny_model, tuning) as editor:
        for steps in (2, 6):
            with Ops() as ops:
                editor.render("a bird flying", seeds=[0], edits=EDITS, steps=steps, max_batch=2)
            counts[steps] = ops.read_backs
    assert counts[6] == counts[2]  # four more steps, not one more read-back


def test_a_compiled_unet_meets_a_handful_of_shapes_in_a_five_scene_storyboard(tuning, monkeypatch):
    """Regional compilation with bucketed batches: five scenes of different sizes compile graphs for two batch
    sizes only, a sixth scene compiles nothing, and the keyframes are those of the uncompiled UNet. Dynamo traces
    for real; the counting backend runs the traced graphs as they are (inductor's speed needs a GPU to show)."""
    from torch._dynamo.testing import CompileCounter

    from fastimagic.models import COMPILED_BLOCKS, compile_unet
    from fastimagic.sampler import chunks

    torch._dynamo.reset()
    monkeypatch.setenv("FASTIMAGIC_COMPILE_CACHE", "")  # no cache folder is written by a counting backend
    counter = CompileCounter()
    compiled, plain = load_base_model("tiny", device="cpu"), load_base_model("tiny", device="cpu")
    compile_unet(compiled, "regional", backend=counter)
    assert compiled.compiled == "regional"
    # (seeds, gammas) per scene: 3, 6, 8, 4 and 5 keyframes, at most 8 per UNet batch
    scenes = [([0], 3), ([0, 1], 3), ([0, 1], 4), ([0, 1], 2), ([0], 5)]
    shapes = {padded for seeds, g in scenes for _, _, padded in chunks(len(seeds) * g, 8, bucketed=True)}
    assert shapes == {4, 8}

    def render(model, seeds, gammas, forget):
        with Editor(model, tuning) as editor:
            edits = [{"mode": "subtract", "gamma": 1.0 + 0.1 * i} for i in range(gammas)]
            return editor.render("a bird flying", seeds=seeds, edits=edits, forget=forget, steps=2, max_batch=8)

    diffs = []
    for i, (seeds, gammas) in enumerate(scenes):
        forget = ("none", "encoderattn", "decoderattn")[i % 3]
        frames = render(compiled, seeds, gammas, forget)
        expected = render(plain, seeds, gammas, forget)
        diffs += [int(np.abs(np.asarray(a.image, int) - np.asarray(b.image, int)).max()) for a, b in
                  zip(frames, expected)]
        assert all(f.settings()["compile"] == "regional" for f in frames)  # recorded in each manifest record
    graphs = counter.frame_count
    blocks = sum(type(m).__name__ in COMPILED_BLOCKS for m in compiled.unet.modules())
    assert 0 < graphs <= len(shapes) * blocks  # tiny: 30, one set of region graphs per batch size
    render(compiled, [3, 4], 3, "none")  # 6 keyframes: padded to 8, a shape already compiled
    assert counter.frame_count == graphs
    assert max(diffs) <= 1  # padding rows may change the float order of a batched kernel, nothing more
    assert "compile" not in expected[0].settings()


def test_an_sdxl_vae_override_decodes_in_float16_only_when_its_config_allows():
    """SDXL's own VAE overflows float16 (NaN keyframes) and says ``force_upcast: true``; the fp16-fix VAE says
    false. An override runs in float16 only in the second case; SD 1.x's VAE always does."""
    from fastimagic import tiny
    from fastimagic.families import TINY_FAMILIES
    from fastimagic.models import _assemble

    half = dataclasses.replace(CPU_FP16, frozen="float16")
    dtypes = {}
    for name, upcast in (("tiny-sdxl", True), ("tiny-sdxl", False), ("tiny", True)):
        parts = tiny.build_components(name=name) | {"family": TINY_FAMILIES[name]}
        parts["vae"].register_to_config(force_upcast=upcast)
        model = _assemble(parts, "tiny:test", torch.device("cpu"), half, fixed_vae=True)
        dtypes[name, upcast] = model.vae.dtype
    assert dtypes == {("tiny-sdxl", True): torch.float32, ("tiny-sdxl", False): torch.float16,
                      ("tiny", True): torch.float16}


def test_an_unknown_compile_setting_is_one_clear_line(monkeypatch):
    from fastimagic.errors import InputError
    from fastimagic.models import compile_setting

    monkeypatch.setenv("FASTIMAGIC_COMPILE", "fast")
    with pytest.raises(InputError, match=r"^FASTIMAGIC_COMPILE: unknown setting 'fast'; allowed: off, regional"):
        load_base_model("tiny", device="cpu")
    monkeypatch.setenv("FASTIMAGIC_COMPILE", "1")
    assert compile_setting() == "regional" and compile_setting("off") == "off"
