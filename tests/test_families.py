"""SDXL and SD 2.x: the whole method on ``tiny-sdxl`` and ``tiny-sd2``, and what stays the same for SD 1.x."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fastimagic.editor import Editor
from fastimagic.errors import InputError
from fastimagic.families import SD1, SD2, SDXL, TINY_FAMILIES
from fastimagic.finetuning import FinetuneConfig, finetune, finetune_time_ids, trained_parameter_names
from fastimagic.forgetting import STRATEGIES, Forgetting, describe
from fastimagic.merge import Project, Subtract, merge
from fastimagic.models import load_base_model, unet_shapes
from fastimagic.tuning import Tuning

FAMILY_MODELS = ["tiny-sdxl", "tiny-sd2"]
QUICK = FinetuneConfig(steps=12, min_steps=12, seed=3)


@pytest.fixture(scope="module", params=FAMILY_MODELS)
def family_model(request):
    return load_base_model(request.param, device="cpu")


@pytest.fixture(scope="module")
def family_tuning(family_model, photo):
    return finetune(family_model, photo, "a photo of a bird", QUICK, width=64, height=64, image_sha256="ref")


def test_tiny_models_have_their_familys_shape():
    xl = load_base_model("tiny-sdxl", device="cpu")
    assert xl.family is SDXL and xl.text_encoder_2 is not None and xl.tokenizer_2.pad_token == "!"
    assert xl.unet.config.addition_embed_type == "text_time" and len(xl.unet.down_blocks) == 3
    e = xl.encode_prompts(["a dog", ""])
    width = xl.text_encoder.config.hidden_size + xl.text_encoder_2.config.hidden_size
    assert e.shape == (2, 78, width) == (2, 78, xl.unet.config.cross_attention_dim)
    assert torch.equal(e[1], torch.zeros_like(e[1]))  # SDXL base: zeros for the empty prompt
    assert torch.equal(e[0, -1, xl.pooled_dim :], torch.zeros(width - xl.pooled_dim))  # the pooled row's padding
    sd2 = load_base_model("tiny-sd2", device="cpu")
    assert sd2.family is SD2 and sd2.prediction_type == "v_prediction" and sd2.unet.config.use_linear_projection
    assert sd2.encode_prompts(["a dog"]).shape == (1, 77, sd2.unet.config.cross_attention_dim)
    assert load_base_model("tiny", device="cpu").family is SD1
    assert set(TINY_FAMILIES) == {"tiny", "tiny-sd2", "tiny-sdxl"}


def test_sdxl_pooled_vector_and_time_ids_reach_the_unet(photo):
    xl = load_base_model("tiny-sdxl", device="cpu")
    e = xl.encode_prompts(["a dog"])
    kw = xl.unet_inputs(e, SDXL.time_ids((64, 64), (0, 0), (64, 64)))
    assert kw["encoder_hidden_states"].shape[1] == 77
    assert kw["added_cond_kwargs"]["text_embeds"].shape == (1, xl.pooled_dim)
    x, t = torch.randn(1, 4, 8, 8), torch.tensor([500])
    base = xl.unet(x, t, **kw).sample
    moved = SDXL.time_ids((32, 64), (0, 8), (64, 64))
    other = dict(kw, added_cond_kwargs=dict(kw["added_cond_kwargs"], time_ids=moved))
    assert not torch.equal(base, xl.unet(x, t, **other).sample)  # size conditioning matters
    # the fine-tune conditions on the reference: its original size, the crop's corner, the target size
    ids = finetune_time_ids((320, 240), 64, 64, "crop")
    assert ids.tolist() == [[240, 320, 0, 11, 64, 64]]
    assert finetune_time_ids((320, 240), 64, 64, "pad").tolist() == [[240, 320, 0, 0, 64, 64]]


def test_finetune_lowers_the_loss_and_repeats_exactly(family_model, family_tuning, photo):
    losses = family_tuning.losses
    assert sum(losses[-4:]) / 4 < sum(losses[:4]) / 4, losses
    again = finetune(family_model, photo, "a photo of a bird", QUICK, width=64, height=64, image_sha256="ref")
    assert again.losses == losses and again.key == family_tuning.key
    assert torch.equal(again.source_embedding, family_tuning.source_embedding)
    assert all(torch.equal(again.deltas[n], family_tuning.deltas[n]) for n in again.deltas)
    assert family_tuning.family == family_model.family.name
    blocks = {".".join(n.split(".")[:2]) for n in family_tuning.deltas}
    assert blocks == set(family_model.family.presets["reference"])


def test_sdxl_source_embedding_includes_the_pooled_vector_optimised_jointly(photo):
    xl = load_base_model("tiny-sdxl", device="cpu")
    t = finetune(xl, photo, "a photo of a bird", FinetuneConfig(steps=3, min_steps=3), width=64, height=64)
    before = xl.encode_prompts(["a photo of a bird"])
    tokens, pooled = SDXL.split(t.source_embedding, xl.pooled_dim)
    tokens0, pooled0 = SDXL.split(before, xl.pooled_dim)
    assert not torch.equal(tokens, tokens0) and not torch.equal(pooled, pooled0)  # both learned
    assert torch.equal(t.source_embedding[0, -1, xl.pooled_dim :], before[0, -1, xl.pooled_dim :])  # padding: 0


def test_gradient_checkpointing_changes_nothing_but_memory(photo):
    xl = load_base_model("tiny-sdxl", device="cpu")
    cfg = FinetuneConfig(steps=2, min_steps=2)
    a = finetune(xl, photo, "a bird", cfg, width=64, height=64)
    b = finetune(xl, photo, "a bird", FinetuneConfig(steps=2, min_steps=2, gradient_checkpointing=True), width=64,
                 height=64)
    assert a.losses == b.losses
    assert all(torch.allclose(a.deltas[n].float(), b.deltas[n].float(), atol=1e-6) for n in a.deltas)


def test_sd2_velocity_target(monkeypatch, photo):
    """The loss is against the scheduler's velocity for a v-prediction model, against the noise otherwise."""
    import fastimagic.finetuning as ft

    seen = []
    real = ft.F.mse_loss
    monkeypatch.setattr(ft.F, "mse_loss", lambda pred, target: seen.append(target) or real(pred, target))
    sd2 = load_base_model("tiny-sd2", device="cpu")
    calls = []
    real_velocity = sd2.scheduler.get_velocity
    monkeypatch.setattr(sd2.scheduler, "get_velocity", lambda *a: calls.append(a) or real_velocity(*a))
    finetune(sd2, photo, "a bird", FinetuneConfig(steps=1, min_steps=1), width=64, height=64)
    assert len(calls) == 1 and len(seen) == 1
    latents, noise, timesteps = calls[0]
    alpha = sd2.scheduler.alphas_cumprod[timesteps].sqrt().view(-1, 1, 1, 1)
    sigma = (1 - sd2.scheduler.alphas_cumprod[timesteps]).sqrt().view(-1, 1, 1, 1)
    assert torch.allclose(seen[0], alpha * noise - sigma * latents, atol=1e-6)
    xl = load_base_model("tiny-sdxl", device="cpu")
    monkeypatch.setattr(xl.scheduler, "get_velocity", lambda *a: pytest.fail("epsilon model asked for velocity"))
    finetune(xl, photo, "a bird", FinetuneConfig(steps=1, min_steps=1), width=64, height=64)


def test_merges_apply_to_the_pooled_vector_with_the_same_coefficients(family_model, family_tuning):
    src = family_tuning.source_embedding
    tgt = family_model.encode_prompts(["two dogs dancing on the beach"])
    tokens_s, pooled_s = family_model.family.split(src, family_model.pooled_dim)
    tokens_t, pooled_t = family_model.family.split(tgt, family_model.pooled_dim)
    for gamma, expect in ((0.0, src), (1.0, tgt)):
        assert torch.allclose(merge(src, tgt, Subtract(gamma)), expect, atol=1e-6)
    m = merge(src, tgt, Subtract(1.3))
    tokens_m, pooled_m = family_model.family.split(m, family_model.pooled_dim)
    assert torch.allclose(tokens_m, tokens_s + 1.3 * (tokens_t - tokens_s), atol=1e-6)
    if family_model.family.pooled:
        assert torch.allclose(pooled_m, pooled_s + 1.3 * (pooled_t - pooled_s), atol=1e-6)
        p = merge(src, tgt, Project(0.8, 1.2))
        _, pooled_p = family_model.family.split(p, family_model.pooled_dim)
        r = (pooled_s * pooled_t).sum(-1, keepdim=True) / (pooled_s * pooled_s).sum(-1, keepdim=True)
        assert torch.allclose(pooled_p, 0.8 * pooled_s + 1.2 * (pooled_t - r * pooled_s), atol=1e-5)
        assert torch.count_nonzero(p[0, -1, family_model.pooled_dim :]) == 0  # padding stays zero


@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_each_strategy_changes_exactly_its_tensors_and_undo_is_exact(family_model, strategy):
    family = family_model.family
    enc1, dec2 = family.down_block(1) + ".", family.up_block(2) + "."

    def attn(n):
        return ".attn1." in n or ".attn2." in n

    def kv(n):
        return ".attn2.to_k." in n or ".attn2.to_v." in n

    expected_rule = {
        "none": lambda n: False,
        "encoder": lambda n: n.startswith("down_blocks."),
        "decoder": lambda n: n.startswith("up_blocks."),
        "encoderattn": lambda n: n.startswith("down_blocks.") and not attn(n),
        "decoderattn": lambda n: n.startswith("up_blocks.") and not attn(n),
        "encoderkv": lambda n: n.startswith("down_blocks.") and not kv(n),
        "decoderkv": lambda n: n.startswith("up_blocks.") and not kv(n),
        "encoderattn+encoder1": lambda n: n.startswith("down_blocks.") and not (attn(n) or n.startswith(enc1)),
        "decoderattn+decoder2": lambda n: n.startswith("up_blocks.") and not (attn(n) or n.startswith(dec2)),
    }[strategy]
    unet = family_model.unet
    names = trained_parameter_names(unet, tuple(dict.fromkeys(family.presets["reference"] + family.presets["paper"])))
    params = dict(unet.named_parameters())
    originals = {n: params[n].detach().clone() for n in names}
    g = torch.Generator().manual_seed(1)
    try:
        with torch.no_grad():
            for n in names:
                params[n].add_(torch.randn(params[n].shape, generator=g) * 0.01)
        learned = {n: p.detach().clone() for n, p in unet.named_parameters()}
        f = Forgetting(unet, originals, family)
        report = f.apply(strategy)
        expected = {n for n in originals if expected_rule(n)}
        assert set(report.tensors) == expected
        for n, p in unet.named_parameters():
            assert torch.equal(p, originals[n] if n in expected else learned[n]), n
        f.restore()
        assert all(torch.equal(p, learned[n]) for n, p in unet.named_parameters())
    finally:
        with torch.no_grad():
            for n in names:
                params[n].copy_(originals[n])


def test_encoder1_and_decoder2_name_the_640_channel_level_on_every_family():
    assert (SD1.down_block(1), SD1.up_block(2)) == ("down_blocks.1", "up_blocks.2")
    assert (SD2.down_block(1), SD2.up_block(2)) == ("down_blocks.1", "up_blocks.2")
    assert (SDXL.down_block(1), SDXL.up_block(2)) == ("down_blocks.1", "up_blocks.1")
    shapes = unet_shapes("sdxl")
    for block in (SDXL.down_block(1), SDXL.up_block(2)):
        widths = {s[0] for n, s in shapes.items() if n.startswith(block + ".") and n.endswith("attn2.to_q.weight")}
        assert widths == {640}, block
    report = describe("decoderattn+decoder2", {n: s for n, s in shapes.items() if n.startswith("up_blocks.")}, SDXL)
    assert "up_blocks.1" in report.description
    assert not any(n.startswith("up_blocks.1.") for n in report.tensors)


def test_sdxl_presets_keep_the_deepest_blocks_frozen():
    assert SDXL.presets["paper"] == ("down_blocks.0", "down_blocks.1", "up_blocks.1", "up_blocks.2")
    assert SDXL.presets["reference"] == ("down_blocks.1", "down_blocks.2", "up_blocks.1", "up_blocks.2")
    shapes = unet_shapes("sdxl")
    assert sum(math.prod(s) for s in shapes.values()) == 2_567_463_684

    def count(blocks):
        return sum(math.prod(s) for n, s in shapes.items() if n.startswith(tuple(b + "." for b in blocks)))

    assert count(SDXL.presets["reference"]) == 935_025_280  # docs/models.md
    assert count(SDXL.presets["paper"]) == 183_053_120


def test_a_keyframe_is_the_same_alone_or_batched(family_model, family_tuning):
    with Editor(family_model, family_tuning) as editor:
        batch = editor.render("a dog", seeds=[3, 4], edits=[Subtract(0.9), Subtract(1.1)], steps=3, max_batch=4)
        alone = editor.render("a dog", seeds=[4], edits=[Subtract(1.1)], steps=3, max_batch=1)
    # as for SD 1.x: batched float arithmetic may round one 8-bit level differently
    diff = np.abs(np.asarray(alone[0].image, dtype=int) - np.asarray(batch[3].image, dtype=int)).max()
    assert diff <= 1


def test_saved_and_loaded_tuning_renders_the_same(family_model, family_tuning):
    files = family_tuning.to_files()
    loaded = Tuning.read(files.__getitem__)
    assert loaded.family == family_model.family.name
    assert torch.equal(loaded.source_embedding, family_tuning.source_embedding)
    with Editor(family_model, family_tuning) as e:
        a = e.render("a dog", seeds=[1], edits=[Subtract(1.0)], forget="decoderkv", steps=2)
    with Editor(family_model, loaded) as e:
        b = e.render("a dog", seeds=[1], edits=[Subtract(1.0)], forget="decoderkv", steps=2)
    assert list(a[0].image.getdata()) == list(b[0].image.getdata())


def test_a_tuning_from_another_family_is_refused(family_model, family_tuning, tiny_model, tuning):
    with pytest.raises(InputError, match="was made on a Stable Diffusion 1.x model"):
        Editor(family_model, tuning)
    with pytest.raises(InputError, match=f"was made on a {family_model.family.label} model") as e:
        Editor(tiny_model, family_tuning)
    assert "\n" not in str(e.value)


def test_a_trained_block_the_model_does_not_have_is_refused(photo):
    xl = load_base_model("tiny-sdxl", device="cpu")
    with pytest.raises(InputError, match=r"'down_blocks.3': SDXL has down_blocks.0 to down_blocks.2"):
        finetune(xl, photo, "a bird", FinetuneConfig(steps=1, trained_blocks=("down_blocks.3",)), width=64, height=64)


@pytest.mark.parametrize("name", FAMILY_MODELS)
def test_diffusers_folder_and_original_single_file_load_offline(name, tmp_path):
    """Each tiny model written as a diffusers folder and as one checkpoint in the original layout (SDXL: both
    ``conditioner.embedders``; SD 2.x: OpenCLIP under ``cond_stage_model.model``) loads back to the same model,
    its family read from the folder's UNet config or the file's header."""
    from ldm_export import export_single_file, save_diffusers_folder

    from fastimagic import tiny
    from fastimagic.models import describe_checkpoint, model_family

    parts = tiny.build_components(name=name) | {"family": TINY_FAMILIES[name]}
    folder = save_diffusers_folder(parts, tmp_path / "folder")
    ckpt = export_single_file(parts, tmp_path / "model.safetensors", dtype=torch.float16)
    family = TINY_FAMILIES[name]
    assert describe_checkpoint(ckpt)["family"] == family.name
    assert model_family(str(ckpt)) is family and model_family(str(folder)) is family
    base = load_base_model(name, device="cpu")
    want = dict(base.unet.named_parameters())
    prompts = ["a dog on the beach", ""]
    for spec, kw in ((str(folder), {}), (str(ckpt), {"config": str(folder)})):
        m = load_base_model(spec, device="cpu", **kw)
        assert m.family is family and m.prediction_type == base.prediction_type
        exact = spec == str(folder)  # the checkpoint was written in float16
        for n, p in m.unet.named_parameters():
            assert torch.equal(p, want[n]) if exact else torch.equal(p, want[n].half().float()), n
        e = m.encode_prompts(prompts)
        assert e.shape == base.encode_prompts(prompts).shape
        if exact:
            assert torch.equal(e, base.encode_prompts(prompts))
