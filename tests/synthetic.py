"""Test helpers: hand-made expert specs for fusion tests that need no real expert, and a tiny
model whose answers depend on the pixels."""

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


def seeing_model(config):  # noqa: ANN001, ANN201 - ModelConfig -> MoEVisionModel
    """A model whose greedy answers depend on the pixels: the LLM's and projector's matrices are
    redrawn with std 0.3 (at the default 0.02 init the tiny LLM answers "\\n" to everything)."""
    import torch

    from moe_vision.model.mllm import MoEVisionModel

    torch.manual_seed(0)
    model = MoEVisionModel.from_config(config).eval()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for module in (model.llm, model.projector):
            for p in module.parameters():
                if p.dim() >= 2:
                    p.normal_(0.0, 0.3, generator=gen)
    return model
