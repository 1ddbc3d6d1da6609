import pytest
import torch

from fastimagic.config import BLOCK_PRESETS
from fastimagic.errors import InputError
from fastimagic.finetuning import trained_parameter_names
from fastimagic.forgetting import ALIASES, STRATEGIES, Forgetting, canonical, describe


def _is_attn(n):
    return ".attn1." in n or ".attn2." in n


def _is_kv(n):
    return ".attn2.to_k." in n or ".attn2.to_v." in n


# Written out independently of the implementation: what each strategy must put back.
EXPECTED = {
    "none": lambda n: False,
    "encoder": lambda n: n.startswith("down_blocks."),
    "decoder": lambda n: n.startswith("up_blocks."),
    "encoderattn": lambda n: n.startswith("down_blocks.") and not _is_attn(n),
    "decoderattn": lambda n: n.startswith("up_blocks.") and not _is_attn(n),
    "encoderkv": lambda n: n.startswith("down_blocks.") and not _is_kv(n),
    "decoderkv": lambda n: n.startswith("up_blocks.") and not _is_kv(n),
    "encoderattn+encoder1": lambda n: n.startswith("down_blocks.")
    and not (_is_attn(n) or n.startswith("down_blocks.1.")),
    "decoderattn+decoder2": lambda n: n.startswith("up_blocks.") and not (_is_attn(n) or n.startswith("up_blocks.2.")),
}


def test_the_nine_named_strategies_exist():
    assert set(STRATEGIES) == set(EXPECTED)
    assert ALIASES == {"donotforget": "none", "noencoder": "encoder", "nodecoder": "decoder"}


@pytest.fixture
def learned_unet(tiny_model):
    """The tiny UNet with every trained tensor (reference preset + paper preset) perturbed; restored after."""
    unet = tiny_model.unet
    names = sorted(set(trained_parameter_names(unet, BLOCK_PRESETS["paper"] + BLOCK_PRESETS["reference"])))
    params = dict(unet.named_parameters())
    originals = {n: params[n].detach().clone() for n in names}
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n in names:
            params[n].add_(torch.randn(params[n].shape, generator=g) * 0.01)
    learned = {n: p.detach().clone() for n, p in unet.named_parameters()}
    yield unet, originals, learned
    with torch.no_grad():
        for n in names:
            params[n].copy_(originals[n])


@pytest.mark.parametrize("strategy", list(EXPECTED))
def test_each_strategy_changes_exactly_the_tensors_its_rule_names_and_undo_is_exact(learned_unet, strategy):
    unet, originals, learned = learned_unet
    f = Forgetting(unet, originals)
    report = f.apply(strategy)
    expected = {n for n in originals if EXPECTED[strategy](n)}
    assert set(report.tensors) == expected
    assert report.parameters == sum(originals[n].numel() for n in expected)
    for n, p in unet.named_parameters():
        if n in expected:
            assert torch.equal(p, originals[n]), n
        else:
            assert torch.equal(p, learned[n]), n
    f.restore()
    for n, p in unet.named_parameters():
        assert torch.equal(p, learned[n]), n


def test_switching_strategy_undoes_the_previous_one_first(learned_unet):
    unet, originals, learned = learned_unet
    f = Forgetting(unet, originals)
    f.apply("encoderattn")
    f.apply("decoderattn")
    for n, p in unet.named_parameters():
        if n in originals and EXPECTED["decoderattn"](n):
            assert torch.equal(p, originals[n])
        else:
            assert torch.equal(p, learned[n]), n
    f.restore()
    assert all(torch.equal(p, learned[n]) for n, p in unet.named_parameters())


def test_sigma_blends_learned_and_original(learned_unet):
    unet, originals, learned = learned_unet
    f = Forgetting(unet, originals)
    f.apply("decoder", sigma=0.25)
    params = dict(unet.named_parameters())
    name = next(n for n in originals if n.startswith("up_blocks."))
    assert torch.allclose(params[name], 0.25 * learned[name] + 0.75 * originals[name], atol=1e-7)
    f.restore()
    assert torch.equal(params[name], learned[name])


def test_aliases_are_accepted():
    assert canonical("donotforget") == "none"
    assert canonical("noencoder") == "encoder"
    assert canonical("nodecoder") == "decoder"


def test_unknown_strategy_suggests_and_lists_the_valid_ones():
    with pytest.raises(InputError) as e:
        canonical("encoderatn")
    msg = str(e.value)
    assert "did you mean 'encoderattn'" in msg
    for name in STRATEGIES:
        assert name in msg


def test_describe_lists_tensors_and_parameter_count():
    shapes = {
        "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight": (4, 8),
        "down_blocks.0.resnets.0.conv1.weight": (4, 4, 3, 3),
        "up_blocks.1.resnets.0.conv1.weight": (2, 2),
    }
    r = describe("encoderkv", shapes)
    assert r.tensors == ("down_blocks.0.resnets.0.conv1.weight",)
    assert r.parameters == 144
    assert "encoder" in r.description


@pytest.mark.parametrize("sigma", [-0.1, 1.5, float("nan")])
def test_sigma_outside_unit_interval_is_refused(learned_unet, sigma):
    unet, originals, _ = learned_unet
    with pytest.raises(InputError, match="sigma"):
        Forgetting(unet, originals).apply("encoder", sigma=sigma)
