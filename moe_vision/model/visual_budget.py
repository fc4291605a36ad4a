"""What a visual-token budget needs to know about a built model: its runs of visual tokens,
their validity masks, and the prompt's mean embedding (for text-guided reducers).

:class:`~moe_vision.model.mllm.MoEVisionModel` applies ``config.token_budget``
(:mod:`fusion.reducers.budget`) after the projector, run by run::

    maps --fusion--> (B, N, D) --compressor--> --projector--> (B, N', D_llm)
         runs: the fusion's token grids, each compressed on its own (one per map under
         sequence_append, one "image" run under channel_concat or a grid-changing projector)
    masks: a run that is one map on its own grid takes the map's validity mask (a tiled
         expert's padding tiles, a ragged Pix2Struct map), carried through the compressor
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from experts import FeatureMap
from fusion.projectors.compressors import TokenCompressor, create_compressor
from moe_vision.data.records import IGNORE_INDEX

if TYPE_CHECKING:
    from moe_vision.model.mllm import MoEVisionModel


def compressor_for(model: MoEVisionModel, dim: int, grid: tuple[int, int]) -> TokenCompressor:
    """The model's compressor (``config.compressor``) for one run on ``grid`` of width ``dim``."""
    options = dict(model.config.compressor_options)
    return create_compressor(model.config.compressor, dim, grid[0] * grid[1], [grid], **options)


def visual_runs(model: MoEVisionModel) -> tuple[list[int], list[str]]:
    """Sizes and names of the runs of visual tokens a budget splits: the fusion's runs after
    the compressor, named by their map's spec (``<expert>``, ``<expert>:thumbnail``) when there
    is one run per map, else one run ``"image"`` (or ``run<i>``)."""
    grids = model.fusion.token_grids
    n_in = model.compressor.num_tokens
    if grids is None or model.projector.num_tokens(n_in) != n_in:  # not token by token
        return [model.num_visual_tokens], ["image"]
    sizes = [compressor_for(model, 1, g).num_tokens for g in grids]
    if len(grids) == len(model.fusion.specs):
        return sizes, [s.name for s in model.fusion.specs]
    if len(grids) == 1:
        return sizes, ["image"]
    return sizes, [f"run{i}" for i in range(len(grids))]


def run_masks(
    model: MoEVisionModel, maps: Sequence[FeatureMap]
) -> list[torch.Tensor | None] | None:
    """Per run, ``(B, n_i)`` validity of its compressed tokens (a token is valid when any of
    its cells is), or ``None`` where the run's tokens are all valid or not one map's cells."""
    grids = model.fusion.token_grids
    if grids is None or len(grids) != len(maps) or len(model.budget.sizes) != len(maps):
        return None
    masks: list[torch.Tensor | None] = []
    for fmap, grid in zip(maps, grids):
        if fmap.mask is None or tuple(fmap.mask.shape[1:]) != tuple(grid):
            masks.append(None)
            continue
        cells = fmap.mask.flatten(1).float()[..., None]  # (B, h*w, 1)
        masks.append(compressor_for(model, 1, grid)(cells).amax(-1) > 0)  # (B, n_i)
    return masks


def prompt_query(
    model: MoEVisionModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
) -> torch.Tensor:
    """The mean input embedding of each image's prompt ``(M, D_llm)``, images in row order: the
    row's text tokens under the attention mask, without the answer (``labels`` other than
    ``-100``) and without placeholders. ``input_ids (B, T)``."""
    embeds = model.llm.get_input_embeddings()(input_ids)  # (B, T, D)
    is_image = input_ids == model.image_token_id
    use = ~is_image
    if attention_mask is not None:
        use &= attention_mask.bool()
    if labels is not None:
        use &= labels == IGNORE_INDEX
    mean = (embeds * use[..., None]).sum(1) / use.sum(1).clamp(min=1)[:, None]  # (B, D)
    return mean.repeat_interleave(is_image.sum(1), dim=0)  # (M, D)
