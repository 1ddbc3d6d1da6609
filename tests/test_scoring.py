"""Keyframe scores: CLIP text alignment and fidelity to the reference, on a tiny random CLIP (nothing downloaded)."""

from __future__ import annotations

import dataclasses
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from fastimagic.errors import InputError
from fastimagic.picking import similarity_key
from fastimagic.scoring import DEFAULT_SCORER, Scorer, _embeddings, load_lpips, load_scorer


def _noise(seed: int, size=(64, 48)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def _landscape() -> Image.Image:
    img = Image.new("RGB", (224, 224), (110, 160, 230))
    d = ImageDraw.Draw(img)
    d.ellipse((140, 20, 190, 70), fill=(250, 220, 60))
    d.polygon([(0, 224), (90, 110), (224, 224)], fill=(60, 140, 70))
    return img


@pytest.fixture(scope="module")
def scorer() -> Scorer:
    return load_scorer("tiny", device="cpu", fidelity="clip_image")


@pytest.fixture(scope="module")
def images() -> list[Image.Image]:
    # Different sizes on purpose: the processor resizes and crops each one.
    return [_noise(i, (64 + 8 * i, 48)) for i in range(5)] + [_landscape()]


def test_scores_are_finite_and_in_range(scorer, images):
    scores = scorer.score(images, "a photo of a dog jumping", images[0])
    assert len(scores) == len(images)
    for s in scores:
        assert set(s) == {"clip", "fidelity", "fidelity_metric"}
        assert s["fidelity_metric"] == "clip_image"
        assert math.isfinite(s["clip"]) and 0.0 <= s["clip"] <= 100.0
        assert math.isfinite(s["fidelity"]) and -1.0 <= s["fidelity"] <= 1.0 + 1e-6
    # The tiny CLIP's seed gives positive cosines, so the scores differ instead of all being clamped to 0.
    assert len({round(s["clip"], 4) for s in scores}) > 1


def test_clip_score_is_100_times_the_clamped_cosine(scorer, images):
    cos = scorer.image_embeddings(images) @ scorer.text_embedding("a red car")
    expected = [100 * max(float(c), 0.0) for c in cos]
    assert scorer.text_alignment(images, "a red car") == pytest.approx(expected, abs=1e-6)


def test_batched_scores_equal_one_by_one(scorer, images):
    batched = dataclasses.replace(scorer, batch_size=4)  # 6 images: a full batch and a partial one
    clip = batched.text_alignment(images, "a cat made of gold")
    fidelity, _ = batched.fidelity(images, images[2])
    for i, image in enumerate(images):
        assert scorer.text_alignment([image], "a cat made of gold")[0] == pytest.approx(clip[i], abs=1e-4)
        assert scorer.fidelity([image], images[2])[0][0] == pytest.approx(fidelity[i], abs=1e-4)


def test_the_reference_itself_is_the_most_similar(scorer, images):
    reference = images[3]
    fidelity, metric = scorer.fidelity(images, reference)
    assert metric == "clip_image"
    assert fidelity[3] == pytest.approx(1.0, abs=1e-5)
    assert max(range(len(images)), key=fidelity.__getitem__) == 3
    assert similarity_key(metric, fidelity[3]) > similarity_key(metric, fidelity[0])


def test_empty_input_gives_empty_scores(scorer, images):
    assert scorer.text_alignment([], "a dog") == []
    assert scorer.fidelity([], images[0]) == ([], "clip_image")
    assert scorer.score([], "a dog", images[0]) == []


def test_load_scorer_reuses_one_scorer_per_process():
    assert load_scorer("tiny", device="cpu", fidelity="clip_image") is load_scorer(
        "tiny", device="cpu", fidelity="clip_image"
    )


def test_a_scorer_loaded_ahead_waits_in_host_memory_and_reaches_its_device_without_a_second_load(monkeypatch):
    """prefetch_scorer reads and builds the scorer once; for an accelerator ("meta" stands in for one here) its parts
    stay in host memory until load_scorer moves them, for the CPU it is the scorer itself."""
    from fastimagic import scoring

    built, build = [], scoring._build_tiny
    monkeypatch.setattr(scoring, "_build_tiny", lambda: built.append(1) or build())
    monkeypatch.setattr(scoring, "_CACHE", {})
    monkeypatch.setattr(scoring, "_HOST", {})
    scoring.prefetch_scorer("tiny", device="meta", fidelity="clip_image")
    scoring.prefetch_scorer("tiny", device="meta", fidelity="clip_image")  # loaded ahead once
    [(model, _, _, lpips)] = scoring._HOST.values()
    assert built == [1] and not scoring._CACHE and lpips is None
    assert {p.device.type for p in model.parameters()} == {"cpu"}  # the device holds nothing yet
    scorer = load_scorer("tiny", device="meta", fidelity="clip_image")
    assert built == [1] and not scoring._HOST and scorer.model is model  # taken, not loaded again
    assert {p.device.type for p in model.parameters()} == {"meta"}
    scoring.prefetch_scorer("tiny", device="meta", fidelity="clip_image")  # it is on its device already
    assert built == [1] and not scoring._HOST

    scoring.prefetch_scorer("tiny", device="cpu", fidelity="clip_image")
    assert built == [1, 1] and not scoring._HOST
    [ready] = [s for s in scoring._CACHE.values() if s is not scorer]
    assert load_scorer("tiny", device="cpu", fidelity="clip_image") is ready and built == [1, 1]


def test_a_missing_model_is_one_clear_input_error():
    with pytest.raises(InputError) as e:
        load_scorer("fastimagic-tests/no-such-clip-model", device="cpu")
    message = str(e.value)
    assert "\n" not in message
    assert message.startswith("fastimagic-tests/no-such-clip-model: cannot load the CLIP scorer")
    assert "huggingface-cli download" in message


def test_a_local_clip_folder_loads_through_from_pretrained(scorer, images, tmp_path):
    # The real-model path (CLIPModel, AutoTokenizer, AutoImageProcessor.from_pretrained) on a saved tiny CLIP.
    scorer.model.save_pretrained(tmp_path)
    scorer.tokenizer.save_pretrained(tmp_path)
    scorer.image_processor.save_pretrained(tmp_path)
    loaded = load_scorer(str(tmp_path), device="cpu", fidelity="clip_image")
    assert loaded.name == str(tmp_path)
    expected = scorer.score(images, "a dog wearing a hat", images[0])
    for got, want in zip(loaded.score(images, "a dog wearing a hat", images[0]), expected):
        assert got["clip"] == pytest.approx(want["clip"], abs=1e-4)
        assert got["fidelity"] == pytest.approx(want["fidelity"], abs=1e-4)


def test_scorer_and_captioner_with_only_pickle_weights_need_allow_pickle(scorer, tmp_path):
    from fastimagic import tiny
    from fastimagic.caption import load_captioner
    from fastimagic.scoring import scorer_problem

    def pickled(model, folder):  # the weights as pytorch_model.bin only: pickle, which can run code when loaded
        model.save_pretrained(folder)
        for f in folder.glob("*.safetensors"):
            f.unlink()
        torch.save(model.state_dict(), folder / "pytorch_model.bin")

    clip = tmp_path / "clip"
    pickled(scorer.model, clip)
    scorer.tokenizer.save_pretrained(clip)
    scorer.image_processor.save_pretrained(clip)
    assert (clip / "pytorch_model.bin").is_file() and not list(clip.glob("*.safetensors"))
    assert "are pickle files" in scorer_problem(str(clip))
    with pytest.raises(InputError, match="allow_pickle: true"):
        load_scorer(str(clip), device="cpu", fidelity="clip_image")
    assert scorer_problem(str(clip), allow_pickle=True) is None
    assert load_scorer(str(clip), device="cpu", fidelity="clip_image", allow_pickle=True).name == str(clip)
    blip = tmp_path / "blip"
    model, processor = tiny.build_blip()
    pickled(model, blip)
    processor.save_pretrained(blip)
    with pytest.raises(InputError, match="allow_pickle: true"):
        load_captioner(str(blip), device="cpu")
    assert load_captioner(str(blip), device="cpu", allow_pickle=True) is not None


def test_unknown_fidelity_metric_is_refused():
    with pytest.raises(InputError, match="allowed: auto, lpips, clip_image"):
        load_scorer("tiny", fidelity="ssim")


def test_lpips_is_refused_with_the_reason_when_unavailable():
    net, why = load_lpips("cpu")
    if net is not None:
        pytest.skip("LPIPS is available on this machine")
    with pytest.raises(InputError, match="LPIPS was asked for but cannot be used"):
        load_scorer("tiny", device="cpu", fidelity="lpips")
    assert why


def test_embeddings_from_tensors_and_output_objects():
    t = torch.ones(2, 3)
    assert _embeddings(t) is t  # transformers 4.x
    assert _embeddings(SimpleNamespace(pooler_output=t)) is t  # transformers 5.x: projected pooler_output
    assert _embeddings(SimpleNamespace(image_embeds=t, pooler_output=None)) is t
    with pytest.raises(TypeError):
        _embeddings(SimpleNamespace(last_hidden_state=t))


class _FakeLpips(torch.nn.Module):
    """Stands in for LPIPS (which needs torchvision): mean absolute difference, shaped like LPIPS' output."""

    def forward(self, x, y):
        assert x.shape == y.shape and x.shape[1:] == (3, 256, 256)
        assert x.min() >= -1.0 and x.max() <= 1.0
        return (x - y).abs().mean(dim=(1, 2, 3)).reshape(-1, 1, 1, 1)


def test_lpips_fidelity_is_reported_as_lpips_lower_is_more_similar(scorer, images):
    with_lpips = dataclasses.replace(scorer, lpips=_FakeLpips(), batch_size=4)
    values, metric = with_lpips.fidelity(images, images[1])
    assert metric == "lpips" == with_lpips.fidelity_metric
    assert values[1] == pytest.approx(0.0, abs=1e-6)
    assert min(range(len(images)), key=values.__getitem__) == 1
    assert similarity_key("lpips", values[1]) > similarity_key("lpips", values[0])
    assert [with_lpips.fidelity([im], images[1])[0][0] for im in images] == pytest.approx(values, abs=1e-6)
    assert {s["fidelity_metric"] for s in with_lpips.score(images, "a dog", images[1])} == {"lpips"}


def _cached(repo: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    def present(filename: str) -> bool:
        return isinstance(try_to_load_from_cache(repo, filename), str)

    return present("config.json") and (present("model.safetensors") or present("pytorch_model.bin"))


def test_real_clip_scorer_prefers_the_matching_prompt():
    if not _cached(DEFAULT_SCORER):
        pytest.skip(f"{DEFAULT_SCORER} is not in the local Hugging Face cache (tests never download)")
    scorer = load_scorer(DEFAULT_SCORER, device="cpu", fidelity="clip_image")
    image = _landscape()
    matching, other = (
        scorer.text_alignment([image], p)[0]
        for p in ("a drawing of a yellow sun over a green hill", "a photo of a cat")
    )
    assert 10.0 < matching <= 100.0
    assert matching > other
    fidelity, _ = scorer.fidelity([image, _noise(0, (224, 224))], image)
    assert fidelity[0] == pytest.approx(1.0, abs=1e-4) and fidelity[1] < 0.9
