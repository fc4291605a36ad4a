"""ViT experts (CLIP, SigLIP, DINOv2, EVA-02): maps, library parity, stages, loading, errors.

References are the libraries' own forwards (``transformers`` ``hidden_states`` /
``last_hidden_state``, timm ``forward_intermediates``) on the same normalised input.
"""

from __future__ import annotations

import json
import pickle
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from experts import create_expert, get_spec, list_experts
from experts.families._hf_vit import stage_groups

TINY = ["clip-tiny", "siglip-tiny", "dinov2-tiny", "eva02-tiny"]
HF_TINY = ["clip-tiny", "siglip-tiny", "dinov2-tiny"]
REAL = {
    # preset: (channels, grid at native size, depth)
    "clip-vit-l-336": (1024, (24, 24), 24),
    "siglip-so400m-384": (1152, (27, 27), 27),
    "dinov2-large": (1024, (37, 37), 24),
    "eva02-large": (1024, (32, 32), 24),
}


def _tokens_to_map(tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Library tokens ``(B, P + H*W, C)`` -> ``(B, C, H, W)``, written independently."""
    b, n, c = tokens.shape
    patches = tokens[:, n - grid[0] * grid[1] :]
    return patches.reshape(b, grid[0], grid[1], c).permute(0, 3, 1, 2)


def _library_block(expert, x: torch.Tensor, block: int, norm: bool) -> torch.Tensor:
    """The library's own forward: block ``block``'s patch map (through the final norm if
    ``norm`` and ``block`` is the last)."""
    grid = (x.shape[2] // expert.spec.patch_size, x.shape[3] // expert.spec.patch_size)
    model = expert.model
    if expert.spec.library == "timm":
        maps = model.forward_intermediates(x, indices=[block], norm=norm, intermediates_only=True)
        return maps[0]
    kwargs = {"output_hidden_states": True}
    if expert.spec.family != "dinov2":  # DINOv2 always interpolates; the others take a flag
        kwargs["interpolate_pos_encoding"] = True
    out = model(x, **kwargs)
    if norm:
        assert block == len(out.hidden_states) - 2, "feature_norm is only used on the last block"
        return _tokens_to_map(out.last_hidden_state, grid)
    return _tokens_to_map(out.hidden_states[block + 1], grid)


@pytest.fixture(scope="module")
def tiny() -> dict[str, object]:
    torch.manual_seed(0)
    return {name: create_expert(name).eval() for name in TINY}


# ---------------------------------------------------------------------------- mixed images
@pytest.mark.parametrize("name", TINY)
def test_tiny_on_mixed_images(name, tiny, mixed_images) -> None:
    expert = tiny[name]
    spec = expert.spec
    inputs = expert.preprocess(list(mixed_images.values()))
    assert inputs["pixel_values"].shape == (len(mixed_images), 3, *spec.input_size)
    with torch.no_grad():
        fmap = expert(inputs)
    assert fmap.features.shape == (len(mixed_images), spec.channels, *spec.grid)
    assert fmap.stride == spec.patch_size and fmap.source == spec.name and fmap.mask is None
    assert torch.isfinite(fmap.features).all()
    # each image's map does not depend on the rest of the batch
    with torch.no_grad():
        alone = expert(expert.preprocess(mixed_images["strip"]))
    torch.testing.assert_close(alone.features[0], fmap.features[-1], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", TINY)
def test_preprocessing_uses_own_mean_std(name, tiny, mixed_images) -> None:
    spec = tiny[name].spec
    image = mixed_images["RGB"]
    h, w = spec.input_size
    resized = np.asarray(image.resize((w, h), Image.Resampling.BICUBIC), dtype=np.float32) / 255
    expected = (resized - np.array(spec.mean)) / np.array(spec.std)
    got = tiny[name].preprocessor(image)["pixel_values"]
    np.testing.assert_allclose(got.permute(1, 2, 0).numpy(), expected, atol=1e-5)
    # data-loader workers get a picklable preprocessor that needs no weights
    worker = pickle.loads(pickle.dumps(tiny[name].preprocessor))
    assert torch.equal(worker(image)["pixel_values"], got)
    json.dumps(spec.to_dict())  # specs are JSON (run folders, feature-cache keys)


def test_families_have_their_own_normalisation() -> None:
    stats = {get_spec(n).family: (get_spec(n).mean, get_spec(n).std) for n in TINY}
    assert stats["clip"][0] == pytest.approx((0.48145466, 0.4578275, 0.40821073))
    assert stats["siglip"] == ((0.5,) * 3, (0.5,) * 3)
    assert stats["dinov2"][0] == pytest.approx((0.485, 0.456, 0.406))
    assert len(set(stats.values())) == 3  # EVA-02 (timm cfg) uses the OpenAI CLIP statistics


# ---------------------------------------------------------------------------- library parity
@pytest.mark.parametrize("name", TINY)
@pytest.mark.parametrize("size", [None, (96, 80)])
def test_map_equals_library_forward(name, size) -> None:
    expert = create_expert(name, **({"input_size": size} if size else {})).eval()
    spec = expert.spec
    x = torch.randn(2, 3, *spec.input_size)
    with torch.no_grad():
        fmap = expert({"pixel_values": x})
        ref = _library_block(expert, x, expert.feature_block, expert.feature_norm)
    assert fmap.features.shape == (2, spec.channels, *spec.grid)
    if size:
        assert spec.grid == (size[0] // spec.patch_size, size[1] // spec.patch_size)
    torch.testing.assert_close(fmap.features, ref, atol=1e-5, rtol=1e-5)


def test_readout_layers_are_spec_options() -> None:
    assert get_spec("clip-vit-l-336").arch["feature_layer"] == -2  # LLaVA's penultimate block
    assert get_spec("dinov2-large").arch["feature_norm"] is True
    last = create_expert("clip-tiny", arch={"feature_layer": -1, "feature_norm": True}).eval()
    x = torch.randn(1, 3, *last.spec.input_size)
    with torch.no_grad():
        out = last.model(x)
        got = last({"pixel_values": x}).features
    normed = last.model.post_layernorm(out.last_hidden_state)
    torch.testing.assert_close(got, _tokens_to_map(normed, last.spec.grid))


@pytest.mark.parametrize("name", TINY)
def test_intermediate_layers(name, tiny) -> None:
    expert = tiny[name]
    x = torch.randn(2, 3, *expert.spec.input_size)
    with torch.no_grad():
        maps = expert({"pixel_values": x}, layers=[0, -1])
        refs = [_library_block(expert, x, b, norm=False) for b in (0, expert.depth - 1)]
    assert [m.source for m in maps] == [f"{name}:block0", f"{name}:block{expert.depth - 1}"]
    for fmap, ref, ch in zip(maps, refs, expert.spec.layer_channels[:: expert.depth - 1]):
        assert fmap.channels == ch
        torch.testing.assert_close(fmap.features, ref, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="readable layers are"):
        expert({"pixel_values": x}, layers=[expert.depth])


# ---------------------------------------------------------------------------- staged
@pytest.mark.parametrize("name", TINY)
def test_staged_equals_full(name) -> None:
    expert = create_expert(name, input_size=(72, 64)).eval()
    inputs = {"pixel_values": torch.randn(2, 3, 72, 64)}
    with torch.no_grad():
        full = expert(inputs).features
        staged = expert.run_staged(inputs).features
        state = expert.embed(inputs)
        for i in range(expert.num_stages):  # through to_map/from_map, as an adapter does
            state = expert.run_stage(state, i)
            state = expert.from_map(state, expert.to_map(state))
        roundtrip = expert.finish(state).features
    assert torch.equal(full, staged)
    assert torch.equal(full, roundtrip)
    assert expert.to_map(expert.embed(inputs)).shape == (2, expert.spec.channels, 9, 8)
    with pytest.raises(IndexError, match="stages"):
        expert.run_stage(expert.embed(inputs), expert.num_stages)


def test_stage_groups_follow_array_split() -> None:
    for depth, stages in [(24, 4), (27, 3), (23, 4), (5, 2), (4, 4)]:
        expected = [list(g) for g in np.array_split(np.arange(depth), stages)]
        assert [list(g) for g in stage_groups(depth, stages)] == expected
    assert [len(g) for g in create_expert("clip-vit-l-336", device="meta").stage_groups] == [6] * 4
    with pytest.raises(ValueError, match="num_stages"):
        get_spec("clip-tiny", num_stages=5)


def test_gradients_reach_used_blocks_only() -> None:
    expert = create_expert("clip-tiny")  # reads block 2 of 4
    x = torch.randn(1, 3, *expert.spec.input_size, requires_grad=True)
    expert({"pixel_values": x}).features.square().sum().backward()
    blocks = expert.model.encoder.layers
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is not None for p in blocks[expert.feature_block].parameters())
    assert all(p.grad is None for p in blocks[expert.feature_block + 1].parameters())
    assert all(p.grad is None for p in expert.model.post_layernorm.parameters())


# ---------------------------------------------------------------------------- real presets
@pytest.mark.parametrize("name", list(REAL))
def test_real_preset_on_meta(name) -> None:
    channels, grid, depth = REAL[name]
    spec = get_spec(name)
    assert (spec.channels, spec.grid, len(spec.layers)) == (channels, grid, depth)
    expert = create_expert(name, device="meta")
    assert all(p.is_meta for p in expert.parameters())
    x = torch.empty(1, 3, *spec.input_size, device="meta")
    fmap = expert({"pixel_values": x})
    assert fmap.features.shape == (1, channels, *grid)


def test_clip_at_448_interpolates_to_32x32() -> None:
    expert = create_expert("clip-vit-l-336", device="meta", input_size=(448, 448))
    assert expert.spec.grid == (32, 32)
    assert expert.spec.arch["image_size"] == 336  # the position table keeps its trained size
    fmap = expert({"pixel_values": torch.empty(1, 3, 448, 448, device="meta")})
    assert fmap.features.shape == (1, 1024, 32, 32)


# ---------------------------------------------------------------------------- loading
def _save(expert, folder: Path) -> Path:
    """Write ``expert``'s weights the way its library does; returns what to pass as checkpoint."""
    if expert.spec.library == "timm":
        path = folder / "model.safetensors"
        save_file(expert.model.state_dict(), str(path))
        return path
    expert.model.save_pretrained(folder)
    return folder


def _weights_file(ckpt: Path) -> Path:
    return ckpt if ckpt.is_file() else ckpt / "model.safetensors"


@pytest.mark.parametrize("name", TINY)
def test_checkpoint_round_trip(name, tiny, tmp_path) -> None:
    torch.manual_seed(123)  # other weights than the seed-0 `tiny` expert
    source = create_expert(name).eval()
    ckpt = _save(source, tmp_path)
    loaded = create_expert(name, checkpoint=str(ckpt)).eval()
    assert loaded.spec.checkpoint == str(ckpt)
    x = {"pixel_values": torch.randn(2, 3, *source.spec.input_size)}
    with torch.no_grad():
        assert torch.equal(loaded(x).features, source(x).features)
        assert not torch.equal(tiny[name](x).features, source(x).features)


@pytest.mark.parametrize("name", TINY)
def test_expert_state_dict_file_loads(name, tmp_path) -> None:
    torch.manual_seed(7)
    source = create_expert(name).eval()
    path = tmp_path / "expert.safetensors"
    save_file(source.state_dict(), str(path))  # the expert's own keys, under "model."
    loaded = create_expert(name, checkpoint=str(path)).eval()
    x = {"pixel_values": torch.randn(1, 3, *source.spec.input_size)}
    with torch.no_grad():
        assert torch.equal(loaded(x).features, source(x).features)


def test_eva02_drops_the_classifier_of_a_timm_file(tmp_path) -> None:
    import timm

    from experts.families._hf_vit import library_kwargs

    kwargs = library_kwargs(get_spec("eva02-tiny").arch)
    classifier = timm.create_model(kwargs.pop("model_name"), **{**kwargs, "num_classes": 5})
    path = tmp_path / "with_head.safetensors"
    save_file(classifier.state_dict(), str(path))
    expert = create_expert("eva02-tiny", checkpoint=str(path)).eval()
    x = torch.randn(1, 3, *expert.spec.input_size)
    with torch.no_grad():
        ref = classifier.eval().forward_features(x)
    torch.testing.assert_close(expert({"pixel_values": x}).features, _tokens_to_map(ref, (8, 8)))


def test_clip_loads_full_clip_model_checkpoint(tmp_path) -> None:
    """The hub checkpoint is a whole CLIPModel; its vision tower loads into the expert."""
    from transformers import CLIPConfig, CLIPModel

    from experts.families._hf_vit import library_kwargs

    spec = get_spec("clip-tiny")
    text = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1}
    text |= {"num_attention_heads": 2, "vocab_size": 99}
    full = CLIPModel(CLIPConfig(text_config=text, vision_config=library_kwargs(spec.arch)))
    full.save_pretrained(tmp_path)
    expert = create_expert("clip-tiny", checkpoint=str(tmp_path)).eval()
    x = torch.randn(1, 3, *spec.input_size)
    with torch.no_grad():
        hidden = full.vision_model(x, output_hidden_states=True).hidden_states
        ref = hidden[expert.feature_block + 1]
        got = expert({"pixel_values": x}).features
    torch.testing.assert_close(got, _tokens_to_map(ref, spec.grid))


@pytest.mark.parametrize("name", TINY)
def test_missing_checkpoint_names_path(name, tmp_path) -> None:
    missing = tmp_path / "nowhere" / "weights.safetensors"
    with pytest.raises(FileNotFoundError, match="nowhere"):
        create_expert(name, checkpoint=str(missing))


def test_folder_without_config_names_the_file(tmp_path) -> None:
    save_file({"x": torch.zeros(1)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(FileNotFoundError, match="config.json"):
        create_expert("dinov2-tiny", checkpoint=str(tmp_path))


@pytest.mark.parametrize("name", TINY)
def test_truncated_checkpoint_is_a_clear_error(name, tmp_path) -> None:
    ckpt = _save(create_expert(name), tmp_path)
    weights = _weights_file(ckpt)
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"(cannot read|incomplete|does not fit).*") as err:
        create_expert(name, checkpoint=str(ckpt))
    assert str(ckpt) in str(err.value) or str(weights) in str(err.value)


class _TokensOnlyLayer(torch.nn.Module):
    """A DINOv2 layer as transformers up to 5.17 wrote it: ``forward(hidden_states)`` alone."""

    def __init__(self, layer: torch.nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.layer(hidden_states, attention_mask=None)


def test_blocks_are_called_the_way_their_transformers_release_takes_them() -> None:
    """CLIP's and SigLIP's layers require ``attention_mask``; DINOv2's took only the tokens up to
    transformers 5.17 (the GPU image's) and take an optional mask from 5.18."""
    torch.manual_seed(0)
    expert = create_expert("dinov2-tiny").eval()
    pixels = torch.randn(2, 3, *expert.spec.input_size)
    with torch.no_grad():
        expected = expert({"pixel_values": pixels}).features
        layers = expert.model.encoder.layer
        for i, layer in enumerate(layers):
            layers[i] = _TokensOnlyLayer(layer)
        torch.testing.assert_close(expert({"pixel_values": pixels}).features, expected)


def test_weights_with_another_releases_module_names_name_the_library_version() -> None:
    """transformers 5.18 renamed DINOv2's attention (``attention.attention.query`` ->
    ``attention.q_proj``...): weights written under one release do not load under the other,
    and the error says which transformers is installed."""
    import transformers

    expert = create_expert("dinov2-tiny")
    state = {k.replace("q_proj", "query"): v for k, v in expert.model.state_dict().items()}
    assert state.keys() != expert.model.state_dict().keys()
    with pytest.raises(ValueError, match="missing keys") as err:
        expert.load_state(state, "old.safetensors")
    assert f"under transformers {transformers.__version__}: " in str(err.value)


@pytest.mark.parametrize("name", TINY)
def test_checkpoint_missing_a_tensor_names_it(name, tmp_path) -> None:
    ckpt = _save(create_expert(name), tmp_path)
    weights = _weights_file(ckpt)
    state = load_file(str(weights))
    dropped = sorted(state)[-1]
    del state[dropped]
    save_file(state, str(weights), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="missing") as err:
        create_expert(name, checkpoint=str(ckpt))
    assert dropped.split(".")[-1] in str(err.value)


@pytest.mark.parametrize("name", TINY)
def test_wrong_shaped_checkpoint_names_the_mismatch(name, tmp_path) -> None:
    other = create_expert(name, arch={_width_key(name): 32})
    ckpt = _save(other, tmp_path)
    with pytest.raises(ValueError, match=r"(shape mismatch|another architecture).*32") as err:
        create_expert(name, checkpoint=str(ckpt))
    assert str(ckpt) in str(err.value)


def _width_key(name: str) -> str:
    return "embed_dim" if get_spec(name).library == "timm" else "hidden_size"


@pytest.mark.parametrize(
    "name, checkpoint",
    [
        ("clip-tiny", "openai/clip-vit-large-patch14-336"),
        ("siglip-tiny", "google/siglip-so400m-patch14-384"),
        ("dinov2-tiny", "facebook/dinov2-large"),
        ("eva02-tiny", "eva02_large_patch14_448.mim_m38m_ft_in22k_in1k"),
        ("eva02-tiny", "timm/eva02_large_patch14_448.mim_m38m_ft_in22k_in1k"),
    ],
)
def test_offline_hub_id_fails_fast(name, checkpoint, monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.monotonic()
    with pytest.raises(FileNotFoundError, match="HF_HUB_OFFLINE=1") as err:
        create_expert(name, checkpoint=checkpoint)
    assert checkpoint in str(err.value)
    assert time.monotonic() - start < 20


def test_unknown_timm_weights_list_the_valid_ones() -> None:
    with pytest.raises(FileNotFoundError, match="mim_m38m_ft_in22k_in1k"):
        create_expert("eva02-tiny", checkpoint="eva02_large_patch14_448.no_such_tag")
    with pytest.raises(ValueError, match="are for eva02_base_patch14_448"):
        create_expert("eva02-tiny", checkpoint="eva02_base_patch14_448.mim_in22k_ft_in22k_in1k")


# ---------------------------------------------------------------------------- bad input
def test_unknown_name_lists_valid_ones() -> None:
    with pytest.raises(KeyError, match="clip-tiny.*dinov2-tiny") as err:
        create_expert("clip-vit-h-14")
    for name in [*TINY, *REAL]:
        assert name in str(err.value)
    assert set(TINY) <= set(list_experts("*-tiny"))


@pytest.mark.parametrize(
    "overrides, match",
    [
        ({"arch": {"feature_layer": 4}}, "feature_layer"),
        ({"arch": {"feature_norm": "yes"}}, "feature_norm"),
        ({"channels": 32}, "derived from arch"),
        ({"input_size": (4, 4)}, "smaller than one patch"),
        ({"colour": "red"}, "unknown expert spec fields"),
    ],
)
def test_bad_overrides_raise(overrides, match) -> None:
    with pytest.raises((ValueError, TypeError), match=match):
        create_expert("clip-tiny", **overrides)


@pytest.mark.parametrize(
    "inputs, match",
    [
        ({"pixels": torch.zeros(1, 3, 64, 64)}, "pixel_values"),
        ({"pixel_values": torch.zeros(3, 64, 64)}, r"\(B, 3, H, W\)"),
        ({"pixel_values": torch.zeros(1, 1, 64, 64)}, r"got \(1, 1, 64, 64\)"),
    ],
)
@pytest.mark.parametrize("name", ["clip-tiny", "eva02-tiny"])
def test_bad_inputs_raise(name, tiny, inputs, match) -> None:
    run: Callable = tiny[name]
    with pytest.raises(ValueError, match=match):
        run(inputs)
