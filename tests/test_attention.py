"""The one attention function: SDPA fallback vs a manual softmax, and backend selection."""

from __future__ import annotations

import importlib
import sys
import types

import pytest
import torch

# ``fusion.attention`` the attribute is the function (re-exported by ``fusion/__init__``);
# the module is reached through importlib.
fa = importlib.import_module("fusion.attention")


def reference(q, k, v, mask=None):
    """softmax(q k^T / sqrt(d)) v with an explicit loop-free formula; empty rows -> 0."""
    scores = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    if mask is None:
        return scores.softmax(-1) @ v
    mask = mask.expand_as(scores)
    scores = scores.masked_fill(~mask, float("-inf"))
    weights = torch.nan_to_num(scores.softmax(-1), nan=0.0)
    return weights @ v


def test_sdpa_matches_manual_softmax_without_mask():
    q, k, v = torch.randn(2, 3, 5, 8), torch.randn(2, 3, 7, 8), torch.randn(2, 3, 7, 4)
    out = fa.attention(q, k, v, backend="sdpa")
    assert out.shape == (2, 3, 5, 4)
    torch.testing.assert_close(out, reference(q, k, v), rtol=1e-5, atol=1e-5)


def test_sdpa_matches_manual_softmax_with_mask_and_empty_rows():
    q, k, v = torch.randn(2, 3, 5, 8), torch.randn(2, 3, 7, 8), torch.randn(2, 3, 7, 8)
    mask = torch.rand(2, 1, 5, 7) > 0.4
    mask[0, 0, 2] = False  # a fully masked query row
    mask[1, 0, 0] = False
    mask[1, 0, 1] = True
    out = fa.attention(q, k, v, mask)
    torch.testing.assert_close(out, reference(q, k, v, mask), rtol=1e-5, atol=1e-5)
    assert torch.all(out[0, :, 2] == 0) and torch.all(out[1, :, 0] == 0)
    assert torch.isfinite(out).all()


def test_fully_masked_rows_get_zero_gradient_and_no_nan():
    q = torch.randn(1, 1, 3, 4, requires_grad=True)
    k, v = torch.randn(1, 1, 2, 4), torch.randn(1, 1, 2, 4, requires_grad=True)
    mask = torch.tensor([[True, False], [False, False], [True, True]])
    fa.attention(q, k, v, mask).sum().backward()
    assert torch.isfinite(q.grad).all() and torch.all(q.grad[0, 0, 1] == 0)
    assert v.grad.abs().sum() > 0


def test_bad_inputs_raise_clear_errors():
    q = torch.randn(2, 3, 5, 8)
    with pytest.raises(ValueError, match=r"\(B, heads, N, d\)"):
        fa.attention(q[0], q[0], q[0])
    with pytest.raises(ValueError, match="incompatible shapes"):
        fa.attention(q, torch.randn(2, 3, 5, 4), torch.randn(2, 3, 5, 8))
    with pytest.raises(ValueError, match="mask must be bool"):
        fa.attention(q, q, q, torch.ones(5, 5))
    with pytest.raises(ValueError, match="unknown attention backend"):
        fa.attention(q, q, q, backend="flash")


class _FakeCudaTensor:
    """Stands in for a CUDA tensor in backend selection (no GPU needed)."""

    is_cuda = True


def test_xformers_selected_only_on_cuda(monkeypatch):
    cpu = torch.randn(1, 1, 2, 4)
    monkeypatch.setattr(fa, "xformers_available", lambda: True)
    assert fa.select_backend(cpu) == "sdpa"
    assert fa.select_backend(_FakeCudaTensor()) == "xformers"
    monkeypatch.setattr(fa, "xformers_available", lambda: False)
    assert fa.select_backend(_FakeCudaTensor()) == "sdpa"
    assert fa.select_backend(cpu) == "sdpa"


def test_xformers_path_layout_and_bias(monkeypatch):
    """The xformers branch passes (B, N, heads, d) tensors and an additive bias; a fake
    ``xformers.ops`` computing the reference in that layout must reproduce the result."""
    calls = []

    def memory_efficient_attention(q, k, v, attn_bias=None, p=0.0):
        calls.append((q.shape, attn_bias is not None))
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / q.shape[-1] ** 0.5
        if attn_bias is not None:
            scores = scores + attn_bias
        return torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v)

    ops = types.ModuleType("xformers.ops")
    ops.memory_efficient_attention = memory_efficient_attention
    pkg = types.ModuleType("xformers")
    pkg.ops = ops
    monkeypatch.setitem(sys.modules, "xformers", pkg)
    monkeypatch.setitem(sys.modules, "xformers.ops", ops)
    q, k, v = torch.randn(2, 3, 5, 8), torch.randn(2, 3, 7, 8), torch.randn(2, 3, 7, 8)
    mask = torch.rand(2, 3, 5, 7) > 0.3
    mask[0, 1, 4] = False
    out = fa.attention(q, k, v, mask, backend="xformers")
    assert calls == [(torch.Size([2, 5, 3, 8]), True)]
    torch.testing.assert_close(out, reference(q, k, v, mask), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out, fa.attention(q, k, v, mask, backend="sdpa"))
