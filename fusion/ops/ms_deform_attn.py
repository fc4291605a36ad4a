"""Multi-scale deformable attention core, pure PyTorch (Deformable DETR, arXiv 2010.04159).

Zhu et al., *Deformable DETR: Deformable Transformers for End-to-End Object Detection*, ICLR
2021. Each query attends to a handful of points per head and per level: the value at every
sampling location is read with bilinear interpolation (``grid_sample``, zeros outside the
map) and the samples are summed with the query's attention weights::

    value               (B, S, heads, d)       S = sum_l H_l * W_l, levels flattened row-major
    value_spatial_shapes (L, 2)                (H_l, W_l) per level
    sampling_locations  (B, Q, heads, L, P, 2) (x, y) in [0, 1] of each level's extent
    attention_weights   (B, Q, heads, L, P)    usually softmax over L * P
        -> output       (B, Q, heads * d)

This is the portable reference and the default path; the signature follows
``multi_scale_deformable_attention`` of mmcv / transformers' ``MultiScaleDeformableAttention``
(tested equal to the latter), so a faster fused kernel can be swapped in and checked
against it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

Shapes = torch.Tensor | Sequence[Sequence[int]]


def _shapes_list(value_spatial_shapes: Shapes) -> list[tuple[int, int]]:
    if isinstance(value_spatial_shapes, torch.Tensor):
        if value_spatial_shapes.dim() != 2 or value_spatial_shapes.shape[1] != 2:
            raise ValueError(
                "value_spatial_shapes must be (L, 2) = (H_l, W_l) per level, got shape "
                f"{tuple(value_spatial_shapes.shape)}"
            )
        return [(int(h), int(w)) for h, w in value_spatial_shapes.tolist()]
    return [(int(h), int(w)) for h, w in value_spatial_shapes]


def multi_scale_deformable_attention(
    value: torch.Tensor,
    value_spatial_shapes: Shapes,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> torch.Tensor:
    """Bilinear sampling of every level at every location, weighted sum over levels and points.

    Args:
        value: ``(B, S, heads, d)``, the levels' tokens concatenated (row-major within a level).
        value_spatial_shapes: ``(L, 2)`` tensor or list of ``(H_l, W_l)``.
        sampling_locations: ``(B, Q, heads, L, P, 2)``, normalised ``(x, y)``: ``(0, 0)`` is
            the top-left corner of the map, ``(1, 1)`` the bottom-right corner (pixel-centre
            convention of ``grid_sample(align_corners=False)``); outside reads zeros.
        attention_weights: ``(B, Q, heads, L, P)``.

    Returns:
        ``(B, Q, heads * d)``.
    """
    shapes = _shapes_list(value_spatial_shapes)
    if value.dim() != 4:
        raise ValueError(f"value must be (B, S, heads, d), got shape {tuple(value.shape)}")
    b, s, heads, d = value.shape
    if sum(h * w for h, w in shapes) != s:
        raise ValueError(
            f"value has {s} tokens but the spatial shapes {shapes} add up to "
            f"{sum(h * w for h, w in shapes)}"
        )
    if sampling_locations.dim() != 6 or sampling_locations.shape[-1] != 2:
        raise ValueError(
            "sampling_locations must be (B, Q, heads, L, P, 2), got shape "
            f"{tuple(sampling_locations.shape)}"
        )
    _, q, _, levels, points, _ = sampling_locations.shape
    if sampling_locations.shape[:4] != (b, q, heads, len(shapes)):
        raise ValueError(
            f"sampling_locations {tuple(sampling_locations.shape)} does not match value "
            f"(B={b}, heads={heads}) and {len(shapes)} levels"
        )
    if attention_weights.shape != sampling_locations.shape[:-1]:
        raise ValueError(
            "attention_weights must be (B, Q, heads, L, P) = "
            f"{tuple(sampling_locations.shape[:-1])}, got {tuple(attention_weights.shape)}"
        )
    grids = 2 * sampling_locations - 1  # grid_sample wants [-1, 1]
    samples = []
    for level, (v_l, (h, w)) in enumerate(zip(value.split([h * w for h, w in shapes], 1), shapes)):
        # (B, H*W, heads, d) -> (B*heads, d, H, W)
        v_l = v_l.permute(0, 2, 3, 1).reshape(b * heads, d, h, w)
        # (B, Q, heads, P, 2) -> (B*heads, Q, P, 2)
        g_l = grids[:, :, :, level].transpose(1, 2).flatten(0, 1)
        # (B*heads, d, Q, P)
        samples.append(
            F.grid_sample(v_l, g_l, mode="bilinear", padding_mode="zeros", align_corners=False)
        )
    # (B*heads, d, Q, L*P) weighted by (B*heads, 1, Q, L*P)
    stacked = torch.stack(samples, dim=-2).flatten(-2)
    weights = attention_weights.transpose(1, 2).reshape(b * heads, 1, q, levels * points)
    out = (stacked * weights).sum(-1).view(b, heads * d, q)
    return out.transpose(1, 2).contiguous()
