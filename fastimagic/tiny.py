"""The built-in tiny models: Stable Diffusion 1.x, 2.x and SDXL in shape, a few kilobytes in size.

Everything here is built offline from configs: the same component classes as the real models, but tiny widths and
seeded random weights. It exists so that tests and the demo run the real code paths on a 2-core CPU with nothing
downloaded. Their images are noise-like, not pictures.

* ``tiny``: SD 1.x (UNet2DConditionModel with four down and four up blocks, AutoencoderKL with an 8x
  downsampling, a CLIP text encoder and a byte-level CLIP BPE tokenizer).
* ``tiny-sd2``: SD 2.x (linear-projection transformers, per-level head counts, a GELU text encoder) predicting
  velocity, as the 768 px SD 2.0/2.1 models do.
* ``tiny-sdxl``: SDXL (three levels, the first without attention, two transformer layers at the deepest; two text
  encoders whose penultimate states concatenate, the second with a projection that gives the pooled vector; the
  "text_time" added embedding that takes the pooled vector and the six time ids; a second tokenizer padding with
  ``!``, as SDXL's does).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch

TINY_SEED = 0
TINY_IDENTITY = "tiny:v1"
# Identities of every tiny model by name (content keys of tunings made on them).
IDENTITIES = {"tiny": TINY_IDENTITY, "tiny-sd2": "tiny-sd2:v1", "tiny-sdxl": "tiny-sdxl:v1"}
# 64 px images, 8x8 latents: the smallest size at which every UNet level keeps a spatial extent of at least 1.
TINY_RESOLUTION = 64

# Words the tiny tokenizer merges into single tokens, so that ordinary prompts stay within 77 tokens as they
# would with the real CLIP vocabulary. Anything else falls back to bytes, as byte-level BPE does.
_WORDS = """a an the of and in on at with to is are two three man woman men women people person dog cat bird
photo picture painting image portrait standing sitting walking running dancing jumping flying lying eating
holding wearing beach park street city forest night day sunset snow rain room kitchen table car horse tree
red blue green yellow black white brown small big old young happy sad his her their them they it its while
hat shirt dress apple banana cake cup glass water house field mountain sky river""".split()


def _bytes_to_unicode() -> dict[int, str]:
    # The reversible byte -> printable-character table that GPT-2 and CLIP BPE vocabularies are written in.
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def write_clip_tokenizer_files(folder: Path) -> Path:
    """Write a byte-level CLIP BPE vocabulary (``vocab.json``, ``merges.txt``) into ``folder`` and return it."""
    folder.mkdir(parents=True, exist_ok=True)
    chars = list(_bytes_to_unicode().values())
    vocab: dict[str, int] = {}
    for token in chars + [c + "</w>" for c in chars]:
        vocab.setdefault(token, len(vocab))
    merges: list[str] = []
    for word in _WORDS:
        # CLIP BPE marks the last symbol of a word with </w>; build each word up from the left.
        symbols = list(word[:-1]) + [word[-1] + "</w>"]
        left = symbols[0]
        for right in symbols[1:]:
            merge = f"{left} {right}"
            left = left + right
            if merge not in merges:
                merges.append(merge)
            vocab.setdefault(left, len(vocab))
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab.setdefault(special, len(vocab))
    (folder / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    return folder


def write_bert_vocab(folder: Path) -> Path:
    """Write a small BERT WordPiece vocabulary (``vocab.txt``) for the tiny BLIP captioner."""
    folder.mkdir(parents=True, exist_ok=True)
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]"]
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    tokens = specials + _WORDS + letters + ["##" + c for c in letters] + list(".,!?'")
    (folder / "vocab.txt").write_text("\n".join(dict.fromkeys(tokens)) + "\n", encoding="utf-8")
    return folder


def clip_tokenizer(pad_token: str | None = None):
    """The tiny byte-level CLIP tokenizer (77 tokens, like SD 1.x); ``pad_token``: e.g. ``!`` (SDXL's second)."""
    from transformers import CLIPTokenizer

    # Loaded through from_pretrained, exactly as a real model's tokenizer/ folder is, from files (a few kilobytes,
    # rebuilt identically each time) that are gone once it has read them: nothing is left in /tmp.
    kw = {"pad_token": pad_token} if pad_token else {}
    with tempfile.TemporaryDirectory(prefix="fastimagic-tiny-tok-") as folder:
        return CLIPTokenizer.from_pretrained(str(write_clip_tokenizer_files(Path(folder))), model_max_length=77, **kw)


def unet_config() -> dict:
    return dict(
        sample_size=TINY_RESOLUTION // 8,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(16, 16, 32, 32),
        layers_per_block=1,
        cross_attention_dim=32,
        attention_head_dim=4,
        norm_num_groups=8,
    )


def sd2_unet_config() -> dict:
    return unet_config() | dict(attention_head_dim=(2, 4, 4, 4), use_linear_projection=True, cross_attention_dim=48)


# SDXL: text encoder widths 32 (CLIP L-like) + 48 (bigG-like) = 80 channels per token; pooled vector 32 wide. The
# two widths differ, as 768 and 1280 do: diffusers' single-file loader tells the encoders apart by width.
SDXL_TIME_EMBED_DIM = 8
SDXL_POOLED_DIM = 32


def sdxl_unet_config() -> dict:
    return dict(
        sample_size=TINY_RESOLUTION // 8,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(16, 32, 32),
        layers_per_block=1,
        transformer_layers_per_block=(1, 1, 2),
        attention_head_dim=(2, 4, 4),
        use_linear_projection=True,
        cross_attention_dim=80,
        addition_embed_type="text_time",
        addition_time_embed_dim=SDXL_TIME_EMBED_DIM,
        projection_class_embeddings_input_dim=SDXL_TIME_EMBED_DIM * 6 + SDXL_POOLED_DIM,
        norm_num_groups=8,
    )


def vae_config(scaling_factor: float = 0.18215) -> dict:
    return dict(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 16, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=TINY_RESOLUTION,
        scaling_factor=scaling_factor,
    )


def text_encoder_config(vocab_size: int, bos: int, eos: int, **changes) -> dict:
    return dict(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=77,
        bos_token_id=bos,
        eos_token_id=eos,
        pad_token_id=eos,
        projection_dim=32,
    ) | changes


def build_components(seed: int = TINY_SEED, name: str = "tiny") -> dict:
    """Build the tiny model ``name`` (``tiny``, ``tiny-sd2``, ``tiny-sdxl``) with weights drawn from ``seed``:
    unet, vae, text_encoder, tokenizer (and text_encoder_2, tokenizer_2 for SDXL), prediction_type."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    if name not in IDENTITIES:
        raise ValueError(f"unknown tiny model {name!r}; one of {', '.join(IDENTITIES)}")
    tokenizer = clip_tokenizer()
    ids = (len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id)
    parts: dict = {"tokenizer": tokenizer, "prediction_type": "epsilon"}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if name == "tiny":
            parts["unet"] = UNet2DConditionModel(**unet_config())
            parts["vae"] = AutoencoderKL(**vae_config())
            parts["text_encoder"] = CLIPTextModel(CLIPTextConfig(**text_encoder_config(*ids)))
        elif name == "tiny-sd2":
            parts["unet"] = UNet2DConditionModel(**sd2_unet_config())
            parts["vae"] = AutoencoderKL(**vae_config())
            parts["text_encoder"] = CLIPTextModel(
                CLIPTextConfig(**text_encoder_config(*ids, hidden_size=48, num_attention_heads=4, hidden_act="gelu"))
            )
            parts["prediction_type"] = "v_prediction"
        else:
            parts["unet"] = UNet2DConditionModel(**sdxl_unet_config())
            parts["vae"] = AutoencoderKL(**vae_config(scaling_factor=0.13025))
            parts["text_encoder"] = CLIPTextModel(CLIPTextConfig(**text_encoder_config(*ids)))
            parts["text_encoder_2"] = CLIPTextModelWithProjection(
                CLIPTextConfig(
                    **text_encoder_config(*ids, hidden_size=48, hidden_act="gelu", projection_dim=SDXL_POOLED_DIM)
                )
            )
            parts["tokenizer_2"] = clip_tokenizer(pad_token="!")
    return parts


def build_blip(seed: int = TINY_SEED):
    """A tiny random BLIP captioner (model, processor) built offline. Its captions are arbitrary words."""
    from transformers import (
        BertTokenizer,
        BlipConfig,
        BlipForConditionalGeneration,
        BlipImageProcessor,
        BlipProcessor,
    )

    with tempfile.TemporaryDirectory(prefix="fastimagic-tiny-blip-") as folder:  # read, then gone
        tokenizer = BertTokenizer.from_pretrained(str(write_bert_vocab(Path(folder))), model_max_length=40)
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    image_processor = BlipImageProcessor(size={"height": 32, "width": 32})
    processor = BlipProcessor(image_processor=image_processor, tokenizer=tokenizer)
    config = BlipConfig(
        vision_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=32,
            patch_size=16,
        ),
        text_config=dict(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            encoder_hidden_size=32,
            bos_token_id=tokenizer.convert_tokens_to_ids("[DEC]"),
            pad_token_id=tokenizer.pad_token_id,
            sep_token_id=tokenizer.sep_token_id,
            eos_token_id=tokenizer.sep_token_id,
        ),
        projection_dim=32,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = BlipForConditionalGeneration(config)
    model.eval()
    return model, processor


# --- a reference photo for tests, benchmarks and the demo ----------------------------------------------------------

# TEdBench originals, when the project's shared data sits beside the checkout (they are not ours to ship).
TEDBENCH_ORIGINALS = Path(__file__).resolve().parents[2] / "shared" / "data" / "tedbench" / "originals"


def drawn_photo(width: int = 320, height: int = 240) -> bytes:
    """A JPEG drawn here: a sky, a sun, a hill and a tree trunk (when no real photo is at hand)."""
    import io

    from PIL import Image, ImageDraw

    img = Image.new("RGB", (width, height), (110, 160, 230))
    d = ImageDraw.Draw(img)
    d.ellipse((width * 0.6, height * 0.1, width * 0.8, height * 0.35), fill=(250, 220, 60))
    d.polygon([(0, height), (width * 0.4, height * 0.5), (width, height)], fill=(60, 140, 70))
    d.rectangle((width * 0.2, height * 0.6, width * 0.3, height * 0.85), fill=(120, 70, 40))
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=92)
    return buf.getvalue()


def reference_photo_bytes(name: str = "bird.jpeg") -> bytes:
    """A real TEdBench photo when the shared data is present, else :func:`drawn_photo`."""
    p = TEDBENCH_ORIGINALS / name
    return p.read_bytes() if p.is_file() else drawn_photo()
