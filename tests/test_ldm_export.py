"""The original-layout (CompVis/LDM) single-file export of the tiny model, loaded back through diffusers, offline.

This is the path users take for community SD 1.x fine-tunes (one ``.safetensors`` with ``model.diffusion_model.*``,
``first_stage_model.*`` and ``cond_stage_model.transformer.*``), exercised on the tiny components.
"""

from __future__ import annotations

import os
import shutil
import socket

import pytest
import torch
from ldm_export import (
    export_single_file,
    save_diffusers_folder,
    text_encoder_to_ldm,
    unet_to_ldm,
    vae_to_ldm,
)
from safetensors import safe_open
from safetensors.torch import save_file

from fastimagic.models import describe_checkpoint
from fastimagic.tiny import build_components, unet_config, vae_config

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # read by huggingface_hub at import; the socket guard below is the check


@pytest.fixture
def no_network(monkeypatch):
    """Fail any attempt to resolve or connect to a host (what a hub download would do first)."""
    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args[:2])
        raise OSError(f"network access attempted in an offline test: {args[:2]!r}")

    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    yield attempts
    assert not attempts, f"network access attempted: {attempts}"


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("ldm-export")
    components = build_components(0)
    for name in ("unet", "vae", "text_encoder"):
        components[name].eval()
    folder = save_diffusers_folder(components, root / "diffusers")
    ckpt = export_single_file(components, root / "tiny-sd1.safetensors")
    return components, folder, ckpt


def assert_same_weights(original, loaded):
    a, b = original.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert b[key].device.type == "cpu", key  # a parameter the loader missed stays on the meta device
        assert torch.equal(a[key], b[key]), key


def assert_same_unet_output(original, loaded, *, exact: bool):
    if exact:
        assert torch.equal(unet_output(loaded), unet_output(original))
    else:
        # Loaded with mmap (the default), the parameters are views into the file, only 4-byte aligned; CPU kernels
        # then round differently in the last bit than on the 64-byte aligned originals.
        torch.testing.assert_close(unet_output(loaded), unet_output(original), rtol=1e-5, atol=1e-6)


def unet_output(unet):
    generator = torch.Generator().manual_seed(1)
    sample = torch.randn(1, 4, 8, 8, generator=generator)
    context = torch.randn(1, 77, unet.config.cross_attention_dim, generator=generator)
    with torch.no_grad():
        return unet(sample, torch.tensor([500]), encoder_hidden_states=context).sample


def header(path):
    with safe_open(str(path), framework="pt") as f:
        return {key: (f.get_slice(key).get_dtype(), list(f.get_slice(key).get_shape())) for key in f.keys()}  # noqa: SIM118


# ---------------------------------------------------------------------------------------------------------------
# The layout itself


def test_export_has_the_original_sd1_layout(exported):
    components, _, ckpt = exported
    keys = header(ckpt)
    unet = {k for k in keys if k.startswith("model.diffusion_model.")}
    vae = {k for k in keys if k.startswith("first_stage_model.")}
    clip = {k for k in keys if k.startswith("cond_stage_model.transformer.text_model.")}
    assert len(unet) == len(components["unet"].state_dict())
    assert len(vae) == len(components["vae"].state_dict())
    assert len(clip) == len(components["text_encoder"].state_dict()) + 1  # + embeddings.position_ids
    assert set(keys) - unet - vae - clip == {
        "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod",
        "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod",
        "posterior_variance", "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2",
    }  # fmt: skip
    # No diffusers names survive.
    for word in ("down_blocks", "up_blocks", "mid_block", "resnets", "time_embedding", "conv_shortcut", "attentions"):
        assert not any(word in k for k in unet | vae), word
    assert not any(word in k for k in vae for word in ("to_q", "to_out", "group_norm"))
    # Anchors of the SD 1.x layout (tiny: 4 levels, one resnet per level).
    for key in (
        "model.diffusion_model.input_blocks.0.0.weight",
        "model.diffusion_model.input_blocks.1.0.in_layers.2.weight",
        "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight",
        "model.diffusion_model.input_blocks.2.0.op.weight",
        "model.diffusion_model.middle_block.1.proj_in.weight",
        "model.diffusion_model.output_blocks.1.1.conv.weight",  # upsampler of the attention-free level
        "model.diffusion_model.output_blocks.3.2.conv.weight",  # upsampler after an attention
        "model.diffusion_model.out.2.weight",
        "first_stage_model.encoder.down.0.downsample.conv.weight",
        "first_stage_model.decoder.up.3.upsample.conv.weight",
        "first_stage_model.encoder.down.2.block.0.nin_shortcut.weight",
        "first_stage_model.encoder.norm_out.weight",
        "cond_stage_model.transformer.text_model.final_layer_norm.weight",
    ):
        assert key in keys, key
    # The VAE attention projections are 1x1 convolutions, as in the original.
    for name in ("q", "k", "v", "proj_out"):
        dtype, shape = keys[f"first_stage_model.decoder.mid.attn_1.{name}.weight"]
        assert shape == [16, 16, 1, 1]
    assert keys["cond_stage_model.transformer.text_model.embeddings.position_ids"] == ("I64", [1, 77])
    assert keys["model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"] == ("F32", [16, 32])


def test_sd15_shaped_mapping_matches_diffusers_loader():
    """Full-size SD 1.5 shapes (on the meta device: no memory): the key counts of the real checkpoints, and
    diffusers' own LDM->diffusers converters invert the export exactly."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import (
        CHECKPOINT_KEY_NAMES,
        convert_ldm_unet_checkpoint,
        convert_ldm_vae_checkpoint,
        infer_diffusers_model_type,
    )
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(cross_attention_dim=768, attention_head_dim=8, sample_size=64)
        vae = AutoencoderKL(
            block_out_channels=(128, 256, 512, 512),
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            layers_per_block=2,
            sample_size=512,
        )
        text_encoder = CLIPTextModel(
            CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12)
        )
    unet_sd, vae_sd, clip_sd = unet_to_ldm(unet), vae_to_ldm(vae), text_encoder_to_ldm(text_encoder)
    assert (len(unet_sd), len(vae_sd), len(clip_sd)) == (686, 248, 197)  # as in v1-5-pruned-emaonly.safetensors
    assert {k for k in unet_sd if ".op." in k or (k.startswith("output_blocks") and ".conv." in k)} == {
        "input_blocks.3.0.op.weight", "input_blocks.3.0.op.bias", "input_blocks.6.0.op.weight",
        "input_blocks.6.0.op.bias", "input_blocks.9.0.op.weight", "input_blocks.9.0.op.bias",
        "output_blocks.2.1.conv.weight", "output_blocks.2.1.conv.bias", "output_blocks.5.2.conv.weight",
        "output_blocks.5.2.conv.bias", "output_blocks.8.2.conv.weight", "output_blocks.8.2.conv.bias",
    }  # fmt: skip
    ldm = {"model.diffusion_model." + k: v for k, v in unet_sd.items()}
    ldm.update({"first_stage_model." + k: v for k, v in vae_sd.items()})
    assert CHECKPOINT_KEY_NAMES["v1"] in ldm
    assert infer_diffusers_model_type(ldm) == "v1"
    back = convert_ldm_unet_checkpoint(ldm, dict(unet.config))
    assert {k: v.shape for k, v in back.items()} == {k: v.shape for k, v in unet.state_dict().items()}
    back = convert_ldm_vae_checkpoint(ldm, dict(vae.config))
    assert {k: v.shape for k, v in back.items()} == {k: v.shape for k, v in vae.state_dict().items()}


# ---------------------------------------------------------------------------------------------------------------
# Loading the single file back, offline


def test_pipeline_from_single_file_round_trip(exported, no_network):
    from diffusers import StableDiffusionPipeline

    components, folder, ckpt = exported
    # `config` must be a str (a pathlib.Path raises "Invalid `config` argument") and a local diffusers folder:
    # without it diffusers goes to the hub for stable-diffusion-v1-5's configs, even with local_files_only=True.
    pipe = StableDiffusionPipeline.from_single_file(str(ckpt), config=str(folder), local_files_only=True)
    for name in ("unet", "vae", "text_encoder"):
        assert_same_weights(components[name], getattr(pipe, name))
    assert_same_unet_output(components["unet"], pipe.unet, exact=False)
    assert pipe.safety_checker is None and pipe.feature_extractor is None
    assert type(pipe.scheduler).__name__ == "DDIMScheduler" and pipe.scheduler.config.steps_offset == 1
    prompt = "a photo of a dog on the beach"
    assert pipe.tokenizer(prompt).input_ids == components["tokenizer"](prompt).input_ids

    # disable_mmap=True reads the weights into (aligned) memory: then the results are bit-identical.
    pipe = StableDiffusionPipeline.from_single_file(
        str(ckpt), config=str(folder), local_files_only=True, disable_mmap=True
    )
    assert_same_unet_output(components["unet"], pipe.unet, exact=True)

    # End to end: the loaded pipeline draws exactly what the original components draw.
    original = StableDiffusionPipeline(
        **{k: components[k] for k in ("unet", "vae", "text_encoder", "tokenizer")},
        scheduler=pipe.scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    kwargs = {"num_inference_steps": 2, "height": 64, "width": 64, "output_type": "np"}
    ours = pipe(prompt, generator=torch.Generator().manual_seed(0), **kwargs).images
    theirs = original(prompt, generator=torch.Generator().manual_seed(0), **kwargs).images
    assert ours.shape == (1, 64, 64, 3)
    assert (ours == theirs).all()


def test_components_from_single_file(exported, no_network):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import create_diffusers_clip_model_from_ldm
    from safetensors.torch import load_file
    from transformers import CLIPTextModel

    components, folder, ckpt = exported
    unet = UNet2DConditionModel.from_single_file(str(ckpt), config=str(folder), subfolder="unet", local_files_only=True)
    vae = AutoencoderKL.from_single_file(str(ckpt), config=str(folder), subfolder="vae", local_files_only=True)
    # transformers models have no from_single_file; this is what the pipeline's from_single_file calls for them.
    text_encoder = create_diffusers_clip_model_from_ldm(
        CLIPTextModel, load_file(str(ckpt)), subfolder="text_encoder", config=str(folder), local_files_only=True
    )
    assert_same_weights(components["unet"], unet)
    assert_same_weights(components["vae"], vae)
    assert_same_weights(components["text_encoder"], text_encoder)
    assert_same_unet_output(components["unet"], unet, exact=False)


def test_configs_only_folder_is_enough(exported, tmp_path, no_network):
    """from_single_file reads only model_index.json, the component configs and the tokenizer from `config`."""
    from diffusers import StableDiffusionPipeline

    components, folder, ckpt = exported
    configs = shutil.copytree(folder, tmp_path / "configs")
    for weights in configs.rglob("*.safetensors"):
        weights.unlink()
    pipe = StableDiffusionPipeline.from_single_file(str(ckpt), config=str(configs), local_files_only=True)
    for name in ("unet", "vae", "text_encoder"):
        assert_same_weights(components[name], getattr(pipe, name))


def test_fp16_export(exported, tmp_path, no_network):
    from diffusers import UNet2DConditionModel

    components, folder, _ = exported
    ckpt = export_single_file(components, tmp_path / "fp16.safetensors", dtype=torch.float16)
    keys = header(ckpt)
    assert {dtype for key, (dtype, _) in keys.items() if not key.endswith("position_ids")} == {"F16"}
    # Without torch_dtype the weights come back as float32 (the config's default), with it as stored.
    for torch_dtype in (None, torch.float16):
        unet = UNet2DConditionModel.from_single_file(
            str(ckpt), config=str(folder), subfolder="unet", local_files_only=True, torch_dtype=torch_dtype
        )
        assert unet.dtype == (torch_dtype or torch.float32)
        for key, value in components["unet"].state_dict().items():
            assert torch.equal(unet.state_dict()[key], value.half().to(unet.dtype)), key


def test_two_layers_per_block_round_trip(tmp_path, no_network):
    """SD 1.5 has layers_per_block=2: the mapping follows the config, not tiny's 1."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**{**unet_config(), "layers_per_block": 2}).eval()
    vae = AutoencoderKL(**{**vae_config(), "layers_per_block": 2}).eval()
    unet.save_config(str(tmp_path / "cfg" / "unet"))
    vae.save_config(str(tmp_path / "cfg" / "vae"))
    ldm = {"model.diffusion_model." + k: v.clone() for k, v in unet_to_ldm(unet).items()}
    ldm.update({"first_stage_model." + k: v.clone() for k, v in vae_to_ldm(vae).items()})
    assert "model.diffusion_model.output_blocks.11.0.skip_connection.weight" in ldm  # SD 1.5's v1 marker key
    ckpt = tmp_path / "lpb2.safetensors"
    save_file(ldm, str(ckpt))
    cfg = str(tmp_path / "cfg")
    kwargs = {"config": cfg, "local_files_only": True, "disable_mmap": True}
    loaded_unet = UNet2DConditionModel.from_single_file(str(ckpt), subfolder="unet", **kwargs)
    loaded_vae = AutoencoderKL.from_single_file(str(ckpt), subfolder="vae", **kwargs)
    assert_same_weights(unet, loaded_unet)
    assert_same_weights(vae, loaded_vae)
    assert_same_unet_output(unet, loaded_unet, exact=True)


# ---------------------------------------------------------------------------------------------------------------
# The diffusers folder


def test_diffusers_folder_round_trip(exported, no_network):
    import json

    from diffusers import StableDiffusionPipeline

    components, folder, _ = exported
    index = json.loads((folder / "model_index.json").read_text())
    assert index["safety_checker"] == [None, None] and index["feature_extractor"] == [None, None]
    assert index["requires_safety_checker"] is False
    pipe = StableDiffusionPipeline.from_pretrained(str(folder), local_files_only=True)
    for name in ("unet", "vae", "text_encoder"):
        assert_same_weights(components[name], getattr(pipe, name))
    scheduler = pipe.scheduler.config
    assert type(pipe.scheduler).__name__ == "DDIMScheduler"
    assert (scheduler.beta_start, scheduler.beta_end, scheduler.beta_schedule) == (0.00085, 0.012, "scaled_linear")
    assert (scheduler.clip_sample, scheduler.set_alpha_to_one, scheduler.steps_offset) == (False, False, 1)
    prompt = "two people walking in the park"
    assert pipe.tokenizer(prompt).input_ids == components["tokenizer"](prompt).input_ids


# ---------------------------------------------------------------------------------------------------------------
# describe_checkpoint : the architecture from the safetensors header alone


def _fake(path, shapes: dict[str, tuple[int, ...]]):
    save_file({key: torch.zeros(shape, dtype=torch.float16) for key, shape in shapes.items()}, str(path))
    return path


UNET = "model.diffusion_model."


def expect(family, cross_attention_dim, has_vae, has_text_encoder, in_channels):
    return {
        "family": family,
        "cross_attention_dim": cross_attention_dim,
        "has_vae": has_vae,
        "has_text_encoder": has_text_encoder,
        "in_channels": in_channels,
    }


def test_describe_tiny_export(exported):
    assert describe_checkpoint(exported[2]) == {
        "family": "sd1",
        "cross_attention_dim": 32,
        "has_vae": True,
        "has_text_encoder": True,
        "in_channels": 4,
    }


@pytest.mark.parametrize(
    ("shapes", "expected"),
    [
        pytest.param(
            {
                UNET + "input_blocks.0.0.weight": (320, 4, 3, 3),
                UNET + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (320, 768),
                UNET + "output_blocks.11.0.skip_connection.weight": (320, 640, 1, 1),
                "cond_stage_model.transformer.text_model.embeddings.position_embedding.weight": (77, 768),
            },
            expect("sd1", 768, False, True, 4),
            id="sd1-no-vae",
        ),
        pytest.param(
            {
                UNET + "input_blocks.0.0.weight": (320, 9, 3, 3),
                UNET + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (320, 768),
                "first_stage_model.encoder.conv_in.weight": (128, 3, 3, 3),
            },
            expect("sd1", 768, True, False, 9),
            id="sd1-inpainting",
        ),
        pytest.param(
            {
                UNET + "input_blocks.0.0.weight": (320, 4, 3, 3),
                UNET + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (320, 1024),
                UNET + "input_blocks.1.1.proj_in.weight": (320, 320),
                "first_stage_model.encoder.conv_in.weight": (128, 3, 3, 3),
                "cond_stage_model.model.token_embedding.weight": (49408, 4),
                "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight": (12, 4),
            },
            expect("sd2", 1024, True, True, 4),
            id="sd2",
        ),
        pytest.param(
            {UNET + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (320, 1024)},
            expect("sd2", 1024, False, False, None),
            id="sd2-unet-only",
        ),
        pytest.param(
            {
                UNET + "input_blocks.0.0.weight": (320, 4, 3, 3),
                UNET + "label_emb.0.0.weight": (1280, 2816),
                UNET + "input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight": (640, 2048),
                "first_stage_model.encoder.conv_in.weight": (128, 3, 3, 3),
                "conditioner.embedders.0.transformer.text_model.embeddings.position_embedding.weight": (77, 768),
                "conditioner.embedders.1.model.positional_embedding": (77, 1280),
            },
            expect("sdxl", 2048, True, True, 4),
            id="sdxl",
        ),
        pytest.param(
            {"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": (4, 320)},
            expect("unknown", None, False, False, None),
            id="lora",
        ),
        pytest.param(
            {"encoder.conv_in.weight": (128, 3, 3, 3), "decoder.conv_out.weight": (3, 128, 3, 3)},
            expect("unknown", None, False, False, None),
            id="standalone-vae",
        ),
        pytest.param(
            {"down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight": (320, 768)},
            expect("unknown", None, False, False, None),
            id="diffusers-format-unet",
        ),
    ],
)
def test_describe_fake_checkpoints(tmp_path, shapes, expected):
    assert describe_checkpoint(_fake(tmp_path / "fake.safetensors", shapes)) == expected


def test_describe_reads_no_tensor(tmp_path, monkeypatch):
    """Only the header is read: get_tensor is never called (a multi-GB file costs a few milliseconds)."""
    import safetensors

    key = UNET + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
    path = _fake(tmp_path / "x.safetensors", {key: (8, 768)})
    real_open = safetensors.safe_open

    class NoTensors:
        def __init__(self, *args, **kwargs):
            self._f = real_open(*args, **kwargs)

        def __enter__(self):
            self._inner = self._f.__enter__()
            return self

        def __exit__(self, *exc):
            return self._f.__exit__(*exc)

        def keys(self):
            return self._inner.keys()

        def get_slice(self, name):
            return self._inner.get_slice(name)

        def get_tensor(self, name):
            raise AssertionError("describe_checkpoint read a tensor")

    monkeypatch.setattr(safetensors, "safe_open", NoTensors)
    assert describe_checkpoint(path)["cross_attention_dim"] == 768
