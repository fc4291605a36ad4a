"""Two-layer MLP projector ``mlp2x_gelu`` (LLaVA-1.5, Liu et al., arXiv 2310.03744).

``(B, N, D_in) --Linear--> (B, N, D_out) --GELU--> --Linear--> (B, N, D_out)``; LLaVA-1.5's
connector and the default of Eagle, Cambrian and Prismatic. ``depth`` generalises it to
``mlp{depth}x_gelu``.
"""

from __future__ import annotations

import torch
from torch import nn

from fusion.projectors.linear import check_dims, check_tokens
from fusion.registry import register_projector


class MLPProjector(nn.Module):
    """``depth`` Linear layers with GELU between them; keeps the token count."""

    def __init__(self, in_dim: int, out_dim: int, depth: int = 2) -> None:
        super().__init__()
        check_dims("mlp", in_dim, out_dim)
        if not isinstance(depth, int) or depth < 1:
            raise ValueError(f"projector 'mlp': depth must be a positive int, got {depth!r}")
        self.in_dim, self.out_dim = in_dim, out_dim
        layers: list[nn.Module] = [nn.Linear(in_dim, out_dim)]
        for _ in range(depth - 1):
            layers += [nn.GELU(), nn.Linear(out_dim, out_dim)]
        self.mlp = nn.Sequential(*layers)

    def num_tokens(self, n: int) -> int:
        """Tokens out for ``n`` tokens in: ``n``."""
        return n

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, N, D_in) -> (B, N, D_out)``."""
        check_tokens("mlp", x, self.in_dim)
        return self.mlp(x)


@register_projector("mlp2x_gelu")
def build_mlp2x_gelu(
    in_dim: int, out_dim: int, grid: tuple[int, int] | None = None, depth: int = 2
) -> MLPProjector:
    """LLaVA-1.5's Linear-GELU-Linear; ``grid`` is accepted for a uniform signature."""
    return MLPProjector(in_dim, out_dim, depth=depth)
