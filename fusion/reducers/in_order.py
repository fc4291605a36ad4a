"""In-order selection: keep the first ``k`` valid tokens, in sequence order.

The tile budget of dynamic tiling (InternVL 1.5, arXiv 2404.16821; Eagle 2.5's budgeted tiles,
arXiv 2504.15271, in its simplest form): with a tiled expert's tokens in tile order
(``compressor: pixel_shuffle`` with ``token_order: tiles``), the first ``k = tiles x tokens per
tile`` valid tokens are whole tiles, taken while the budget lasts, and the padding cells of a
stitched canvas (masked) are never kept. The thumbnail is its own run and keeps its tokens
unless it is budgeted too. With a budget at least the valid tokens, nothing but padding goes.
"""

from __future__ import annotations

import torch

from fusion.reducers.base import Reduced, TokenReducer, register_reducer, select


@register_reducer("in_order")
class InOrder(TokenReducer):
    """The first ``k`` valid tokens (see the module docstring)."""

    def reduce(self, x: torch.Tensor, mask: torch.Tensor, query: torch.Tensor | None) -> Reduced:
        n = x.shape[1]
        scores = -torch.arange(n, device=x.device, dtype=torch.float32).expand(x.shape[0], n)
        return select(x, mask, scores, self.k)
