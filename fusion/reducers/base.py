"""Token reducers: one run of visual tokens ``(B, N, C)`` with its validity mask to at most ``k``.

A reducer is the per-expert half of a visual-token budget (:mod:`fusion.reducers.budget`). It
maps one run of tokens (one expert's map under ``sequence_append``, the whole fused grid under
``channel_concat``) to exactly ``k`` output slots and says where every input token went::

    tokens (B, N, C), mask (B, N) --reducer(k)--> Reduced(tokens (B, k, C), mask (B, k),
                                                           assignment (B, N))

``assignment[b, n]`` is the output slot that input token ``n`` was kept in or merged into, or
``-1`` when it was dropped; padding (``mask`` False) is always ``-1``: it is never selected,
and it never enters a merge with a valid token. Output slot ``j`` is valid (``mask[b, j]``)
when at least one valid input token went there; with fewer than ``k`` valid tokens every valid
token is kept, in order, and the trailing slots are masked. ``k >= N`` is the identity (the
same tensor back), so a budget of 100% changes nothing.

Reducers register with :func:`register_reducer`; :func:`create_reducer` builds one by name
(``list_reducers()``), refusing unknown names and options with the valid ones listed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from torch import nn

from experts.registry import Registry


@dataclass
class Reduced:
    """A reducer's output.

    Attributes:
        tokens: ``(B, k, C)``.
        mask: ``(B, k)`` bool, True where the slot holds valid tokens.
        assignment: ``(B, N)`` long, the output slot of each input token, ``-1`` if dropped.
    """

    tokens: torch.Tensor
    mask: torch.Tensor
    assignment: torch.Tensor


class TokenReducer(nn.Module):
    """Base class (see the module docstring); subclasses implement :meth:`reduce`.

    Args:
        k: the budget, output slots per sample (a positive int).

    Attributes:
        needs_query: True when :meth:`forward` needs ``query`` (the prompt's mean embedding).
    """

    name = "reducer"
    needs_query = False

    def __init__(self, k: int) -> None:
        super().__init__()
        if not isinstance(k, int) or isinstance(k, bool) or k < 1:
            raise ValueError(f"reducer {self.name!r}: k must be a positive int, got {k!r}")
        self.k = k

    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor | None = None,
        query: torch.Tensor | None = None,
    ) -> Reduced:
        """``x (B, N, C)``, ``mask (B, N)`` bool (``None``: all valid), ``query (B, C)``."""
        if x.dim() != 3:
            raise ValueError(
                f"reducer {self.name!r}: tokens must be (B, N, C), got {tuple(x.shape)}"
            )
        b, n, _ = x.shape
        if mask is None:
            mask = torch.ones(b, n, dtype=torch.bool, device=x.device)
        elif tuple(mask.shape) != (b, n):
            raise ValueError(
                f"reducer {self.name!r}: mask must be (B, N) = {(b, n)}, got {tuple(mask.shape)}"
            )
        mask = mask.bool()
        if self.needs_query and (query is None or tuple(query.shape) != (b, x.shape[2])):
            got = None if query is None else tuple(query.shape)
            raise ValueError(
                f"reducer {self.name!r} needs the prompt's mean embedding, query (B, C) = "
                f"{(b, x.shape[2])}; got {got}"
            )
        if self.k >= n:
            assignment = torch.arange(n, device=x.device).expand(b, n)
            return Reduced(x, mask, torch.where(mask, assignment, -1))
        return self.reduce(x, mask, query)

    def reduce(self, x: torch.Tensor, mask: torch.Tensor, query: torch.Tensor | None) -> Reduced:
        """``x (B, N, C)`` with ``N > k`` -> :class:`Reduced` with ``k`` slots."""
        raise NotImplementedError


def select(x: torch.Tensor, mask: torch.Tensor, scores: torch.Tensor, k: int) -> Reduced:
    """Keep the ``k`` tokens of highest ``scores (B, N)`` (ties: the earlier token), valid
    tokens before padding, in their original order: the selection reducers' shared rule."""
    scores = scores.masked_fill(~mask, float("-inf"))
    # rank valid tokens by score, padding last (stable: ties keep sequence order)
    order = torch.argsort(scores, dim=1, descending=True, stable=True)  # (B, N)
    order = torch.where(mask.gather(1, order), order, order.new_full((), x.shape[1]))
    keep = order[:, :k].sort(dim=1).values  # (B, k) positions, padding (N) last
    b, n, c = x.shape
    out_mask = keep < n
    tokens = x.gather(1, torch.where(out_mask, keep, 0)[..., None].expand(-1, -1, c))  # (B, k, C)
    tokens = tokens * out_mask[..., None].to(tokens.dtype)
    assignment = torch.full((b, n + 1), -1, dtype=torch.long, device=x.device)  # column n: sink
    assignment.scatter_(1, keep, torch.arange(k, device=x.device).expand_as(keep))
    return Reduced(tokens, out_mask, torch.where(mask, assignment[:, :n], -1))


def pad_slots(tokens: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``tokens (n, C)`` of one sample, ``n <= k``, zero-padded to ``(k, C)`` and its mask."""
    n, c = tokens.shape
    out = torch.cat([tokens, tokens.new_zeros(k - n, c)])
    mask = torch.arange(k, device=tokens.device) < n
    return out, mask


REDUCERS: Registry[type[TokenReducer]] = Registry("reducer")

R = TypeVar("R", bound=type[TokenReducer])


def register_reducer(name: str) -> Callable[[R], R]:
    """Class decorator: register a :class:`TokenReducer` subclass under ``name``."""

    def deco(cls: R) -> R:
        REDUCERS.register(name, cls)
        cls.name = name
        return cls

    return deco


def list_reducers() -> list[str]:
    """Registered reducer names, sorted."""
    return REDUCERS.list()


def get_reducer_class(name: str) -> type[TokenReducer]:
    """The class registered as ``name``; unknown names raise with the valid ones listed."""
    return REDUCERS.get(name)


def create_reducer(name: str, k: int, **options: Any) -> TokenReducer:
    """Reducer ``name`` with budget ``k`` and its ``options``; bad options raise ``ValueError``."""
    cls = get_reducer_class(name)
    try:
        return cls(k, **options)
    except TypeError as err:
        raise ValueError(f"reducer {name!r}: bad options {sorted(options)}: {err}") from err
