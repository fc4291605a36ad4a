"""The feature-map contract, checked for every expert family (``experts.list_experts``).

Tiny presets run on real PIL images of mixed sizes and modes; real presets are built on the
``meta`` device (no weights, no download) and their output shapes checked against the spec.
"""

from __future__ import annotations

import functools
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

import experts
from experts.spec import ExpertSpec

TINY = experts.list_experts("*-tiny")
# distilled students are zoo presets plus adaptor heads, built from a shipped card: their
# shapes and loading are tested in tests/test_distill.py
REAL = [
    n
    for n in experts.list_experts()
    if n not in TINY and experts.get_spec(n).family != "distilled"
]


@functools.cache
def _meta_expert(name: str) -> experts.Expert:
    return experts.create_expert(name, device="meta")


def _build(name: str) -> experts.Expert:
    torch.manual_seed(0)
    return experts.create_expert(name).eval()


def _check_map(fmap: experts.FeatureMap, spec: ExpertSpec, batch: int) -> None:
    assert fmap.features.shape == (batch, spec.channels, *spec.grid), spec.name
    assert fmap.stride == spec.patch_size
    if spec.variable_resolution:
        assert fmap.mask is not None and fmap.mask.shape == (batch, *spec.grid)
        assert fmap.mask.dtype == torch.bool
    else:
        assert fmap.mask is None


def test_there_are_tiny_and_real_presets_for_every_family() -> None:
    tiny = {experts.get_spec(n).family for n in TINY}
    real = {experts.get_spec(n).family for n in REAL}
    assert {"convnext", "sam", "pix2struct"} <= tiny
    assert tiny == real


@pytest.mark.parametrize("name", TINY)
def test_mixed_images_give_the_map_the_spec_promises(
    name: str, mixed_images: dict[str, Image.Image]
) -> None:
    expert = _build(name)
    spec = expert.spec
    images = list(mixed_images.values())
    with torch.no_grad():
        fmap = expert(expert.preprocess(images))
    _check_map(fmap, spec, len(images))
    assert torch.isfinite(fmap.features).all()
    assert fmap.source.startswith(name)
    if spec.variable_resolution:
        counts = fmap.mask.flatten(1).sum(1)
        assert (counts >= 1).all() and (counts <= spec.max_patches).all()
        # the 4000x300 strip is wide: its valid cells form one block of few rows, many columns
        strip = fmap.mask[list(mixed_images).index("strip")]
        rows, cols = strip.any(1).sum(), strip.any(0).sum()
        assert cols > rows and int(counts[list(mixed_images).index("strip")]) == rows * cols
        # nothing is written where there is no patch
        assert (fmap.features.permute(0, 2, 3, 1)[~fmap.mask] == 0).all()
    # an image's map does not depend on the rest of its batch
    with torch.no_grad():
        single = expert(expert.preprocess(images[0]))
    torch.testing.assert_close(single.features[0], fmap.features[0], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name", TINY)
def test_staged_execution_equals_forward(name: str, mixed_images: dict[str, Image.Image]) -> None:
    expert = _build(name)
    if expert.num_stages == 0:
        pytest.skip(f"{name} has no staged execution")
    inputs = expert.preprocess([mixed_images["RGB"], mixed_images["strip"]])
    with torch.no_grad():
        ref = expert(inputs)
        staged = expert.run_staged(inputs)
        torch.testing.assert_close(staged.features, ref.features, atol=1e-5, rtol=1e-4)
        # to_map/from_map round-trip between every pair of stages changes nothing
        state = expert.embed(inputs)
        for i in range(expert.num_stages):
            fmap = expert.to_map(state)
            assert fmap.dim() == 4 and fmap.shape[0] == 2
            state = expert.from_map(state, fmap)
            state = expert.run_stage(state, i)
        out = expert.finish(state)
    torch.testing.assert_close(out.features, ref.features, atol=1e-5, rtol=1e-4)
    if ref.mask is not None:
        assert torch.equal(out.mask, ref.mask)
    with pytest.raises((IndexError, ValueError)):
        expert.run_stage(expert.embed(inputs), expert.num_stages)


@pytest.mark.parametrize("name", TINY)
def test_readable_layers_have_the_spec_channels(
    name: str, mixed_images: dict[str, Image.Image]
) -> None:
    expert = _build(name)
    spec = expert.spec
    assert len(spec.layers) == len(spec.layer_channels) > 0
    inputs = expert.preprocess([mixed_images["RGB"], mixed_images["L"]])
    with torch.no_grad():
        maps = expert(inputs, layers=list(spec.layers))
    assert len(maps) == len(spec.layers)
    for m, c in zip(maps, spec.layer_channels):
        assert m.features.shape[:2] == (2, c)
        assert torch.isfinite(m.features).all()
    with pytest.raises(ValueError, match="readable layers"):
        expert(inputs, layers=[max(spec.layers) + 100])


@pytest.mark.parametrize("name", TINY)
def test_preprocessing_is_picklable_and_matches(
    name: str, mixed_images: dict[str, Image.Image]
) -> None:
    expert = _build(name)
    fn = pickle.loads(pickle.dumps(expert.preprocessor))
    for key in ("RGB", "strip", "1x1"):
        image = experts.load_image(mixed_images[key])
        got, want = fn(image), expert.preprocess_one(mixed_images[key])
        assert set(got) == set(want)
        for k in want:
            assert torch.equal(got[k], want[k]), (key, k)
    # uint8 tensors are images too: the same pixels give the same inputs
    rgb = mixed_images["RGB"]
    tensor = torch.from_numpy(np.asarray(rgb).copy()).permute(2, 0, 1)
    a, b = expert.preprocess(rgb), expert.preprocess(tensor)
    for k in a:
        assert torch.equal(a[k], b[k])


@pytest.mark.parametrize("name", REAL)
def test_real_preset_on_meta_gives_spec_shapes(name: str) -> None:
    expert = experts.create_expert(name, device="meta")
    spec = expert.spec
    assert all(p.device.type == "meta" for p in expert.parameters())
    image = Image.new("RGB", (64, 48), (120, 30, 200))
    inputs = {k: v.to("meta") for k, v in expert.preprocess([image]).items()}
    with torch.no_grad():
        fmap = expert(inputs)
        maps = expert(inputs, layers=[spec.layers[0], spec.layers[-1]])
    _check_map(fmap, spec, 1)
    assert maps[0].channels == spec.layer_channels[0]
    assert maps[1].channels == spec.layer_channels[-1]
    if spec.num_stages:
        with torch.no_grad():
            staged = expert.run_staged(inputs)
        assert staged.features.shape == fmap.features.shape


@pytest.mark.parametrize("name", TINY)
def test_gradients_reach_every_used_parameter(
    name: str, mixed_images: dict[str, Image.Image]
) -> None:
    expert = _build(name)
    # leaf modules (Linear, Conv, norms, embeddings) that run must pass gradient to all their
    # parameters; a detach/no_grad inside the wrapper, or a layer computed and then thrown
    # away, shows up here
    ran: set[str] = set()
    hooks = [
        module.register_forward_hook(lambda m, i, o, n=n: ran.add(n))
        for n, module in expert.named_modules()
        if not any(True for _ in module.children())
    ]
    fmap = expert(expert.preprocess([mixed_images["RGB"], mixed_images["P"]]))
    for h in hooks:
        h.remove()
    weight = torch.randn_like(fmap.features)
    (fmap.features * weight).sum().backward()
    used = {
        f"{mod}.{p}" if mod else p
        for mod in ran
        for p, _ in expert.get_submodule(mod).named_parameters(recurse=False)
    }
    params = dict(expert.named_parameters())
    assert used, f"{name}: no parameter ran"
    dead = sorted(n for n in used if params[n].grad is None or not params[n].grad.abs().sum() > 0)
    assert not dead, f"{name}: parameters that ran but get no gradient: {dead}"
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in params.values())


def test_unknown_expert_names_list_the_valid_ones() -> None:
    with pytest.raises(KeyError) as err:
        experts.create_expert("convnext-huge-typo")
    message = str(err.value)
    assert "convnext-huge-typo" in message
    assert all(n in message for n in TINY)
    with pytest.raises(KeyError, match="valid experts"):
        experts.get_spec("nope")


def test_unknown_spec_overrides_are_rejected() -> None:
    with pytest.raises(TypeError, match="input_sise"):
        experts.create_expert(TINY[0], input_sise=(64, 64))


@pytest.fixture(scope="module")
def bad_image_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("bad_images")
    good = root / "good.png"
    Image.new("RGB", (64, 64), (1, 2, 3)).save(good)
    data = good.read_bytes()
    files = {
        "corrupt": (root / "corrupt.png", b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4),
        "truncated": (root / "truncated.png", data[: len(data) // 2]),
        "empty": (root / "empty.jpg", b""),
        "text": (root / "notes.jpg", b"this is not an image"),
    }
    for path, content in files.values():
        path.write_bytes(content)
    out = {k: str(p) for k, (p, _) in files.items()}
    out["missing"] = str(root / "does-not-exist.png")
    return out


@pytest.mark.parametrize("kind", ["corrupt", "truncated", "empty", "text", "missing"])
@pytest.mark.parametrize("name", TINY)
def test_bad_image_files_raise_image_error_naming_the_file(
    name: str, kind: str, bad_image_files: dict[str, str]
) -> None:
    path = bad_image_files[kind]
    with pytest.raises(experts.ImageError) as err:
        _meta_expert(name).preprocess([path])
    assert path in str(err.value)


def test_zoo_table_lists_every_preset_with_meta_parameter_counts() -> None:
    from experts.zoo import COLUMNS, zoo_table

    table = zoo_table()
    assert list(table.columns) == list(COLUMNS)
    assert list(table["name"]) == experts.list_experts()
    tiny = zoo_table("*-tiny").set_index("name")
    for name in TINY:
        built = experts.create_expert(name)
        assert tiny.loc[name, "parameters"] == sum(p.numel() for p in built.parameters())
        spec = built.spec
        assert tiny.loc[name, "channels"] == spec.channels
        assert tiny.loc[name, "grid"] == f"{spec.grid[0]}x{spec.grid[1]}"
    with pytest.raises(KeyError, match="valid experts"):
        zoo_table("no-such-*")


def test_cli_prints_the_zoo(capsys: pytest.CaptureFixture[str]) -> None:
    from moe_vision.cli import main

    assert main(["experts", "*-tiny"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in TINY) and "parameters" in out
    assert main(["experts", "nothing-matches"]) == 2
