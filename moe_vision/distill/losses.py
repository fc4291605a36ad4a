"""Per-teacher distillation losses (AM-RADIO, arXiv 2312.06709, section 3.3).

* summary: ``1 - cos(student summary, teacher summary)``, averaged over the batch;
* spatial: ``1 - cos`` per cell plus smooth-L1 per cell (``torch.nn.functional.smooth_l1_loss``
  with ``beta``, averaged over channels), both averaged over the valid cells of the teacher's
  map (a ``(B, H, W)`` mask for ragged grids).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def summary_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cosine loss of ``pred`` and ``target`` ``(B, C)``: mean of ``1 - cos``."""
    return (1 - F.cosine_similarity(pred, target, dim=-1)).mean()


def spatial_losses(
    pred: torch.Tensor,
    target: torch.Tensor,
    mask: torch.Tensor | None = None,
    beta: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cosine and smooth-L1 losses of two maps ``(B, C, H, W)`` over the valid cells.

    Args:
        pred: the adaptor's map.
        target: the teacher's map (same shape).
        mask: ``(B, H, W)`` bool, True where the teacher's cell is real (``None``: all).
        beta: smooth-L1's switch from quadratic to linear.

    Returns:
        ``(cosine, smooth_l1)``: mean over valid cells of ``1 - cos`` over channels, and of the
        per-cell mean over channels of smooth-L1.
    """
    if pred.shape != target.shape:
        raise ValueError(f"spatial loss: pred {tuple(pred.shape)} != target {tuple(target.shape)}")
    cos = 1 - F.cosine_similarity(pred, target, dim=1)  # (B, H, W)
    l1 = F.smooth_l1_loss(pred, target, reduction="none", beta=beta).mean(1)  # (B, H, W)
    if mask is None:
        return cos.mean(), l1.mean()
    m = mask.to(cos.dtype)
    n = m.sum().clamp_min(1.0)
    return (cos * m).sum() / n, (l1 * m).sum() / n
