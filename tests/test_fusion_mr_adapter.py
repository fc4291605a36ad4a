"""LLaVA-HR mixture-of-resolution adapter on the real tiny ViT and ConvNeXt experts."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import experts
import fusion
from experts.spec import FeatureMap
from fusion import FusionConfigError
from fusion.strategies.mr_adapter import MRAdapter

VIT, CONV, OTHER = "clip-tiny", "convnext-tiny", "dinov2-tiny"


@pytest.fixture(scope="module")
def images() -> list[Image.Image]:
    rng = np.random.default_rng(1)
    return [Image.fromarray(rng.integers(0, 256, (90, 120, 3), dtype=np.uint8)) for _ in range(2)]


def build(names, images, **spec_overrides):
    zoo = [experts.create_expert(n, **spec_overrides.get(n, {})) for n in names]
    return zoo, [e.preprocess(images) for e in zoo]


@pytest.mark.parametrize("injection", ["final", "per_stage"])
def test_identity_at_init(images, injection):
    (vit, conv), inputs = build([VIT, CONV], images, **{VIT: {"num_stages": 4}})
    fuse = fusion.create_fusion("mr_adapter", [vit.spec, conv.spec], injection=injection)
    assert fuse.inject_after == [0, 1, 2] and len(fuse.adapters) == 3
    if injection == "per_stage":
        assert fuse.highres_layers == [1, 2, 3] and fuse.staged_experts() == {0, 1}
    else:
        assert fuse.staged_experts() == {0}
    with torch.no_grad():
        out = fuse.run([vit, conv], inputs)
        bare = vit.forward_map(inputs[0]).tokens()
    assert out.shape == (2, vit.spec.num_tokens, vit.spec.channels)
    assert (fuse.num_tokens, fuse.out_dim, fuse.out_grid) == (64, 64, vit.spec.grid)
    assert torch.equal(out, bare)


def test_precomputed_highres_map_is_used(images):
    (vit, conv), (vit_inputs, conv_inputs) = build([VIT, CONV], images)
    inputs = [conv_inputs, vit_inputs]
    fuse = fusion.create_fusion("mr_adapter", [conv.spec, vit.spec])  # order does not matter
    assert (fuse.vit_index, fuse.highres_index) == (1, 0)
    with torch.no_grad():
        for p in fuse.parameters():
            p.add_(0.05 * torch.randn_like(p))
        cached = conv(inputs[0])
        live = fuse.run([conv, vit], inputs)
        served = fuse.run([conv, vit], inputs, precomputed={0: cached})
        other = FeatureMap(torch.randn_like(cached.features), cached.stride, cached.source)
        changed = fuse.run([conv, vit], inputs, precomputed={0: other})
    torch.testing.assert_close(served, live)
    assert not torch.allclose(changed, live)


def test_gradients_reach_every_adapter_parameter_after_one_step(images):
    (vit, conv), inputs = build([VIT, CONV], images)
    fuse = fusion.create_fusion("mr_adapter", [vit.spec, conv.spec])
    target = torch.randn(2, fuse.num_tokens, fuse.out_dim)
    opt = torch.optim.SGD([*fuse.parameters(), *conv.parameters()], lr=0.5)

    def step() -> None:
        opt.zero_grad()
        vit.zero_grad()
        (fuse.run([vit, conv], inputs) * target).sum().backward()

    step()
    adapter = fuse.adapters[0]
    # at init only the zero-initialised last convs of both paths can move
    assert (
        adapter.high[-1].weight.grad.abs().sum() > 0 and adapter.low_pw.weight.grad.abs().sum() > 0
    )
    assert adapter.high[0].weight.grad.abs().sum() == 0
    opt.step()
    step()
    for name, p in fuse.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    for expert in (vit, conv):
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in expert.parameters())


@pytest.mark.parametrize(("hr_grid", "pool"), [((12, 10), True), ((3, 2), False)])
def test_adapter_matches_formula(hr_grid, pool):
    adapter = MRAdapter(dim=8, highres_dim=5, gate_reduction=2)
    with torch.no_grad():
        for p in adapter.parameters():
            p.copy_(0.3 * torch.randn_like(p))
    x, f = torch.randn(2, 8, 6, 5), torch.randn(2, 5, *hr_grid)
    high = adapter.high[2](F.gelu(adapter.high[0](f)))
    if pool:
        high = F.adaptive_avg_pool2d(high, (6, 5))
    else:
        high = F.interpolate(high, size=(6, 5), mode="bilinear", align_corners=False)
    low = x + adapter.low_pw(adapter.low_dw(x))
    g = torch.tanh(adapter.gate(torch.cat([low.mean((2, 3)), high.mean((2, 3))], 1)))
    expected = low + g[..., None, None] * high
    torch.testing.assert_close(adapter(x, FeatureMap(f, 4, "hr")), expected)


def test_other_experts_are_channel_concatenated(images):
    zoo, inputs = build([VIT, CONV, OTHER], images)
    fuse = fusion.create_fusion("mr_adapter", [z.spec for z in zoo], dim=None)
    assert fuse.other_indices == [2] and fuse.out_dim == 128
    with torch.no_grad():
        out = fuse.run(zoo, inputs)
        torch.testing.assert_close(out[..., :64], zoo[0].forward_map(inputs[0]).tokens())
        torch.testing.assert_close(out[..., 64:], zoo[2].forward_map(inputs[2]).tokens())
    projected = fusion.create_fusion("mr_adapter", [z.spec for z in zoo], dim=16, grid=(4, 4))
    assert projected.run(zoo, inputs).shape == (2, 16, 16)


def _specs(*names, **overrides):
    return [experts.get_spec(n, **overrides.get(n, {})) for n in names]


@pytest.mark.parametrize(
    ("names", "options", "overrides", "match"),
    [
        ((CONV,), {}, {}, "needs a ViT expert with staged execution"),
        ((VIT, OTHER), {}, {}, "needs a high-resolution convolutional expert"),
        ((VIT, CONV), {}, {CONV: {"input_size": (32, 32)}}, "input_size at least the ViT's"),
        ((VIT, CONV), {"vit_index": 1}, {}, "vit_index=1 names convnext-tiny"),
        ((VIT, CONV, OTHER), {"highres_index": 2}, {}, "highres_index=2 names dinov2-tiny"),
        ((VIT, CONV), {"injection": "middle"}, {}, "injection='middle'; expected one of"),
        ((VIT, CONV), {"inject_after": (5,)}, {}, "inject_after=\\(5,\\) must name stage"),
        ((VIT, CONV), {"highres_layers": (3,)}, {}, "only applies to injection='per_stage'"),
        (
            (VIT, CONV),
            {"injection": "per_stage", "highres_layers": (9,)},
            {},
            "needs 1 readable layers of 'convnext-tiny'",
        ),
        ((VIT, CONV), {"gate_reduction": 0}, {}, "gate_reduction must be a positive int"),
        ((VIT, CONV), {"colour": "red"}, {}, "has no options \\['colour'\\]"),
    ],
)
def test_build_time_errors(names, options, overrides, match):
    with pytest.raises(FusionConfigError, match=match):
        fusion.create_fusion("mr_adapter", _specs(*names, **overrides), **options)


def test_forward_on_maps_says_to_use_run():
    fuse = fusion.create_fusion("mr_adapter", _specs(VIT, CONV))
    with pytest.raises(RuntimeError, match="call run"):
        fuse([])


STAGED_VITS = [
    n
    for n in experts.list_experts("*-tiny")
    if experts.get_spec(n).architecture == "vit"
    and experts.get_spec(n).num_stages >= 2
    and not experts.get_spec(n).variable_resolution
]


@pytest.mark.parametrize("vit_name", STAGED_VITS)
def test_identity_at_init_for_every_staged_vit(images, vit_name):
    """Whatever the ViT family (CLS/register tokens, rotary, final norm, SAM's windowed
    blocks), the adapter at init leaves its map untouched."""
    (vit, conv), inputs = build([vit_name, CONV], images)
    fuse = fusion.create_fusion("mr_adapter", [vit.spec, conv.spec])
    with torch.no_grad():
        out = fuse.run([vit, conv], inputs)
        bare = vit.forward_map(inputs[0]).tokens()
    assert torch.equal(out, bare)
