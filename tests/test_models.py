"""Loading base models the ways users point at them: tiny, a diffusers folder, a single-file checkpoint."""

import pytest
import torch
from ldm_export import export_single_file, save_diffusers_folder
from safetensors.torch import save_file

from fastimagic.errors import InputError
from fastimagic.models import load_base_model, model_identity, pick_device
from fastimagic.tiny import build_components


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    parts = build_components()
    folder = save_diffusers_folder(parts, root / "tiny-diffusers")
    ckpt = export_single_file(parts, root / "tiny-rv.safetensors")
    return parts, folder, ckpt


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k].float(), sb[k].float()) for k in sa)


def test_tiny_is_sd_shaped_and_seeded():
    a, b = load_base_model("tiny"), load_base_model("tiny")
    assert _same_weights(a.unet, b.unet)
    assert [type(m).__name__ for m in (a.unet, a.vae, a.text_encoder)] == [
        "UNet2DConditionModel",
        "AutoencoderKL",
        "CLIPTextModel",
    ]
    assert len(a.unet.down_blocks) == 4 and len(a.unet.up_blocks) == 4
    s = a.scheduler.config
    assert (s.beta_start, s.beta_end, s.beta_schedule, s.clip_sample) == (0.00085, 0.012, "scaled_linear", False)


def test_diffusers_folder_loads_the_same_weights(saved):
    parts, folder, _ = saved
    m = load_base_model(str(folder), device="cpu")
    for name in ("unet", "vae", "text_encoder"):
        assert _same_weights(getattr(m, name), parts[name]), name
    assert m.identity.startswith("folder:tiny-diffusers:")
    assert model_identity(str(folder)) == m.identity


def test_single_file_checkpoint_loads_offline_with_a_local_config_folder(saved):
    parts, folder, ckpt = saved
    m = load_base_model(str(ckpt), config=str(folder), device="cpu")
    for name in ("unet", "vae", "text_encoder"):
        assert _same_weights(getattr(m, name), parts[name]), name
    assert m.identity.startswith("file:tiny-rv.safetensors:")


def test_single_file_without_a_usable_config_is_one_clear_error(saved, tmp_path):
    _, _, ckpt = saved
    with pytest.raises(InputError, match="cannot load the single-file checkpoint with config"):
        load_base_model(str(ckpt), config=str(tmp_path / "no-such-config"))


_UNET = "model.diffusion_model."
_CONV_IN = _UNET + "input_blocks.0.0.weight"


# Headers of checkpoints fastimagic refuses, by name: {id: (tensor name -> shape, what the one-line error says)}.
UNSUPPORTED_CHECKPOINTS = {
    "sdxl-refiner": (
        {
            "conditioner.embedders.0.model.token_embedding.weight": [4, 4],
            _UNET + "label_emb.0.0.weight": [4, 4],
            _UNET + "input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight": [768, 1280],
        },
        r"this is an SDXL refiner \(it only refines another model's latents\); fastimagic supports SD 1.x, SD 2.x",
    ),
    "inpainting": (
        {
            "cond_stage_model.transformer.text_model.x": [1],
            "first_stage_model.x": [1],
            _CONV_IN: [320, 9, 3, 3],
            _UNET + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": [320, 768],
        },
        "takes 9 input channels \\(an inpainting or instruct model\\)",
    ),
    "sd3": ({_UNET + "joint_blocks.0.x_block.attn.qkv.weight": [4, 4]}, "Stable Diffusion 3 checkpoint"),
    "flux": ({"double_blocks.0.img_attn.qkv.weight": [4, 4]}, "a FLUX checkpoint"),
    "lora": ({"lora_unet_down_blocks_0.alpha": [1]}, "not a Stable Diffusion checkpoint"),
    "sdxl-unet-only": (
        {"conditioner.embedders.0.transformer.x": [1], _UNET + "label_emb.0.0.weight": [4, 4]},
        "lacks its VAE or text encoder; give a full SDXL checkpoint",
    ),
}


@pytest.mark.parametrize("keys,expected", list(UNSUPPORTED_CHECKPOINTS.values()), ids=list(UNSUPPORTED_CHECKPOINTS))
def test_checkpoint_of_an_unsupported_architecture_is_refused_by_name(tmp_path, keys, expected):
    path = tmp_path / "other.safetensors"
    save_file({k: torch.zeros(shape) for k, shape in keys.items()}, str(path))
    with pytest.raises(InputError, match=expected) as e:
        load_base_model(str(path))
    assert "\n" not in str(e.value)


def test_a_file_that_is_not_safetensors_is_refused(tmp_path):
    path = tmp_path / "broken.safetensors"
    path.write_bytes(b"definitely not safetensors")
    with pytest.raises(InputError, match="not a readable .safetensors checkpoint"):
        load_base_model(str(path))


@pytest.mark.parametrize("suffix", [".ckpt", ".pt", ".bin", ".pth"])
def test_pickle_checkpoints_are_refused_unless_allowed(tmp_path, suffix):
    path = tmp_path / f"model{suffix}"
    path.write_bytes(b"\x80\x04not really")
    with pytest.raises(InputError, match="pickle checkpoints .* can run code"):
        load_base_model(str(path))


@pytest.mark.parametrize("spec", ["./models/missing", "/nonexistent/model.safetensors", "~/nope/model"])
def test_missing_model_path(spec):
    with pytest.raises(InputError, match="model path does not exist"):
        load_base_model(spec)


def test_a_folder_that_is_not_a_diffusers_model(tmp_path):
    with pytest.raises(InputError, match="not a diffusers model folder"):
        load_base_model(str(tmp_path))


def test_a_repo_id_missing_from_the_offline_cache_is_one_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(InputError, match="someone/not-cached: cannot load the model"):
        load_base_model("someone/not-cached")


def test_device_and_dtype_choice_and_override():
    assert pick_device("cpu") == (torch.device("cpu"), torch.float32)
    assert pick_device("cpu", "bfloat16") == (torch.device("cpu"), torch.bfloat16)
    with pytest.raises(InputError, match="unknown dtype 'float7'"):
        pick_device("cpu", "float7")
    assert pick_device("cpu", precision="bf16") == (torch.device("cpu"), torch.bfloat16)
    with pytest.raises(InputError, match="fp16 is not offered on CPU"):
        pick_device("cpu", "float16")


def test_the_tiny_models_leave_nothing_in_the_temporary_folder(tmp_path):
    """Every process that loads the tiny model (and the tiny BLIP) used to leave a tokenizer folder in /tmp."""
    import os
    import subprocess
    import sys

    code = (
        "from fastimagic.models import load_base_model\nfrom fastimagic.caption import load_captioner\n"
        "for name in ('tiny', 'tiny-sdxl'): load_base_model(name, device='cpu')\nload_captioner('tiny')\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300, stdin=subprocess.DEVNULL,
                   env={**os.environ, "TMPDIR": str(tmp_path)})
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith("fastimagic")]
