"""The one attention function every fusion module calls.

``attention(q, k, v, mask)`` dispatches to xformers' memory-efficient attention when the
tensors live on CUDA and xformers is installed (``pip install moe-vision[gpu]``), and to
PyTorch's ``scaled_dot_product_attention`` otherwise (CPU, or no xformers). Both compute
``softmax(q k^T / sqrt(d) + bias) v``; the layouts differ (xformers wants ``(B, N, H, d)``),
which this module hides.
"""

from __future__ import annotations

import functools
import importlib.util
import logging

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)


@functools.cache
def xformers_available() -> bool:
    """True when ``xformers.ops`` can be imported."""
    if importlib.util.find_spec("xformers") is None:
        return False
    try:
        import xformers.ops  # noqa: F401
    except Exception as err:  # a broken install must not break the CPU path
        logger.warning("xformers is installed but cannot be imported (%s); using SDPA", err)
        return False
    return True


def select_backend(q: torch.Tensor) -> str:
    """``"xformers"`` for CUDA tensors when xformers is available, else ``"sdpa"``."""
    return "xformers" if q.is_cuda and xformers_available() else "sdpa"


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(
            "attention expects q, k, v of shape (B, heads, N, d); got "
            f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    if k.shape[:3] != v.shape[:3] or q.shape[-1] != k.shape[-1] or q.shape[:2] != k.shape[:2]:
        raise ValueError(
            f"attention: incompatible shapes q {tuple(q.shape)}, k {tuple(k.shape)}, "
            f"v {tuple(v.shape)}"
        )
    if mask is not None and mask.dtype != torch.bool:
        raise ValueError(f"attention: mask must be bool (True = attend), got {mask.dtype}")


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    backend: str | None = None,
) -> torch.Tensor:
    """Scaled dot-product attention.

    Args:
        q: ``(B, heads, Nq, d)``.
        k: ``(B, heads, Nk, d)``.
        v: ``(B, heads, Nk, dv)``.
        mask: optional bool, broadcastable to ``(B, heads, Nq, Nk)``; True where a query may
            attend. A query with no allowed key gets zeros (not NaN).
        dropout_p: attention dropout (pass 0 at eval).
        backend: force ``"sdpa"`` or ``"xformers"``; ``None`` picks with :func:`select_backend`.

    Returns:
        ``(B, heads, Nq, dv)``.
    """
    _check(q, k, v, mask)
    backend = backend or select_backend(q)
    if backend not in ("sdpa", "xformers"):
        raise ValueError(f"unknown attention backend {backend!r}; expected 'sdpa' or 'xformers'")
    empty_rows = None
    bias = None
    if mask is not None:
        mask = mask.expand(q.shape[0], q.shape[1], q.shape[2], k.shape[2])
        empty_rows = ~mask.any(-1, keepdim=True)
        # Let fully-masked rows attend everywhere, then zero them: avoids NaN from softmax.
        mask = mask | empty_rows
        bias = torch.zeros(mask.shape, dtype=q.dtype, device=q.device)
        bias = bias.masked_fill(~mask, float("-inf"))
    if backend == "xformers":
        import xformers.ops as xops

        if bias is not None:
            # xformers wants a bias whose last dim is padded to a multiple of 8 in memory.
            nk = bias.shape[-1]
            pad = (-nk) % 8
            bias = F.pad(bias, (0, pad))[..., :nk]
        out = xops.memory_efficient_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_bias=bias, p=dropout_p
        ).transpose(1, 2)
    else:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout_p)
    if empty_rows is not None:
        out = out.masked_fill(empty_rows, 0.0)
    return out
