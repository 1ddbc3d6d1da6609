import numpy as np
import pytest
import torch

from fastimagic.editor import Editor
from fastimagic.errors import InputError
from fastimagic.store import LocalStore, open_store
from fastimagic.tuning import CorruptTuning, Tuning

GAMMAS = [{"mode": "subtract", "gamma": g} for g in (0.8, 1.1, 1.4)]


def _pixels(frames):
    return [np.asarray(f.image).astype(np.int16) for f in frames]


def _max_level_diff(a, b):
    return max(int(np.abs(x - y).max()) for x, y in zip(_pixels(a), _pixels(b)))


def test_a_keyframe_is_the_same_alone_or_in_a_batch(tiny_model, tuning):
    with Editor(tiny_model, tuning) as ed:
        batch = ed.render("a photo of a bird flying", seeds=[3, 4], edits=GAMMAS, steps=10, max_batch=6)
        alone = [
            ed.render("a photo of a bird flying", seeds=[f.seed], edits=[f.edit], steps=10, max_batch=1)[0]
            for f in batch
        ]
    assert [(f.seed, f.edit.gamma) for f in batch] == [(s, g["gamma"]) for s in (3, 4) for g in GAMMAS]
    assert _max_level_diff(batch, alone) <= 1


def _save(tuning: Tuning, folder) -> LocalStore:
    store = LocalStore(folder)
    for name, data in tuning.to_files().items():
        store.put_bytes(name, data)
    return store


def test_saved_and_loaded_tuning_renders_the_same_keyframes(tiny_model, tuning, tmp_path):
    loaded = Tuning.read(_save(tuning, tmp_path / "t").get_bytes)
    assert loaded.key == tuning.key and loaded.losses == tuning.losses
    assert loaded.metadata() == tuning.metadata()
    kw = dict(seeds=[0, 1], edits=GAMMAS, steps=8, forget="encoderattn")
    with Editor(tiny_model, tuning) as ed:
        a = ed.render("a photo of a bird singing", **kw)
    with Editor(tiny_model, loaded) as ed:
        b = ed.render("a photo of a bird singing", **kw)
    assert _max_level_diff(a, b) <= 1


def test_a_flipped_byte_in_a_stored_tuning_is_detected(tuning, tmp_path):
    store = _save(tuning, tmp_path / "t")
    (weights,) = (tmp_path / "t").glob("weights-*.safetensors")
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(CorruptTuning, match="does not match its recorded SHA-256"):
        Tuning.read(store.get_bytes)


def test_a_tuning_file_is_what_safetensors_writes_and_comes_back_whole_from_a_folder_and_from_s3(
    tuning, tmp_path, s3_env
):
    from safetensors.torch import save

    files = tuning.to_files()
    (name,) = (n for n in files if n.startswith("weights-"))
    tensors = {"source_embedding": tuning.source_embedding.float().contiguous()}
    tensors |= {f"delta.{n}": t.half().contiguous() for n, t in tuning.deltas.items()}
    assert bytes(files[name]) == save(tensors)  # the same bytes as before, so the same file name
    files[name].read(100)  # read part way (as an upload that failed would): a write still sends the whole file
    for store in (LocalStore(tmp_path / "t"), open_store(f"s3://{s3_env}/t")):
        for key, data in files.items():
            store.put_bytes(key, data)
        loaded = Tuning.read(store.get_bytes, where=store.uri)
        assert loaded.metadata() == tuning.metadata()
        assert torch.equal(loaded.source_embedding, tuning.source_embedding)
        assert all(torch.equal(loaded.deltas[n], t) for n, t in tuning.deltas.items())


def test_editor_restores_the_base_weights_bit_for_bit(tiny_model, tuning):
    before = {n: p.detach().clone() for n, p in tiny_model.unet.named_parameters()}
    with Editor(tiny_model, tuning) as ed:
        ed.forget("decoderattn")
        changed = sum(not torch.equal(p, before[n]) for n, p in tiny_model.unet.named_parameters())
        assert changed > 0
    assert all(torch.equal(p, before[n]) for n, p in tiny_model.unet.named_parameters())


def test_forgetting_changes_the_keyframes_and_every_frame_records_its_settings(tiny_model, tuning):
    with Editor(tiny_model, tuning) as ed:
        plain = ed.render("a bird", seeds=[0], edits=GAMMAS[:1], steps=6)
        forgot = ed.render("a bird", seeds=[0], edits=GAMMAS[:1], steps=6, forget="noencoder")
    assert forgot[0].forget == "encoder" and plain[0].forget == "none"
    assert _max_level_diff(plain, forgot) > 0
    s = forgot[0].settings()
    assert s["seed"] == 0 and s["edit"] == GAMMAS[0] and s["steps"] == 6 and s["guidance"] == 7.5


def test_projection_edits_and_non_square_sizes(tiny_model, tuning):
    edits = [{"mode": "project", "alpha": a, "beta": b} for a in (0.8, 1.1) for b in (1.0, 1.5)]
    with Editor(tiny_model, tuning) as ed:
        frames = ed.render("a bird", seeds=[0], edits=edits, steps=4, width=96, height=64)
    assert [f.image.size for f in frames] == [(96, 64)] * 4
    assert len({f.image.tobytes() for f in frames}) == 4


def test_negative_prompt_replaces_the_empty_unconditional_prompt(tiny_model, tuning):
    with Editor(tiny_model, tuning) as ed:
        a = ed.render("a bird", seeds=[0], edits=GAMMAS[:1], steps=5)
        b = ed.render("a bird", seeds=[0], edits=GAMMAS[:1], steps=5, negative_prompt="blurry, dark")
    assert b[0].negative_prompt == "blurry, dark"
    assert _max_level_diff(a, b) > 0


@pytest.mark.parametrize("w,h", [(60, 64), (64, 0), (63, 63)])
def test_sizes_that_are_not_multiples_of_8_are_refused(tiny_model, tuning, w, h):
    with Editor(tiny_model, tuning) as ed, pytest.raises(InputError, match="multiple of 8"):
        ed.render("a bird", seeds=[0], edits=GAMMAS[:1], steps=2, width=w, height=h)


def test_unknown_strategy_and_non_finite_gamma_are_refused_before_sampling(tiny_model, tuning):
    with Editor(tiny_model, tuning) as ed:
        with pytest.raises(InputError, match="valid: none, encoder"):
            ed.render("a bird", seeds=[0], edits=GAMMAS[:1], forget="encoderatn")
        with pytest.raises(InputError, match="gamma must be a finite number"):
            ed.render("a bird", seeds=[0], edits=[{"mode": "subtract", "gamma": float("nan")}])


def test_a_tuning_from_another_model_is_refused(tiny_model, tuning):
    other = Tuning(**{**tuning.__dict__, "model_identity": "hf:someone/else"})
    with pytest.raises(InputError, match="fine-tuned on 'hf:someone/else'"):
        Editor(tiny_model, other)


def test_long_prompts_warn_and_show_the_part_that_was_cut(tiny_model, tuning, caplog):
    prompt = "a photo of " + " ".join(f"zq{i}" for i in range(60))
    with Editor(tiny_model, tuning) as ed, caplog.at_level("WARNING", logger="fastimagic"):
        ed.render(prompt, seeds=[0], edits=GAMMAS[:1], steps=1)
    assert "77 tokens" in caplog.text and "zq59" in caplog.text


def test_a_kept_tuning_is_applied_once_and_released_bit_for_bit(tiny_model, tuning):
    """A worker keeps the tuning applied between renders (fastimagic.editor.applied); release puts the base weights
    back exactly, and so does opening another Editor on the model (one tuning at a time)."""
    from fastimagic.editor import applied, release

    before = {n: p.detach().clone() for n, p in tiny_model.unet.named_parameters()}
    with tiny_model.lock:
        kept = applied(tiny_model, tuning)
        a = kept.render("a bird", seeds=[0], edits=GAMMAS[:1], steps=3, forget="encoderattn")
        assert applied(tiny_model, tuning) is kept and tiny_model.applied is kept
        b = applied(tiny_model, tuning).render("a bird", seeds=[0], edits=GAMMAS[:1], steps=3, forget="encoderattn")
        assert a[0].image.tobytes() == b[0].image.tobytes()
        release(tiny_model)
        assert tiny_model.applied is None
        assert all(torch.equal(p, before[n]) for n, p in tiny_model.unet.named_parameters())
        kept = applied(tiny_model, tuning)
        with Editor(tiny_model, tuning) as fresh:  # closes the kept one first: the tuning is not added twice
            assert kept._closed and tiny_model.applied is None
            c = fresh.render("a bird", seeds=[0], edits=GAMMAS[:1], steps=3, forget="encoderattn")
        assert c[0].image.tobytes() == a[0].image.tobytes()
    assert all(torch.equal(p, before[n]) for n, p in tiny_model.unet.named_parameters())
