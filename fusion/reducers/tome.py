"""ToMe: bipartite soft matching, merging the most similar tokens (Bolya et al., "Token Merging:
Your ViT But Faster", arXiv 2210.09461).

One step on ``n`` tokens merges ``r`` of them away::

    tokens (n, C) --alternate--> A = tokens 0, 2, 4, ...   B = tokens 1, 3, 5, ...
    score(a, b) = cos(a, b); each a's match m(a) = argmax_b score(a, b)
    the r tokens a with the highest score(a, m(a)) merge into m(a):
        x_m <- (s_m x_m + sum s_a x_a) / (s_m + sum s_a),  s_m <- s_m + sum s_a   (sizes s, start 1)
    -> n - r tokens

Steps repeat with ``r = min(n - k, n // 2)`` until ``k`` tokens remain (ToMe merges r per layer;
here the budget is reached on the expert's tokens at once). Two choices of ours: the similarity
is taken on the tokens themselves (ToMe uses the attention keys, which a map does not have), and
the output keeps the image's token order (each merged token sits where its earliest member
was; ToMe concatenates unmerged A, then B), since the LLM reads positions. Padding is set aside
before merging (it never joins a merge) and fills the masked trailing slots.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fusion.reducers.base import Reduced, TokenReducer, pad_slots, register_reducer


def bipartite_merge_step(
    x: torch.Tensor, size: torch.Tensor, pos: torch.Tensor, r: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One ToMe step on ``x (B, n, C)`` with sizes ``size (B, n)`` and earliest positions
    ``pos (B, n)``: merge ``r`` tokens away. Returns the new ``x, size, pos`` ``(B, n - r, .)``
    and ``where (B, n)``, the new index of each old token."""
    b, n, c = x.shape
    xa, xb = x[:, ::2], x[:, 1::2]  # (B, na, C), (B, nb, C)
    sa, sb, pa, pb = size[:, ::2], size[:, 1::2], pos[:, ::2], pos[:, 1::2]
    scores = F.normalize(xa, dim=-1) @ F.normalize(xb, dim=-1).transpose(1, 2)  # (B, na, nb)
    best, match = scores.max(dim=-1)  # (B, na)
    order = torch.argsort(best, dim=1, descending=True, stable=True)
    src, unm = order[:, :r], order[:, r:]  # (B, r), (B, na - r)
    dst = match.gather(1, src)  # (B, r) index into B
    s_src = sa.gather(1, src)
    x_src = xa.gather(1, src[..., None].expand(-1, -1, c)) * s_src[..., None]
    sb_new = sb.scatter_add(1, dst, s_src)
    xb_new = (xb * sb[..., None]).scatter_add(1, dst[..., None].expand(-1, -1, c), x_src)
    xb_new = xb_new / sb_new[..., None]
    pb_new = pb.scatter_reduce(1, dst, pa.gather(1, src), reduce="amin")
    # survivors: unmerged A tokens, then every B token; back into image order by position
    x_all = torch.cat([xa.gather(1, unm[..., None].expand(-1, -1, c)), xb_new], dim=1)
    s_all = torch.cat([sa.gather(1, unm), sb_new], dim=1)
    p_all = torch.cat([pa.gather(1, unm), pb_new], dim=1)
    perm = p_all.argsort(dim=1)  # positions are distinct
    rank = perm.argsort(dim=1)  # survivor -> its new index
    # where each old token went: A tokens via unm / their dst, B tokens directly
    na = xa.shape[1]
    a_slot = torch.empty(b, na, dtype=torch.long, device=x.device)
    a_slot.scatter_(1, unm, rank[:, : unm.shape[1]])
    b_rank = rank[:, unm.shape[1] :]  # (B, nb)
    a_slot.scatter_(1, src, b_rank.gather(1, dst))
    where = torch.empty(b, n, dtype=torch.long, device=x.device)
    where[:, ::2], where[:, 1::2] = a_slot, b_rank
    return (
        x_all.gather(1, perm[..., None].expand(-1, -1, c)),
        s_all.gather(1, perm),
        p_all.gather(1, perm),
        where,
    )


def merge_to(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """ToMe steps on ``x (B, n, C)`` (every token valid) until ``k`` remain: the merged
    tokens ``(B, k, C)`` and each input token's slot ``(B, n)``."""
    b, n, _ = x.shape
    size = x.new_ones(b, n)
    pos = torch.arange(n, device=x.device).expand(b, n)
    slot = pos.clone()
    while x.shape[1] > k:
        r = min(x.shape[1] - k, x.shape[1] // 2)
        x, size, pos, where = bipartite_merge_step(x, size, pos, r)
        slot = where.gather(1, slot)
    return x, slot


@register_reducer("tome")
class ToMe(TokenReducer):
    """Bipartite soft matching down to ``k`` tokens (see the module docstring); no options."""

    def reduce(self, x: torch.Tensor, mask: torch.Tensor, query: torch.Tensor | None) -> Reduced:
        if bool(mask.all()):
            tokens, slot = merge_to(x, self.k)
            return Reduced(tokens, torch.ones_like(slot[:, : self.k], dtype=torch.bool), slot)
        rows, masks, slots = [], [], []
        for xb, mb in zip(x, mask):  # ragged: each sample's valid tokens on their own
            valid = mb.nonzero().squeeze(1)  # (v,)
            merged, slot = merge_to(xb[valid][None], min(self.k, len(valid)))
            tokens, out_mask = pad_slots(merged[0], self.k)
            assignment = torch.full_like(mb, -1, dtype=torch.long)
            assignment[valid] = slot[0]
            rows.append(tokens), masks.append(out_mask), slots.append(assignment)
        return Reduced(torch.stack(rows), torch.stack(masks), torch.stack(slots))
