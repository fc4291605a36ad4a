"""ConvNeXt, SAM and Pix2Struct experts against their libraries' own forwards and loaders.

Each wrapper must add nothing hidden: its map equals the library's own forward of the same
module on the same input; a checkpoint the library writes loads back to identical outputs; a
wrong, truncated or missing checkpoint names the file and the mismatch.
"""

from __future__ import annotations

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import save_file
from transformers import (
    Pix2StructConfig,
    Pix2StructForConditionalGeneration,
    Pix2StructImageProcessor,
    SamConfig,
    SamModel,
)

import experts
from experts.families.pix2struct import patch_rows_cols, scatter_grid


def _images(n: int, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    sizes = [(120, 90), (60, 200), (33, 33), (300, 40)]
    return [
        Image.fromarray(rng.integers(0, 256, (*sizes[i % 4], 3), dtype=np.uint8)) for i in range(n)
    ]


def _close(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------- ConvNeXt
def _timm_convnext(spec: experts.ExpertSpec, num_classes: int = 24) -> torch.nn.Module:
    """The full timm model of the preset, head included (as a CLIP tower checkpoint has it)."""
    torch.manual_seed(1)
    return timm.create_model(
        spec.arch["model"], num_classes=num_classes, **spec.arch["kwargs"]
    ).eval()


def test_convnext_equals_timm_forward_features_and_intermediates() -> None:
    expert = experts.create_expert("convnext-tiny").eval()
    x = expert.preprocess(_images(2))["pixel_values"]
    with torch.no_grad():
        fmap = expert({"pixel_values": x})
        ref_final, ref_stages = expert.model.forward_intermediates(x)
        stages = expert({"pixel_values": x}, layers=[0, 1, 2, 3])
    _close(fmap.features, expert.model.forward_features(x))
    _close(fmap.features, ref_final)
    for i, (m, ref) in enumerate(zip(stages, ref_stages)):
        _close(m.features, ref)
        assert m.stride == 4 * 2**i and m.channels == expert.spec.layer_channels[i]
        assert m.source == f"convnext-tiny:stage{i}"


def test_convnext_mean_std_come_from_timm_pretrained_cfg() -> None:
    for name in ("convnext-xxl-clip", "convnext-l-clip-320"):
        spec = experts.get_spec(name)
        cfg = timm.models.get_pretrained_cfg(f"{spec.arch['model']}.{spec.arch['pretrained_tag']}")
        assert spec.mean == tuple(cfg.mean) and spec.std == tuple(cfg.std)
        assert spec.input_size[0] in (cfg.input_size[1], 1024)  # native or Eagle's 1024
    big = experts.get_spec("convnext-xxl-clip")
    assert (big.channels, big.grid, big.patch_size) == (3072, (32, 32), 32)


def test_convnext_input_size_override_changes_the_grid() -> None:
    expert = experts.create_expert("convnext-tiny", input_size=(96, 160)).eval()
    assert expert.spec.grid == (3, 5)
    with torch.no_grad():
        fmap = expert(expert.preprocess(_images(1)))
    assert fmap.grid == (3, 5)
    with pytest.raises(ValueError, match="multiple of"):
        experts.create_expert("convnext-tiny", input_size=(100, 100))


@pytest.mark.parametrize("fmt", ["safetensors-file", "timm-folder", "openclip-file"])
def test_convnext_checkpoint_round_trip(fmt: str, tmp_path) -> None:
    spec = experts.get_spec("convnext-tiny")
    full = _timm_convnext(spec)
    sd = full.state_dict()
    if fmt == "safetensors-file":
        ckpt = tmp_path / "convnext.safetensors"
        save_file(sd, str(ckpt))
    elif fmt == "timm-folder":
        ckpt = tmp_path / "convnext"
        timm.models.save_for_hf(full, str(ckpt))
    else:  # OpenCLIP's layout: the timm trunk under visual.trunk.*, remapped by timm
        ckpt = tmp_path / "open_clip_pytorch_model.bin"
        torch.save(
            {f"visual.trunk.{k}": v for k, v in sd.items() if not k.startswith("head")}, ckpt
        )
    expert = experts.create_expert("convnext-tiny", checkpoint=str(ckpt)).eval()
    x = expert.preprocess(_images(2))
    with torch.no_grad():
        _close(expert(x).features, full.forward_features(x["pixel_values"]))


def test_convnext_bad_checkpoints_name_file_and_mismatch(tmp_path) -> None:
    spec = experts.get_spec("convnext-tiny")
    wrong = timm.create_model(spec.arch["model"], depths=(1, 1, 2, 1), dims=(16, 32, 64, 96))
    path = tmp_path / "wrong.safetensors"
    save_file(wrong.state_dict(), str(path))
    with pytest.raises(ValueError, match="shape mismatches") as err:
        experts.create_expert("convnext-tiny", checkpoint=str(path))
    assert str(path) in str(err.value) and "stages.3" in str(err.value)

    deeper = timm.create_model(spec.arch["model"], depths=(1, 1, 3, 1), dims=(16, 32, 64, 128))
    save_file(deeper.state_dict(), str(tmp_path / "deeper.safetensors"))
    with pytest.raises(ValueError, match="unexpected keys.*stages.2.blocks.2"):
        experts.create_expert("convnext-tiny", checkpoint=str(tmp_path / "deeper.safetensors"))

    good = tmp_path / "good.safetensors"
    save_file(_timm_convnext(spec).state_dict(), str(good))
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[:5000])
    with pytest.raises(ValueError, match="truncated") as err:
        experts.create_expert("convnext-tiny", checkpoint=str(truncated))
    assert str(truncated) in str(err.value)

    missing = tmp_path / "nowhere" / "weights.safetensors"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        experts.create_expert("convnext-tiny", checkpoint=str(missing))
    with pytest.raises(FileNotFoundError, match="holds none of"):
        experts.create_expert("convnext-tiny", checkpoint=str(tmp_path))


def test_hub_checkpoint_offline_fails_fast_and_says_how_to_get_it() -> None:
    with pytest.raises(FileNotFoundError, match="HF_HUB_OFFLINE.*hf download"):
        experts.create_expert("convnext-tiny", checkpoint="timm/convnext_xxlarge.clip_laion2b_soup")
    with pytest.raises(FileNotFoundError, match="facebook/sam-vit-large"):
        experts.create_expert("sam-tiny", pretrained=False, checkpoint="facebook/sam-vit-large")


# ---------------------------------------------------------------------------------- SAM
def _sam_model(spec: experts.ExpertSpec) -> SamModel:
    torch.manual_seed(2)
    model = SamModel(SamConfig(vision_config=dict(spec.arch))).eval()
    with torch.no_grad():  # SAM initialises these at zero: make them matter
        for name, p in model.vision_encoder.named_parameters():
            if "pos_embed" in name or "rel_pos" in name:
                p.normal_(0, 0.5)
    return model


def test_sam_equals_the_library_encoder_and_round_trips(tmp_path) -> None:
    spec = experts.get_spec("sam-tiny")
    full = _sam_model(spec)
    full.save_pretrained(tmp_path / "sam")  # a full SamModel folder, as on the hub
    expert = experts.create_expert("sam-tiny", checkpoint=str(tmp_path / "sam")).eval()
    x = expert.preprocess(_images(2))
    with torch.no_grad():
        ref = full.vision_encoder(x["pixel_values"], output_hidden_states=True)
        fmap = expert(x)
        blocks = expert(x, layers=list(spec.layers))
    assert fmap.features.shape == (2, 16, 8, 8)
    _close(fmap.features, ref.last_hidden_state)
    # hidden_states[0] is the embedding, hidden_states[i + 1] block i's output (B, H, W, C); a
    # near-zero init (the library's default before sam-tiny set one) hid an off-by-one here
    for i, m in enumerate(blocks):
        _close(m.features, ref.hidden_states[i + 1].permute(0, 3, 1, 2))
    assert len(ref.hidden_states) == len(blocks) + 1
    # staged: groups end at the global-attention blocks
    assert expert.stages == [(0, 2), (2, 4)]


def test_sam_other_input_size_resamples_the_position_embedding() -> None:
    spec = experts.get_spec("sam-tiny")
    full = _sam_model(spec)
    expert = experts.create_expert("sam-tiny", input_size=(160, 96)).eval()
    expert.encoder.load_state_dict(full.vision_encoder.state_dict())
    assert expert.spec.grid == (10, 6)
    x = expert.preprocess(_images(1))["pixel_values"]
    with torch.no_grad():
        fmap = expert({"pixel_values": x})
        state = expert.embed({"pixel_values": x})
        pos = timm.layers.resample_abs_pos_embed_nhwc(full.vision_encoder.pos_embed, [10, 6])
        patches = full.vision_encoder.patch_embed.projection(x).permute(0, 2, 3, 1)
    assert fmap.grid == (10, 6) and torch.isfinite(fmap.features).all()
    _close(state.hidden, patches + pos)
    with pytest.raises(ValueError, match=r"pixel_values must be \(B, 3, 160, 96\)"):
        expert({"pixel_values": torch.zeros(1, 3, 128, 128)})


def test_sam_bad_checkpoint_names_the_mismatch(tmp_path) -> None:
    spec = experts.get_spec("sam-tiny")
    other = SamModel(SamConfig(vision_config={**spec.arch, "hidden_size": 48}))
    other.save_pretrained(tmp_path / "other")
    with pytest.raises(ValueError, match="vision_encoder.*shape mismatches.*layers.0"):
        experts.create_expert("sam-tiny", checkpoint=str(tmp_path / "other"))


# ---------------------------------------------------------------------------------- Pix2Struct
def _pix2struct_model(spec: experts.ExpertSpec) -> Pix2StructForConditionalGeneration:
    torch.manual_seed(3)
    text = dict(hidden_size=32, num_layers=1, num_heads=2, d_ff=64, d_kv=16, vocab_size=64)
    cfg = Pix2StructConfig(vision_config=dict(spec.arch["config"]), text_config=text)
    return Pix2StructForConditionalGeneration(cfg).eval()


def test_pix2struct_preprocessing_equals_the_library_processor() -> None:
    # with a loose aspect bound the grid never binds, so the patches are exactly the processor's
    expert = experts.create_expert("pix2struct-tiny", arch={"max_aspect_ratio": 64.0})
    processor = Pix2StructImageProcessor()
    for image in _images(4):
        ref = processor(images=image, max_patches=64, return_tensors="pt")
        got = expert.preprocess_one(image)
        torch.testing.assert_close(got["flattened_patches"], ref["flattened_patches"][0])
        assert torch.equal(got["attention_mask"], ref["attention_mask"][0])


def test_pix2struct_grid_bound_keeps_aspect_ratio() -> None:
    spec = experts.get_spec("pix2struct-tiny")
    g = spec.grid[0]
    assert spec.grid == (11, 11) and g * g >= spec.max_patches  # floor(sqrt(64 * 2))
    for h, w in [(300, 4000), (4000, 300), (10, 10), (1, 1), (16, 1000)]:
        rows, cols = patch_rows_cols(h, w, 16, spec.max_patches, g)
        assert 1 <= rows <= g and 1 <= cols <= g and rows * cols <= spec.max_patches
        if h != w:
            assert (rows < cols) == (h < w) or min(rows, cols) == 1
    # a bound looser than the budget still never exceeds the budget
    assert patch_rows_cols(1, 4000, 16, 4, scatter_grid(4, 64.0)) == (1, 4)
    with pytest.raises(ValueError, match="max_aspect_ratio must be >= 1"):
        experts.create_expert("pix2struct-tiny", arch={"max_aspect_ratio": 0.5})
    # aspect ratio within the bound: exactly the processor's rule (full budget)
    assert patch_rows_cols(120, 90, 16, 64, g) == (9, 6)
    big = experts.get_spec("pix2struct-large")
    assert big.grid == (64, 64) and big.channels == 1536


def test_pix2struct_map_scatters_the_library_encoder(tmp_path) -> None:
    spec = experts.get_spec("pix2struct-tiny")
    full = _pix2struct_model(spec)
    full.save_pretrained(tmp_path / "p2s")  # full model: encoder.* and decoder.*
    expert = experts.create_expert("pix2struct-tiny", checkpoint=str(tmp_path / "p2s")).eval()
    inputs = expert.preprocess(_images(4))
    with torch.no_grad():
        ref = full.encoder(**inputs, output_hidden_states=True)
        fmap = expert(inputs)
        layers = expert(inputs, layers=list(spec.layers))
    flat, mask = inputs["flattened_patches"], inputs["attention_mask"]
    for b in range(4):  # brute force: every real token lands in its (row, col) cell
        expect_mask = torch.zeros(spec.grid, dtype=torch.bool)
        for t in range(int(mask[b].sum())):
            r, c = int(flat[b, t, 0]) - 1, int(flat[b, t, 1]) - 1
            expect_mask[r, c] = True
            _close(fmap.features[b, :, r, c], ref.last_hidden_state[b, t])
            for i, m in enumerate(layers):
                _close(m.features[b, :, r, c], ref.hidden_states[i + 1][b, t])
        assert torch.equal(fmap.mask[b], expect_mask)
        assert (fmap.features[b][:, ~expect_mask] == 0).all()


def test_pix2struct_rejects_inputs_that_do_not_fit_its_grid() -> None:
    big = experts.create_expert("pix2struct-tiny", arch={"max_aspect_ratio": 64.0})
    inputs = big.preprocess([Image.new("RGB", (4000, 100))])  # 1 x 64 patches
    expert = experts.create_expert("pix2struct-tiny")
    with pytest.raises(ValueError, match="do not fit its 11x11 grid"):
        expert(inputs)
    with pytest.raises(ValueError, match=r"flattened_patches \(B, N, 770\)"):
        expert({"flattened_patches": torch.zeros(1, 64, 10), "attention_mask": torch.ones(1, 64)})
    with pytest.raises(KeyError, match="flattened_patches"):
        expert({"pixel_values": torch.zeros(1, 3, 16, 16)})


def test_pix2struct_staged_injection_reaches_only_valid_cells() -> None:
    expert = experts.create_expert("pix2struct-tiny").eval()
    inputs = expert.preprocess(_images(2))
    with torch.no_grad():
        state = expert.embed(inputs)
        before = expert.to_map(state)
        state2 = expert.from_map(state, before + 1.0)  # what an adapter does between stages
        valid = state.extras["valid"]
        _close(state2.hidden[valid], state.hidden[valid] + 1.0)
        assert torch.equal(state2.hidden[~valid], state.hidden[~valid])


def test_hub_id_resolves_from_the_local_cache_offline(tmp_path, monkeypatch) -> None:
    """A hub id already in the Hugging Face cache loads offline (the cache layout hf writes)."""
    import huggingface_hub.constants

    spec = experts.get_spec("convnext-tiny")
    full = _timm_convnext(spec)
    repo = tmp_path / "models--someorg--convnext-test"
    commit = "0123456789abcdef0123456789abcdef01234567"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    (repo / "snapshots" / commit).mkdir(parents=True)
    save_file(full.state_dict(), str(repo / "snapshots" / commit / "model.safetensors"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    expert = experts.create_expert("convnext-tiny", checkpoint="someorg/convnext-test").eval()
    x = expert.preprocess(_images(1))
    with torch.no_grad():
        _close(expert(x).features, full.forward_features(x["pixel_values"]))


def test_pix2struct_max_patches_override_resizes_the_grid() -> None:
    expert = experts.create_expert("pix2struct-tiny", max_patches=32, num_stages=4)
    assert expert.spec.grid == (8, 8) and expert.stages == [(0, 1), (1, 2), (2, 3), (3, 4)]
    inputs = expert.preprocess(_images(2))
    assert inputs["flattened_patches"].shape == (2, 32, 770)
    with torch.no_grad():
        fmap = expert(inputs)
    assert fmap.grid == (8, 8) and fmap.mask.flatten(1).sum(1).le(32).all()
    with pytest.raises(ValueError, match="num_stages"):
        experts.create_expert("pix2struct-tiny", num_stages=9)
    with pytest.raises(ValueError, match="patch_embed_hidden_size"):
        experts.create_expert("pix2struct-tiny", patch_size=8)


@pytest.mark.parametrize("name", ["convnext-tiny", "sam-tiny", "pix2struct-tiny"])
def test_experts_run_in_the_dtype_of_their_weights(name: str) -> None:
    expert = experts.create_expert(name).eval()
    inputs = expert.preprocess(_images(2))  # float32 from preprocessing
    with torch.no_grad():
        ref = expert(inputs)
        wide = expert.double()(inputs)
    assert wide.features.dtype == torch.float64
    torch.testing.assert_close(wide.features.float(), ref.features, atol=1e-4, rtol=1e-4)


def test_sharded_save_pretrained_folder_loads(tmp_path) -> None:
    spec = experts.get_spec("sam-tiny")
    full = _sam_model(spec)
    full.vision_encoder.save_pretrained(tmp_path / "sharded", max_shard_size="50KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    expert = experts.create_expert("sam-tiny", checkpoint=str(tmp_path / "sharded")).eval()
    x = expert.preprocess(_images(1))
    with torch.no_grad():
        _close(expert(x).features, full.vision_encoder(x["pixel_values"]).last_hidden_state)
