from fastimagic.caption import load_captioner, source_prompt_from_caption


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
