"""Projectors: shapes, ``num_tokens``, numerics of the simple ones, and errors on bad input."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fusion


def test_registry_lists_the_projectors():
    assert {"linear", "mlp2x_gelu", "cabstractor"} <= set(fusion.list_projectors())
    with pytest.raises(KeyError, match="valid projectors are: .*linear"):
        fusion.create_projector("mlp9x", 4, 8)


def test_linear_is_one_affine_map():
    proj = fusion.create_projector("linear", 6, 10)
    x = torch.randn(2, 5, 6)
    (layer,) = [m for m in proj.modules() if isinstance(m, nn.Linear)]
    torch.testing.assert_close(proj(x), x @ layer.weight.T + layer.bias)
    assert proj.num_tokens(5) == 5


def test_mlp2x_gelu_is_linear_gelu_linear():
    proj = fusion.create_projector("mlp2x_gelu", 6, 10)
    lin1, lin2 = [m for m in proj.modules() if isinstance(m, nn.Linear)]
    assert (lin1.in_features, lin1.out_features, lin2.out_features) == (6, 10, 10)
    x = torch.randn(2, 5, 6)
    expected = lin2(torch.nn.functional.gelu(lin1(x)))
    torch.testing.assert_close(proj(x), expected)
    assert proj.num_tokens(7) == 7


@pytest.mark.parametrize(
    ("grid", "options", "out_grid"),
    [((8, 8), {}, (4, 4)), ((7, 5), {"factor": 2}, (4, 3)), ((6, 6), {"out_grid": (2, 3)}, (2, 3))],
)
def test_cabstractor_reduces_tokens(grid, options, out_grid):
    proj = fusion.create_projector("cabstractor", 12, 16, grid=grid, **options)
    n = grid[0] * grid[1]
    x = torch.randn(2, n, 12, requires_grad=True)
    y = proj(x)
    assert y.shape == (2, out_grid[0] * out_grid[1], 16)
    assert proj.num_tokens(n) == out_grid[0] * out_grid[1]
    y.sum().backward()
    assert x.grad.abs().sum() > 0
    assert all(p.grad is not None for p in proj.parameters())


def test_projector_errors():
    with pytest.raises(ValueError, match="needs the token grid"):
        fusion.create_projector("cabstractor", 4, 8)
    with pytest.raises(ValueError, match="out_grid"):
        fusion.create_projector("cabstractor", 4, 8, grid=(4, 4), out_grid=(5, 1))
    proj = fusion.create_projector("cabstractor", 4, 8, grid=(4, 4))
    with pytest.raises(ValueError, match="built for a \\(4, 4\\) grid"):
        proj(torch.randn(1, 15, 4))
    with pytest.raises(ValueError, match=r"expects tokens \(B, N, 4\)"):
        fusion.create_projector("linear", 4, 8)(torch.randn(2, 3, 5))
    with pytest.raises(ValueError, match="in_dim must be a positive int"):
        fusion.create_projector("mlp2x_gelu", 0, 8)
