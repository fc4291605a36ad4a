"""Visual-token budgets as config: how many tokens each run of visual tokens may keep.

A model's visual tokens come in runs (:attr:`fusion.Fusion.token_grids`): one per map under
``sequence_append`` (an expert, or a tiled expert's canvas and its thumbnail), one for the whole
fused grid under ``channel_concat`` (which joins the experts cell by cell, so its experts share
one budget). ``model.token_budget`` says how many of them each run keeps, and which reducer
(:mod:`fusion.reducers`) chooses::

    token_budget: {reducer: tome, fraction: 0.5}                 # one budget for the image,
    token_budget: {reducer: tome, tokens: 64, allocation: equal}  # shared across the runs
    token_budget:                                                 # per expert (run)
      reducer: visionzip
      options: {contextual_fraction: 0.25}
      experts: {clip-mini: {tokens: 32}, pix2struct-mini: {fraction: 0.5}}

* ``fraction`` of the image's ``N`` tokens gives ``floor(fraction * N)``; ``tokens`` is a count.
* ``allocation`` across runs for an image budget ``K``: ``proportional`` (default; each run's
  share of ``N``, largest remainders rounded up, so the counts sum to ``K``) or ``equal``
  (``K / runs`` each; a run smaller than its share keeps all and the rest is shared again).
* ``experts`` names runs by their map's spec name (``<expert>``, ``<expert>:thumbnail``); runs not
  named keep every token.

A run whose budget is at least its size is left as it is, so a budget of 100% is the identity.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from fusion.reducers.base import TokenReducer, create_reducer, get_reducer_class

ALLOCATIONS: tuple[str, ...] = ("proportional", "equal")
KEYS: tuple[str, ...] = ("reducer", "options", "fraction", "tokens", "allocation", "experts")


def _amount(where: str, spec: Mapping[str, Any]) -> tuple[float | None, int | None]:
    """``(fraction, tokens)`` of a budget mapping; exactly one must be given."""
    bad = sorted(set(spec) - {"fraction", "tokens"})
    fraction, tokens = spec.get("fraction"), spec.get("tokens")
    if bad or (fraction is None) == (tokens is None):
        raise ValueError(
            f"model.token_budget{where}: give exactly one of 'fraction' (0 < f <= 1) or "
            f"'tokens' (a positive int), got {dict(spec)!r}"
        )
    if fraction is not None and (
        isinstance(fraction, bool)
        or not isinstance(fraction, (int, float))
        or not 0 < fraction <= 1
    ):
        raise ValueError(f"model.token_budget{where}: fraction must be in (0, 1], got {fraction!r}")
    if tokens is not None and (
        isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 1
    ):
        raise ValueError(
            f"model.token_budget{where}: tokens must be a positive int, got {tokens!r}"
        )
    return fraction, tokens


def _count(fraction: float | None, tokens: int | None, n: int) -> int:
    return tokens if tokens is not None else max(1, math.floor(fraction * n))  # type: ignore[operator]


@dataclass
class TokenBudget:
    """A parsed ``model.token_budget`` (see the module docstring)."""

    reducer: str
    options: dict[str, Any] = field(default_factory=dict)
    fraction: float | None = None
    tokens: int | None = None
    allocation: str = "proportional"
    experts: dict[str, dict[str, Any]] | None = None

    @classmethod
    def from_config(cls, data: Mapping[str, Any]) -> TokenBudget:
        """Check and read ``model.token_budget``; each error names the key and what it takes."""
        if not isinstance(data, Mapping):
            raise ValueError(f"model.token_budget must be a mapping, got {data!r}")
        bad = sorted(set(data) - set(KEYS))
        if bad:
            raise ValueError(f"model.token_budget: unknown keys {bad}; valid keys are {list(KEYS)}")
        if "reducer" not in data:
            raise ValueError("model.token_budget needs 'reducer' (fusion.reducers.list_reducers())")
        try:
            get_reducer_class(data["reducer"])
        except KeyError as err:
            raise ValueError(f"model.token_budget: {err.args[0]}") from None
        allocation = data.get("allocation", "proportional")
        if allocation not in ALLOCATIONS:
            raise ValueError(
                f"model.token_budget: allocation must be one of {ALLOCATIONS}, got {allocation!r}"
            )
        experts = data.get("experts")
        amount = {k: data[k] for k in ("fraction", "tokens") if k in data}
        if experts is not None:
            if amount or "allocation" in data:
                raise ValueError(
                    "model.token_budget: give per-expert budgets ('experts') or one for the image "
                    f"('fraction'/'tokens' with 'allocation'), not both; got {dict(data)!r}"
                )
            if not isinstance(experts, Mapping) or not experts:
                raise ValueError(
                    f"model.token_budget.experts must map expert names to budgets, got {experts!r}"
                )
            for name, spec in experts.items():
                if not isinstance(spec, Mapping):
                    raise ValueError(
                        f"model.token_budget.experts.{name} must be {{tokens: N}} or "
                        f"{{fraction: f}}, got {spec!r}"
                    )
                _amount(f".experts.{name}", spec)
            fraction, tokens = None, None
        else:
            fraction, tokens = _amount("", amount)
        options = data.get("options") or {}
        if not isinstance(options, Mapping):
            raise ValueError(f"model.token_budget.options must be a mapping, got {options!r}")
        return cls(
            data["reducer"],
            dict(options),
            fraction,
            tokens,
            allocation,
            None if experts is None else {k: dict(v) for k, v in experts.items()},
        )

    def allocate(self, sizes: Sequence[int], names: Sequence[str]) -> list[int]:
        """Tokens kept per run of ``sizes`` tokens named ``names`` (each at most its size)."""
        if self.experts is not None:
            unknown = sorted(set(self.experts) - set(names))
            if unknown:
                raise ValueError(
                    f"model.token_budget.experts names {unknown}, which are not runs of visual "
                    f"tokens of this model; its runs are {list(names)} (a fusion that joins the "
                    "experts cell by cell, like channel_concat, has one run 'image': give one "
                    "budget for the image instead)"
                )
            out = []
            for n, name in zip(sizes, names):
                spec = self.experts.get(name)
                out.append(n if spec is None else min(n, _count(*_amount("", spec), n)))
            return out
        total = sum(sizes)
        budget = min(total, _count(self.fraction, self.tokens, total))
        if budget < len(sizes):
            raise ValueError(
                f"model.token_budget: {budget} tokens cannot cover {len(sizes)} runs of visual "
                f"tokens ({list(names)}); give at least one token per run"
            )
        if self.allocation == "equal":
            return equal_shares(sizes, budget)
        return proportional_shares(sizes, budget)


def proportional_shares(sizes: Sequence[int], budget: int) -> list[int]:
    """``budget`` split in proportion to ``sizes`` (largest remainders, ties to the earlier
    run), at least 1 and at most the size each; sums to ``min(budget, sum(sizes))``."""
    total = sum(sizes)
    quotas = [budget * n / total for n in sizes]
    shares = [max(1, min(n, math.floor(q))) for n, q in zip(sizes, quotas)]
    left = budget - sum(shares)
    while left < 0:  # the minimum of 1 overdrew: take back where a share exceeds its quota most
        i = max(
            (j for j in range(len(sizes)) if shares[j] > 1), key=lambda j: shares[j] - quotas[j]
        )
        shares[i] -= 1
        left += 1
    order = sorted(range(len(sizes)), key=lambda i: -(quotas[i] - math.floor(quotas[i])))
    while left > 0:
        for i in order:
            if left and shares[i] < sizes[i]:
                shares[i] += 1
                left -= 1
    return shares


def equal_shares(sizes: Sequence[int], budget: int) -> list[int]:
    """``budget`` split equally (water-filling: a run smaller than its share keeps all)."""
    shares = [0] * len(sizes)
    open_runs = list(range(len(sizes)))
    left = budget
    while left > 0 and open_runs:
        each, extra = divmod(left, len(open_runs))
        for j, i in enumerate(list(open_runs)):
            give = min(sizes[i] - shares[i], each + (1 if j < extra else 0))
            shares[i] += give
            left -= give
        open_runs = [i for i in open_runs if shares[i] < sizes[i]]
    return shares


class BudgetReducer(nn.Module):
    """Applies a :class:`TokenBudget` to visual tokens made of runs.

    Args:
        budget: the parsed config.
        sizes: tokens per run; ``names``: the runs' names (for ``experts`` budgets).

    Attributes:
        kept: tokens kept per run; ``num_tokens``: their sum (slots per image).
        reducers: one reducer per run (``None`` where the run is kept whole).
        active: False when every run is kept whole (the identity, bit for bit).
    """

    def __init__(self, budget: TokenBudget, sizes: Sequence[int], names: Sequence[str]) -> None:
        super().__init__()
        self.sizes = [int(n) for n in sizes]
        self.names = list(names)
        self.kept = budget.allocate(self.sizes, self.names)
        self.reducers = nn.ModuleList(
            create_reducer(budget.reducer, k, **budget.options) if k < n else nn.Identity()
            for n, k in zip(self.sizes, self.kept)
        )
        self.active = any(k < n for n, k in zip(self.sizes, self.kept))
        self.num_tokens = sum(self.kept)

    def forward(
        self,
        tokens: torch.Tensor,
        masks: Sequence[torch.Tensor | None] | None = None,
        query: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``tokens (B, N, C)`` (runs one after another), per-run ``masks (B, n_i)`` (``None``:
        valid), ``query (B, C)`` -> ``(B, sum k_i, C)`` and its validity mask ``(B, sum k_i)``."""
        runs = torch.split(tokens, self.sizes, dim=1)
        masks = list(masks) if masks is not None else [None] * len(runs)
        outs, out_masks = [], []
        for run, mask, reducer in zip(runs, masks, self.reducers):
            if isinstance(reducer, TokenReducer):
                reduced = reducer(run, mask, query)
                outs.append(reduced.tokens)
                out_masks.append(reduced.mask)
            else:
                outs.append(run)
                valid = torch.ones(run.shape[:2], dtype=torch.bool, device=run.device)
                out_masks.append(valid if mask is None else mask.bool())
        return torch.cat(outs, dim=1), torch.cat(out_masks, dim=1)
