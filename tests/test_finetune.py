import hashlib

import pytest
import torch

from fastimagic.config import BLOCK_PRESETS
from fastimagic.errors import FinetuneError, InputError
from fastimagic.finetuning import FinetuneConfig, finetune, trained_parameter_names


def test_finetune_lowers_the_loss_on_a_real_photo(tuning):
    losses = tuning.losses
    assert 1 <= len(losses) <= 40
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < first * 0.95, losses


def test_finetune_trains_only_the_reference_blocks_and_the_embedding(tiny_model, tuning):
    expected = trained_parameter_names(tiny_model.unet, BLOCK_PRESETS["reference"])
    assert sorted(tuning.deltas) == sorted(expected)
    assert not any(n.startswith(("mid_block.", "down_blocks.0.", "up_blocks.0.")) for n in tuning.deltas)
    assert all(t.dtype == torch.float16 for t in tuning.deltas.values())
    assert any(t.abs().max() > 0 for t in tuning.deltas.values())
    source = tiny_model.encode_prompts(["a photo of a bird"])
    assert not torch.equal(tuning.source_embedding, source)  # e_src was optimised too
    assert tuning.source_embedding.shape == source.shape


def test_finetune_leaves_the_base_model_untouched(tiny_model, photo):
    before = {n: p.detach().clone() for n, p in tiny_model.unet.named_parameters()}
    finetune(tiny_model, photo, "a bird", FinetuneConfig(steps=2, min_steps=1), width=64, height=64)
    assert all(torch.equal(p, before[n]) for n, p in tiny_model.unet.named_parameters())
    assert not any(p.requires_grad for p in tiny_model.unet.parameters())


def test_finetune_repeats_exactly_with_a_fixed_seed(tiny_model, photo):
    cfg = FinetuneConfig(steps=3, min_steps=3, seed=7)
    a = finetune(tiny_model, photo, "a bird", cfg, width=64, height=64, image_sha256="abc")
    b = finetune(tiny_model, photo, "a bird", cfg, width=64, height=64, image_sha256="abc")
    assert a.losses == b.losses
    assert a.key == b.key
    assert torch.equal(a.source_embedding, b.source_embedding)
    assert all(torch.equal(a.deltas[n], b.deltas[n]) for n in a.deltas)
    c = finetune(tiny_model, photo, "a bird", FinetuneConfig(steps=3, min_steps=3, seed=8), width=64, height=64)
    assert c.losses != a.losses


def test_early_stop_after_min_steps_once_the_loss_is_below_the_threshold(tiny_model, photo):
    seen = []
    t = finetune(tiny_model, photo, "a bird", FinetuneConfig(steps=10, min_steps=2, loss_threshold=100.0),
                 width=64, height=64, callback=lambda step, steps, loss: seen.append((step, steps, loss)))
    assert len(t.losses) == 3
    # Losses before min_steps are read back a step late (no wait on the GPU), yet every step is reported, in order.
    assert seen == [(i, 10, loss) for i, loss in enumerate(t.losses, 1)]


def test_default_preset_is_the_released_codes_and_paper_stays_a_preset(tiny_model, photo):
    assert FinetuneConfig().blocks() == BLOCK_PRESETS["reference"]
    assert BLOCK_PRESETS["reference"] == tuple(f"{side}_blocks.{i}" for side in ("down", "up") for i in (1, 2, 3))
    t = finetune(tiny_model, photo, "a bird", FinetuneConfig(steps=1, trained_blocks="paper"), width=64, height=64)
    blocks = {".".join(n.split(".")[:2]) for n in t.deltas}
    assert blocks == {"down_blocks.0", "down_blocks.1", "down_blocks.2", "up_blocks.1", "up_blocks.2", "up_blocks.3"}


def test_unknown_block_names_are_refused(tiny_model, photo):
    with pytest.raises(InputError, match="'down_blocks.9': Stable Diffusion 1.x has down_blocks.0 to down_blocks.3"):
        finetune(tiny_model, photo, "a", FinetuneConfig(steps=1, trained_blocks=("down_blocks.9",)), width=64,
                 height=64)
    with pytest.raises(InputError, match="unknown preset 'papr'"):
        finetune(tiny_model, photo, "a", FinetuneConfig(steps=1, trained_blocks="papr"), width=64, height=64)


def test_nan_loss_stops_and_names_the_step(tiny_model, photo):
    calls = {"n": 0}

    def poison(module, args, output):
        calls["n"] += 1
        if calls["n"] == 3:
            output.sample.fill_(float("nan"))
        return output

    handle = tiny_model.unet.register_forward_hook(poison)
    before = {n: p.detach().clone() for n, p in tiny_model.unet.named_parameters()}
    try:
        with pytest.raises(FinetuneError, match="at step 3"):
            finetune(tiny_model, photo, "a bird", FinetuneConfig(steps=5, min_steps=5), width=64, height=64)
    finally:
        handle.remove()
    assert all(torch.equal(p, before[n]) for n, p in tiny_model.unet.named_parameters())


def test_content_key_depends_on_every_input(tiny_model, photo):
    cfg = FinetuneConfig(steps=1)
    base = dict(width=64, height=64, image_sha256=hashlib.sha256(b"x").hexdigest())
    k = finetune(tiny_model, photo, "a bird", cfg, **base).key
    assert finetune(tiny_model, photo, "a bird", cfg, **base).key == k
    assert finetune(tiny_model, photo, "a cat", cfg, **base).key != k
    assert finetune(tiny_model, photo, "a bird", FinetuneConfig(steps=1, seed=1), **base).key != k
    assert finetune(tiny_model, photo, "a bird", cfg, **(base | {"image_sha256": "y"})).key != k
    assert finetune(tiny_model, photo, "a bird", cfg, **(base | {"width": 72})).key != k
    assert finetune(tiny_model, photo, "a bird", cfg, **base, fit="pad").key != k


def test_content_key_is_computable_before_loading_the_model(tiny_model, photo):
    cfg = FinetuneConfig(steps=1)
    t = finetune(tiny_model, photo, "a bird", cfg, width=64, height=64)
    assert t.finetune == cfg.as_dict("cpu")  # what tasks hash before fine-tuning
    assert t.finetune["precision"] == "fp32" and t.finetune["fit"] == "crop"
    assert FinetuneConfig().as_dict("cuda")["precision"] == "fp16"
    assert finetune(tiny_model, photo, "a bird", cfg, width=64, height=64, fit="resize").finetune == (
        FinetuneConfig(steps=1, fit="resize").as_dict("cpu")
    )


def test_precision_contradicting_the_model_is_refused(tiny_model, photo):
    with pytest.raises(InputError, match="model was loaded in fp32"):
        finetune(tiny_model, photo, "a bird", FinetuneConfig(steps=1, precision="bf16"), width=64, height=64)
    with pytest.raises(InputError, match="fit: unknown mode 'squash'"):
        finetune(tiny_model, photo, "a bird", FinetuneConfig(steps=1), width=64, height=64, fit="squash")


def test_early_stop_matches_the_released_rule():
    # Released: loss < 0.03 and i * 10 > 350, i counted from 0: the first possible stop is i = 36, after 36 updates.
    from forgedit_reference import released_should_stop

    cfg = FinetuneConfig()
    first_released = next(i for i in range(40) if released_should_stop(i, 0.0, cfg.batch_size))
    first_ours = next(step for step in range(1, 41) if step > cfg.min_steps)
    assert first_released == 36 and first_ours - 1 == first_released
