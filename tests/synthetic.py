"""Hand-made expert specs for fusion tests that need no real expert."""

from __future__ import annotations

from experts.spec import Architecture, ExpertSpec


def synthetic_spec(
    name: str,
    channels: int,
    grid: tuple[int, int],
    *,
    stride: int = 4,
    architecture: Architecture = "vit",
    ragged: bool = False,
) -> ExpertSpec:
    """An :class:`ExpertSpec` with ``channels`` x ``grid`` output at ``stride`` pixels per cell."""
    return ExpertSpec(
        name=name,
        family=name,
        library="test",
        role="alignment",
        architecture=architecture,
        checkpoint=None,
        input_size=(grid[0] * stride, grid[1] * stride),
        patch_size=stride,
        channels=channels,
        grid=grid,
        mean=(0.5, 0.5, 0.5),
        std=(0.5, 0.5, 0.5),
        variable_resolution=ragged,
    )
