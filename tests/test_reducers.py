"""Token reducers (fusion.reducers) against brute-force loops of each paper's rule, their
gradients, exact budgets, padding, the registry and the allocation of a budget across runs."""

from __future__ import annotations

import math

import pytest
import torch

from fusion.reducers.base import create_reducer, list_reducers
from fusion.reducers.budget import TokenBudget, equal_shares, proportional_shares


def _cos(u: torch.Tensor, v: torch.Tensor) -> float:
    u, v = u.double(), v.double()
    return float(u @ v / (u.norm() * v.norm()))


def test_text_guided_and_in_order_keep_the_right_tokens():
    torch.manual_seed(2)
    x, q = torch.randn(2, 30, 4), torch.randn(2, 4)
    got = create_reducer("text_guided", 7)(x, query=q)
    for b in range(2):
        sims = [_cos(x[b, i], q[b]) for i in range(30)]
        keep = sorted(sorted(range(30), key=lambda i: -sims[i])[:7])
        assert torch.equal(got.tokens[b], x[b, keep])
        assert [i for i in range(30) if got.assignment[b, i] >= 0] == keep
    first = create_reducer("in_order", 9)(x)
    assert torch.equal(first.tokens, x[:, :9])
    with pytest.raises(ValueError, match="needs the prompt's mean embedding"):
        create_reducer("text_guided", 7)(x)


@pytest.mark.parametrize("name", ["text_guided", "in_order"])
def test_budget_exact_padding_never_kept_and_gradients(name):
    torch.manual_seed(3)
    b, n, c, k = 4, 26, 5, 6
    x = torch.randn(b, n, c, requires_grad=True)
    mask = torch.rand(b, n) > 0.4
    mask[1, 3:] = False  # a sample with fewer valid tokens than k: all kept, slots masked
    q = torch.randn(b, c)
    reducer = create_reducer(name, k)
    out = reducer(x, mask, q)
    assert out.tokens.shape == (b, k, c) and out.mask.shape == (b, k)
    assert int(out.assignment.max()) < k and bool((out.assignment[~mask] == -1).all())
    assert out.mask.sum(1).tolist() == [min(k, int(v)) for v in mask.sum(1)]
    valid1 = x[1, mask[1]]
    assert torch.equal(out.tokens[1, : len(valid1)], valid1)  # kept whole, in order
    # padding carries anything: the valid outputs do not change
    garbage = torch.where(mask[..., None], x, torch.full_like(x, 1e4))
    again = reducer(garbage, mask, q)
    assert torch.equal(again.tokens[out.mask], out.tokens[out.mask])
    assert torch.equal(again.assignment, out.assignment)
    # gradients reach exactly the tokens that were kept or merged, never padding
    out.tokens[out.mask].sum().backward()
    reached = x.grad.abs().sum(-1) > 0
    assert torch.equal(reached, out.assignment >= 0)


def test_registry_errors_and_identity_at_full_budget():
    assert set(list_reducers()) >= {"text_guided", "in_order"}
    with pytest.raises(KeyError, match="unknown reducer 'tomato'; valid are: in_order"):
        create_reducer("tomato", 4)
    with pytest.raises(ValueError, match="k must be a positive int"):
        create_reducer("in_order", 0)
    with pytest.raises(ValueError, match="bad options"):
        create_reducer("in_order", 4, ratio=2)
    x = torch.randn(2, 8, 3)
    assert create_reducer("in_order", 8)(x).tokens is x


def test_allocation_sums_exactly_and_config_errors():
    for sizes in ([64, 121], [64, 64, 16], [1000, 1, 1], [7]):
        total = sum(sizes)
        for budget in sorted({len(sizes), total // 8 or 1, total // 2, total}):
            if budget < len(sizes):
                continue
            for shares in (proportional_shares(sizes, budget), equal_shares(sizes, budget)):
                assert sum(shares) == budget and all(1 <= s <= n for s, n in zip(shares, sizes))
    assert proportional_shares([64, 192], 128) == [32, 96]
    assert equal_shares([10, 100], 60) == [10, 50]
    half = TokenBudget.from_config({"reducer": "in_order", "fraction": 0.5})
    assert half.allocate([64, 121], ["a", "b"]) == [32, 60] and math.floor(185 / 2) == 92
    per = TokenBudget.from_config({"reducer": "in_order", "experts": {"b": {"tokens": 8}}})
    assert per.allocate([64, 121], ["a", "b"]) == [64, 8]
    with pytest.raises(ValueError, match=r"its runs are \['image'\]"):
        per.allocate([64], ["image"])
    for bad, msg in [
        ({"fraction": 0.5}, "needs 'reducer'"),
        ({"reducer": "in_order"}, "exactly one of 'fraction'"),
        ({"reducer": "in_order", "fraction": 1.5}, "fraction must be in"),
        ({"reducer": "in_order", "tokens": 4, "allocation": "greedy"}, "allocation must be one of"),
        ({"reducer": "in_order", "tokens": 4, "experts": {"a": {"tokens": 2}}}, "not both"),
        ({"reducer": "nope", "tokens": 4}, "unknown reducer 'nope'"),
        ({"reducer": "in_order", "tokens": 4, "budget": 1}, "unknown keys"),
    ]:
        with pytest.raises(ValueError, match=msg):
            TokenBudget.from_config(bad)
