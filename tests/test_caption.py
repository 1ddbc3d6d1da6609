import pytest

from fastimagic.caption import load_captioner, source_prompt_from_caption
from fastimagic.errors import InputError


def test_tiny_blip_captions_a_photo_offline(photo):
    captioner = load_captioner("tiny", device="cpu")
    caption = captioner(photo)
    assert isinstance(caption, str) and caption.strip() == caption and len(caption) > 0


def test_caption_is_prefixed_when_the_target_prompts_start_with_a_photo_of():
    assert source_prompt_from_caption("a bird on a branch", ["A photo of a bird flying"]) == (
        "A photo of a bird on a branch"
    )
    assert source_prompt_from_caption("a bird on a branch", ["a bird flying"]) == "a bird on a branch"
    assert source_prompt_from_caption("a photo of a bird", ["A photo of a bird flying"]) == "a photo of a bird"


def test_blip_decodes_as_the_released_code_by_default_and_records_it(photo, monkeypatch):
    captioner = load_captioner("tiny", device="cpu")
    seen = []
    real = captioner.model.generate
    monkeypatch.setattr(captioner.model, "generate", lambda **kw: seen.append(kw) or real(**kw))
    captioner(photo)
    assert set(seen[0]) == {"pixel_values"}  # a plain generate(): greedy, the model's own length limit
    assert captioner.settings() == {"decoding": "greedy", "num_beams": 1, "max_new_tokens": None}


def test_beam_search_is_optional_and_recorded(photo, monkeypatch):
    captioner = load_captioner("tiny", device="cpu", num_beams=3, max_new_tokens=30)
    seen = []
    real = captioner.model.generate
    monkeypatch.setattr(captioner.model, "generate", lambda **kw: seen.append(kw) or real(**kw))
    assert captioner(photo)
    assert seen[0]["num_beams"] == 3 and seen[0]["max_new_tokens"] == 30
    assert captioner.settings() == {"decoding": "beam", "num_beams": 3, "max_new_tokens": 30}
    with pytest.raises(InputError, match="num_beams and max_new_tokens must be at least 1"):
        load_captioner("tiny", device="cpu", num_beams=0)
