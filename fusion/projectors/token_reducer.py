"""C-Abstractor: a locality-preserving, token-reducing projector.

Honeybee (Cha et al., "Honeybee: Locality-enhanced Projector for Multimodal LLM",
arXiv 2312.06742) replaces the resampler's learned queries by convolutions, so spatial context
survives the reduction::

    tokens (B, h*w, D_in) --reshape--> (B, D_in, h, w)
      --RegStage x depth (ResNet bottlenecks, SiLU, LayerNorm2d)--> (B, D_hid, h, w)
      --AdaptiveAvgPool2d--> (B, D_hid, h', w')
      --RegStage x depth--> (B, D_hid, h', w') --flatten--> (B, h'*w', D_hid)
      --Linear-GELU-Linear (readout)--> (B, h'*w', D_out)

The blocks are timm's RegNet stage (``timm.models.regnet.RegStage``), as in Honeybee. The output
grid is ``out_grid`` or ``ceil(h / factor), ceil(w / factor)``: the token count drops by about
``factor**2``. The projector needs the fused tokens' grid (``Fusion.out_grid``).
"""

from __future__ import annotations

import functools
import math

import torch
from timm.layers import LayerNorm2d
from timm.models.regnet import RegStage
from torch import nn

from fusion.projectors.linear import check_dims, check_tokens
from fusion.registry import register_projector


class CAbstractor(nn.Module):
    """Conv + adaptive pooling projector; ``num_tokens(h*w) == h'*w'``."""

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        grid: tuple[int, int],
        factor: int = 2,
        out_grid: tuple[int, int] | None = None,
        depth: int = 1,
        hidden_dim: int | None = None,
    ) -> None:
        super().__init__()
        check_dims("cabstractor", in_dim, out_dim)
        if grid is None or len(grid) != 2 or min(grid) < 1:
            raise ValueError(
                "projector 'cabstractor' needs the token grid (H, W) of its input "
                f"(the fusion's out_grid), got {grid!r}"
            )
        if out_grid is None:
            if not isinstance(factor, int) or factor < 1:
                raise ValueError(
                    f"projector 'cabstractor': factor must be a positive int, got {factor!r}"
                )
            out_grid = (math.ceil(grid[0] / factor), math.ceil(grid[1] / factor))
        if len(out_grid) != 2 or not (1 <= out_grid[0] <= grid[0] and 1 <= out_grid[1] <= grid[1]):
            raise ValueError(
                f"projector 'cabstractor': out_grid {out_grid!r} must be within 1..{tuple(grid)}"
            )
        if not isinstance(depth, int) or depth < 0:
            raise ValueError(f"projector 'cabstractor': depth must be an int >= 0, got {depth!r}")
        self.in_dim, self.out_dim = in_dim, out_dim
        self.grid = (int(grid[0]), int(grid[1]))
        self.out_grid = (int(out_grid[0]), int(out_grid[1]))
        hidden = hidden_dim or out_dim
        stage = functools.partial(
            RegStage, stride=1, dilation=1, act_layer=nn.SiLU, norm_layer=LayerNorm2d
        )
        self.net = nn.Sequential(
            stage(depth, in_dim, hidden) if depth else nn.Conv2d(in_dim, hidden, 1),
            nn.AdaptiveAvgPool2d(self.out_grid),
            stage(depth, hidden, hidden) if depth else nn.Identity(),
        )
        self.readout = nn.Sequential(
            nn.Linear(hidden, out_dim), nn.GELU(), nn.Linear(out_dim, out_dim)
        )

    def num_tokens(self, n: int) -> int:
        """Tokens out for ``n == H*W`` tokens in: ``h' * w'``."""
        if n != self.grid[0] * self.grid[1]:
            raise ValueError(
                f"projector 'cabstractor' was built for a {self.grid} grid "
                f"({self.grid[0] * self.grid[1]} tokens), got {n} tokens"
            )
        return self.out_grid[0] * self.out_grid[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, H*W, D_in) -> (B, h'*w', D_out)``."""
        check_tokens("cabstractor", x, self.in_dim)
        self.num_tokens(x.shape[1])
        b = x.shape[0]
        fmap = x.transpose(1, 2).reshape(b, self.in_dim, *self.grid)  # (B, D_in, H, W)
        y = self.net(fmap)  # (B, D_hid, h', w')
        return self.readout(y.flatten(2).transpose(1, 2))  # (B, h'*w', D_out)


@register_projector("cabstractor")
def build_cabstractor(
    in_dim: int,
    out_dim: int,
    grid: tuple[int, int] | None = None,
    factor: int = 2,
    out_grid: tuple[int, int] | None = None,
    depth: int = 1,
    hidden_dim: int | None = None,
) -> CAbstractor:
    """Honeybee's C-Abstractor; needs ``grid``, reduces each side by ``factor``."""
    return CAbstractor(in_dim, out_dim, grid, factor, out_grid, depth, hidden_dim)
