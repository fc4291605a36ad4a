"""Linear projector (LLaVA, Liu et al., arXiv 2304.08485): ``(B, N, D_in) -> (B, N, D_out)``."""

from __future__ import annotations

import torch
from torch import nn

from fusion.registry import register_projector


def check_dims(name: str, in_dim: int, out_dim: int) -> None:
    """Raise ``ValueError`` unless both widths are positive integers."""
    for label, v in (("in_dim", in_dim), ("out_dim", out_dim)):
        if not isinstance(v, int) or v < 1:
            raise ValueError(f"projector {name!r}: {label} must be a positive int, got {v!r}")


def check_tokens(name: str, x: torch.Tensor, in_dim: int) -> None:
    """Raise ``ValueError`` unless ``x`` is ``(B, N, in_dim)``."""
    if x.dim() != 3 or x.shape[-1] != in_dim:
        raise ValueError(
            f"projector {name!r} expects tokens (B, N, {in_dim}), got {tuple(x.shape)}"
        )


class LinearProjector(nn.Module):
    """One ``nn.Linear``; keeps the token count."""

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        check_dims("linear", in_dim, out_dim)
        self.in_dim, self.out_dim = in_dim, out_dim
        self.proj = nn.Linear(in_dim, out_dim)

    def num_tokens(self, n: int) -> int:
        """Tokens out for ``n`` tokens in: ``n``."""
        return n

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, N, D_in) -> (B, N, D_out)``."""
        check_tokens("linear", x, self.in_dim)
        return self.proj(x)


@register_projector("linear")
def build_linear(in_dim: int, out_dim: int, grid: tuple[int, int] | None = None) -> LinearProjector:
    """The linear projector; ``grid`` is accepted for a uniform signature and not needed."""
    return LinearProjector(in_dim, out_dim)
