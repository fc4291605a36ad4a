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


def tome_loop(x: torch.Tensor, k: int) -> tuple[torch.Tensor, list[int]]:
    """ToMe's rule on one sample ``x (n, C)``, token by token: alternate A/B, each A's most
    similar B, the r best-matched A merge into it by size-weighted average; repeat to ``k``.
    Survivors stay in image order (by their earliest member)."""
    groups = [{"x": x[i].double(), "s": 1.0, "pos": i, "members": [i]} for i in range(len(x))]
    while len(groups) > k:
        r = min(len(groups) - k, len(groups) // 2)
        a, b = groups[0::2], groups[1::2]
        best = []
        for ga in a:
            sims = [_cos(ga["x"], gb["x"]) for gb in b]
            j = max(range(len(b)), key=lambda t: (sims[t], -t))  # first maximum
            best.append((sims[j], j))
        order = sorted(range(len(a)), key=lambda i: -best[i][0])  # stable
        merged = set(order[:r])
        for i in order[:r]:
            gb, ga = b[best[i][1]], a[i]
            gb["x"] = (gb["x"] * gb["s"] + ga["x"] * ga["s"]) / (gb["s"] + ga["s"])
            gb["s"] += ga["s"]
            gb["pos"] = min(gb["pos"], ga["pos"])
            gb["members"] += ga["members"]
        groups = sorted([g for i, g in enumerate(a) if i not in merged] + b, key=lambda g: g["pos"])
    slot = [0] * len(x)
    for j, g in enumerate(groups):
        for m in g["members"]:
            slot[m] = j
    return torch.stack([g["x"] for g in groups]).float(), slot


def visionzip_loop(x: torch.Tensor, k: int, kc: int) -> torch.Tensor:
    """VisionZip's rule on one sample: top (k - kc) by L2 norm, in order; of the rest, every
    (m // kc)-th token is a target, the others join the most similar target; contextual =
    target + mean of those that joined."""
    n = len(x)
    norms = [float(x[i].double().norm()) for i in range(n)]
    dominant = sorted(sorted(range(n), key=lambda i: -norms[i])[: k - kc])
    rest = [i for i in range(n) if i not in dominant]
    if kc == 0:
        return torch.stack([x[i] for i in dominant])
    step = max(1, len(rest) // kc)
    targets = [rest[j] for j in range(0, len(rest), step)][:kc]
    others = [i for i in rest if i not in targets]
    joined: dict[int, list[int]] = {t: [] for t in targets}
    for o in others:
        sims = [_cos(x[o], x[t]) for t in targets]
        joined[targets[max(range(len(targets)), key=lambda j: (sims[j], -j))]].append(o)
    out = [x[i] for i in dominant]
    for t in targets:
        extra = torch.stack([x[o] for o in joined[t]]).mean(0) if joined[t] else 0 * x[t]
        out.append(x[t] + extra)
    return torch.stack(out)


def test_tome_equals_the_loop_with_merges_over_several_steps():
    torch.manual_seed(0)
    x = torch.randn(3, 23, 6)
    for k in (1, 5, 11, 20):
        got = create_reducer("tome", k)(x)
        assert got.tokens.shape == (3, k, 6) and bool(got.mask.all())
        for b in range(3):
            ref, slot = tome_loop(x[b], k)
            torch.testing.assert_close(got.tokens[b], ref, rtol=1e-5, atol=1e-5)
            assert got.assignment[b].tolist() == slot


def test_visionzip_equals_the_loop():
    torch.manual_seed(1)
    x = torch.randn(2, 40, 5)
    for k, frac in ((16, 10 / 64), (8, 0.5), (3, 0.0)):
        reducer = create_reducer("visionzip", k, contextual_fraction=frac)
        got = reducer(x)
        kc = reducer.k_contextual
        assert kc == min(round(k * frac), k - 1)
        for b in range(2):
            torch.testing.assert_close(got.tokens[b], visionzip_loop(x[b], k, kc))


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


@pytest.mark.parametrize("name", ["tome", "visionzip", "text_guided", "in_order"])
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
    with pytest.raises(KeyError, match="unknown reducer 'tomato'; valid reducers are: in_order"):
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
