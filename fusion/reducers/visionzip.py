"""VisionZip: dominant tokens by importance, plus contextual tokens merged from the rest
(Yang et al., "VisionZip: Longer is Better but Not Necessary in Vision Language Models",
arXiv 2412.04467).

Of a budget of ``k`` tokens, ``k_c = round(k * contextual_fraction)`` are contextual and
``k_d = k - k_c`` dominant (the paper's 54 + 10 of 64 is the default fraction, 10/64)::

    importance (N,) = the token's L2 norm (the paper: the attention the CLS token pays it; an
        expert map carries no attention, and high-norm tokens are where attention gathers)
    dominant = top k_d by importance, in image order
    rest (m tokens, image order) --targets: every (m // k_c)-th token, k_c of them-->
        each other token joins the target of highest cosine similarity;
        contextual_j = target_j + mean(tokens that joined j)   (the released code's rule)
    out = [dominant, contextual]  (k tokens)

Padding is never dominant, never a target and never joins one; a sample with at most ``k``
valid tokens keeps them all. Gradients reach the kept and merged tokens.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fusion.reducers.base import Reduced, TokenReducer, pad_slots, register_reducer


@register_reducer("visionzip")
class VisionZip(TokenReducer):
    """Dominant + contextual tokens (see the module docstring).

    Args:
        k: the budget.
        contextual_fraction: share of ``k`` given to contextual tokens, in ``[0, 1)``.
    """

    def __init__(self, k: int, contextual_fraction: float = 10 / 64) -> None:
        super().__init__(k)
        if not 0 <= float(contextual_fraction) < 1:
            raise ValueError(
                f"reducer 'visionzip': contextual_fraction must be in [0, 1), got "
                f"{contextual_fraction!r}"
            )
        self.k_contextual = min(round(k * float(contextual_fraction)), k - 1)
        self.k_dominant = k - self.k_contextual

    def _one(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One sample's valid tokens ``x (m, C)``, ``m > k``: ``(k, C)`` and slots ``(m,)``."""
        m = x.shape[0]
        importance = x.detach().norm(dim=-1)  # (m,)
        order = torch.argsort(importance, descending=True, stable=True)
        dominant = order[: self.k_dominant].sort().values  # (k_d,)
        is_rest = torch.ones(m, dtype=torch.bool, device=x.device)
        is_rest[dominant] = False
        rest = is_rest.nonzero().squeeze(1)  # (m - k_d,) image order
        slot = torch.full((m,), -1, dtype=torch.long, device=x.device)
        slot[dominant] = torch.arange(self.k_dominant, device=x.device)
        kc = self.k_contextual
        if kc == 0:
            return x[dominant], slot
        step = max(1, len(rest) // kc)
        t_local = torch.arange(0, len(rest), step, device=x.device)[:kc]  # (kc,)
        is_target = torch.zeros(len(rest), dtype=torch.bool, device=x.device)
        is_target[t_local] = True
        targets, others = rest[t_local], rest[~is_target]
        sim = F.normalize(x[others].detach(), dim=-1) @ F.normalize(x[targets].detach(), dim=-1).T
        join = sim.argmax(dim=1)  # (m_o,) target index of each other token
        one_hot = F.one_hot(join, kc).to(x.dtype)  # (m_o, kc)
        counts = one_hot.sum(0).clamp(min=1)[:, None]  # (kc, 1)
        contextual = x[targets] + one_hot.T @ x[others] / counts  # (kc, C)
        slot[targets] = self.k_dominant + torch.arange(kc, device=x.device)
        slot[others] = self.k_dominant + join
        return torch.cat([x[dominant], contextual]), slot

    def reduce(self, x: torch.Tensor, mask: torch.Tensor, query: torch.Tensor | None) -> Reduced:
        rows, masks, slots = [], [], []
        for xb, mb in zip(x, mask):
            valid = mb.nonzero().squeeze(1)
            if len(valid) > self.k:
                kept, slot = self._one(xb[valid])
            else:
                kept, slot = xb[valid], torch.arange(len(valid), device=x.device)
            tokens, out_mask = pad_slots(kept, self.k)
            assignment = torch.full_like(mb, -1, dtype=torch.long)
            assignment[valid] = slot
            rows.append(tokens), masks.append(out_mask), slots.append(assignment)
        return Reduced(torch.stack(rows), torch.stack(masks), torch.stack(slots))
