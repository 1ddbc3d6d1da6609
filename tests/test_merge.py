import math

import pytest
import torch

from fastimagic.errors import InputError
from fastimagic.merge import merge, project, subtract


@pytest.fixture
def pair():
    g = torch.Generator().manual_seed(0)
    return torch.randn(1, 77, 32, generator=g), torch.randn(1, 77, 32, generator=g)


def test_subtract_gamma_zero_is_source_and_one_is_target(pair):
    src, tgt = pair
    assert torch.allclose(subtract(src, tgt, 0.0), src)
    assert torch.allclose(subtract(src, tgt, 1.0), tgt, atol=1e-6)


def test_subtract_is_linear_in_gamma(pair):
    src, tgt = pair
    assert torch.allclose(subtract(src, tgt, 1.5), src + 1.5 * (tgt - src))


def test_projection_edit_part_is_orthogonal_to_source_per_token(pair):
    src, tgt = pair
    edit = project(src, tgt, alpha=0.0, beta=1.0)
    cos = torch.nn.functional.cosine_similarity(edit, src, dim=-1)
    assert cos.abs().max() < 1e-5
    # the removed part is parallel to e_src: tgt = r * src + edit
    r = (src * tgt).sum(-1, keepdim=True) / (src * src).sum(-1, keepdim=True)
    assert torch.allclose(r * src + edit, tgt, atol=1e-5)


def test_projection_alpha_one_beta_zero_is_source(pair):
    src, tgt = pair
    assert torch.allclose(project(src, tgt, 1.0, 0.0), src)


def test_merge_dispatches_on_mode(pair):
    src, tgt = pair
    assert torch.equal(merge(src, tgt, {"mode": "subtract", "gamma": 0.7}), subtract(src, tgt, 0.7))
    assert torch.equal(merge(src, tgt, {"mode": "project", "alpha": 0.8, "beta": 1.2}), project(src, tgt, 0.8, 1.2))
    with pytest.raises(InputError, match="subtract' or 'project"):
        merge(src, tgt, {"mode": "add"})


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf, "1.0", None, True])
def test_non_finite_or_non_numeric_coefficients_are_refused(pair, bad):
    src, tgt = pair
    with pytest.raises(InputError, match="gamma must be a finite number"):
        subtract(src, tgt, bad)
    with pytest.raises(InputError, match="alpha must be a finite number"):
        project(src, tgt, bad, 1.0)
    with pytest.raises(InputError, match="beta must be a finite number"):
        project(src, tgt, 1.0, bad)
