"""Every registered fusion strategy x combinations of the tiny experts.

For each cell the strategy is built from the experts' specs. A strategy may reject a
combination, but only at build time and only with :class:`fusion.FusionConfigError`. An
accepted cell calls ``Fusion.run`` the way the multimodal model does, must return finite
``(B, num_tokens, out_dim)`` tokens, and a backward must put non-zero gradients on every
fusion parameter and reach every expert.

Cost control (a documented choice; the whole matrix must run in seconds on 2 CPU cores):

* Combinations: every singleton, every pair, two "rolling" triples
  ``(e_i, e_{i+1}, e_{i+2})`` of the sorted preset list (``i = 0`` and ``i = n // 2``), and
  the full set. Fusions and tiny
  experts come from the registries, so new strategies and experts are covered as they land.
* In a cell, each expert's map is computed once per module and served through ``precomputed``
  (the feature-cache path) as a leaf tensor, and "reaches the expert" means a non-zero
  gradient on that map. Experts a strategy drives itself (``staged_experts()``, e.g. the ViT
  under the LLaVA-HR adapter) are never served and run live, and their parameters are checked.
* :func:`test_end_to_end` runs, per strategy, its largest accepted combination fully live and
  checks every expert parameter that takes part in that expert's own ``forward_map``.

Zero-initialised layers (the LLaVA-HR adapter starts as the identity) block some gradients at
initialisation, so when a gradient is missing the cell takes one SGD step on the fusion
parameters and checks again, as the second step of a real run would see it.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from PIL import Image

import experts
import fusion
from experts.spec import FeatureMap
from fusion import FusionConfigError

TINY = experts.list_experts("*-tiny")
BATCH = 2


def combinations(names: list[str]) -> list[tuple[str, ...]]:
    """Singletons, pairs, two rolling triples and the full set, in a fixed order."""
    combos = [(n,) for n in names] + list(itertools.combinations(names, 2))
    if len(names) > 3:  # two rolling triples, starting at the first and the middle preset
        combos += [
            tuple(sorted(names[(i + k) % len(names)] for k in range(3)))
            for i in (0, len(names) // 2)
        ]
    if len(names) > 2:
        combos.append(tuple(names))
    return list(dict.fromkeys(combos))


COMBOS = combinations(TINY)
CELLS = [(f, c) for f in fusion.list_fusions() for c in COMBOS]


class Member:
    """One tiny expert with its inputs, its (detached) map and the names of its parameters
    that receive a gradient from its own ``forward_map``."""

    def __init__(self, name: str, images: list[Image.Image]) -> None:
        torch.manual_seed(0)
        self.expert = experts.create_expert(name)
        self.inputs = self.expert.preprocess(images)
        fmap = self.expert.forward_map(self.inputs)
        (fmap.features * torch.randn_like(fmap.features)).sum().backward()
        self.active = {
            n for n, p in self.expert.named_parameters() if p.grad is not None and p.grad.any()
        }
        self.expert.zero_grad(set_to_none=True)
        self.map = FeatureMap(fmap.features.detach(), fmap.stride, fmap.source, fmap.mask)

    def leaf_map(self) -> FeatureMap:
        """The cached map as a fresh leaf tensor that records its gradient."""
        m = self.map
        return FeatureMap(m.features.clone().requires_grad_(True), m.stride, m.source, m.mask)

    def missing_grads(self) -> list[str]:
        params = dict(self.expert.named_parameters())
        return [
            f"{self.expert.spec.name}.{n}"
            for n in sorted(self.active)
            if params[n].grad is None or not params[n].grad.any()
        ]


@pytest.fixture(scope="module")
def zoo() -> dict[str, Member]:
    rng = np.random.default_rng(0)
    images = [
        Image.fromarray(rng.integers(0, 256, (48, 80, 3), dtype=np.uint8)),
        Image.fromarray(rng.integers(0, 256, (96, 40, 3), dtype=np.uint8)),
    ][:BATCH]
    return {name: Member(name, images) for name in TINY}


def build_or_skip(strategy: str, members: list[Member]) -> fusion.Fusion:
    try:
        return fusion.create_fusion(strategy, [m.expert.spec for m in members])
    except FusionConfigError as err:
        assert str(err), "a rejection must say what the strategy needs"
        pytest.skip(f"rejected at build: {err}")


def check_gradients(fuse: fusion.Fusion, members: list[Member], live: bool) -> torch.Tensor:
    """Run ``fuse`` (maps served from the cache unless ``live``), backward, check gradients;
    returns the (detached) tokens of the first pass."""
    staged = fuse.staged_experts()
    served: dict[int, FeatureMap] = {}

    def forward_backward(target: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        fuse.zero_grad(set_to_none=True)
        for m in members:
            m.expert.zero_grad(set_to_none=True)
        served.clear()
        if not live:
            served.update({i: m.leaf_map() for i, m in enumerate(members) if i not in staged})
        out = fuse.run([m.expert for m in members], [m.inputs for m in members], served)
        target = torch.randn_like(out) if target is None else target
        (out * target).sum().backward()
        return out.detach(), target

    def missing() -> list[str]:
        names = [
            f"fusion.{n}" for n, p in fuse.named_parameters() if p.grad is None or not p.grad.any()
        ]
        for i, m in enumerate(members):
            if i in served:
                if not served[i].features.grad.any():
                    names.append(f"map of {m.expert.spec.name}")
            else:
                names += m.missing_grads()
        return names

    out, target = forward_backward(None)
    if missing():  # zero-initialised layers: look again after one optimizer step
        torch.optim.SGD(fuse.parameters(), lr=0.1).step()
        forward_backward(target)
    absent = missing()
    for m in members:
        m.expert.zero_grad(set_to_none=True)
    assert not absent, f"no gradient reaches {absent}"
    return out


@pytest.mark.parametrize(("strategy", "combo"), CELLS, ids=[f"{f}-{'+'.join(c)}" for f, c in CELLS])
def test_fusion_cell(strategy, combo, zoo):
    members = [zoo[n] for n in combo]
    fuse = build_or_skip(strategy, members)
    out = check_gradients(fuse, members, live=False)
    assert out.shape == (BATCH, fuse.num_tokens, fuse.out_dim)
    assert torch.isfinite(out).all()
    if fuse.out_grid is not None:
        assert fuse.out_grid[0] * fuse.out_grid[1] == fuse.num_tokens


def largest_accepted(strategy: str) -> tuple[str, ...] | None:
    for combo in sorted(COMBOS, key=len, reverse=True):
        try:
            fusion.create_fusion(strategy, [experts.get_spec(n) for n in combo])
        except FusionConfigError:
            continue
        return combo
    return None


@pytest.mark.parametrize("strategy", fusion.list_fusions())
def test_end_to_end(strategy, zoo):
    """The largest accepted combination, every expert live: parameter-level gradients."""
    combo = largest_accepted(strategy)
    assert combo is not None, f"fusion {strategy!r} rejects every combination of {TINY}"
    members = [zoo[n] for n in combo]
    fuse = build_or_skip(strategy, members)
    out = check_gradients(fuse, members, live=True)
    assert out.shape == (BATCH, fuse.num_tokens, fuse.out_dim)


# ---------------------------------------------------------------------- tiled experts
# Tiling is an expert option (experts.tiling): the stitched map and, with a thumbnail, one more
# map reach every strategy. Three combinations: Eagle 2's partial tiling (a tiled ViT with a
# thumbnail next to an untiled ConvNet), a ragged dynamic tiling next to Pix2Struct's ragged
# grid, and a tiled high-resolution ConvNet next to an untiled ViT (the LLaVA-HR layout).
TILINGS: dict[str, tuple[str, dict]] = {
    "siglip-tiny[1x2+thumb]": ("siglip-tiny", {"grid": (1, 2), "thumbnail": True}),
    "clip-tiny[<=2]": ("clip-tiny", {"max_tiles": 2}),
    "convnext-tiny[2x2]": ("convnext-tiny", {"grid": (2, 2)}),
}
TILED_COMBOS = [
    ("siglip-tiny[1x2+thumb]", "convnext-tiny"),
    ("clip-tiny[<=2]", "pix2struct-tiny"),
    ("clip-tiny", "convnext-tiny[2x2]"),
]
TILED_CELLS = [(f, c) for f in fusion.list_fusions() for c in TILED_COMBOS]


class TiledMember(Member):
    """A tiny expert built with a tiling policy; its map is the stitched tiled forward."""

    def __init__(self, name: str, tiling: dict, images: list[Image.Image]) -> None:
        torch.manual_seed(0)
        self.expert = experts.create_expert(name, tiling=tiling)
        self.inputs = self.expert.preprocess(images)
        fmap = self.expert(self.inputs)
        loss = (fmap.features * torch.randn_like(fmap.features)).sum()
        if fmap.thumbnail is not None:
            loss = loss + fmap.thumbnail.features.sum()
        loss.backward()
        self.active = {
            n for n, p in self.expert.named_parameters() if p.grad is not None and p.grad.any()
        }
        self.expert.zero_grad(set_to_none=True)
        self.map = FeatureMap(fmap.features.detach(), fmap.stride, fmap.source, fmap.mask)


@pytest.fixture(scope="module")
def tiled_zoo(zoo) -> dict[str, Member]:
    rng = np.random.default_rng(1)
    images = [
        Image.fromarray(rng.integers(0, 256, (40, 96, 3), dtype=np.uint8)),  # wide: 1x2 tiles
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)),  # square: 1 tile
    ][:BATCH]
    out = {key: TiledMember(name, tiling, images) for key, (name, tiling) in TILINGS.items()}
    return {**zoo, **out}


@pytest.mark.parametrize(
    ("strategy", "combo"), TILED_CELLS, ids=[f"{f}-{'+'.join(c)}" for f, c in TILED_CELLS]
)
def test_fusion_cell_tiled(strategy, combo, tiled_zoo):
    """Every strategy takes tiled experts (or refuses them at build time, saying why)."""
    members = [tiled_zoo[n] for n in combo]
    fuse = build_or_skip(strategy, members)
    assert len(fuse.specs) == sum(len(experts.tiling.map_specs(m.expert.spec)) for m in members)
    out = check_gradients(fuse, members, live=False)
    assert out.shape == (BATCH, fuse.num_tokens, fuse.out_dim)
    assert torch.isfinite(out).all()
