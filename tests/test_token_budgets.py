"""Visual-token budgets in the model (ModelConfig.token_budget): 100% is bit-identical, a budget
shortens the LLM's sequence, the ragged splice against a loop, tiled canvases whose padding never
takes an LLM position, and the real-size 12-tile setting within InternVL's 3,328 tokens (meta)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from moe_vision.model import visual_budget
from moe_vision.model.config import ModelConfig
from moe_vision.model.image_tokens import splice_visual_tokens
from moe_vision.model.mllm import MoEVisionModel

PAIR = dict(experts=["clip-tiny", "convnext-tiny"], llm="tiny-qwen2")
FUSIONS = {
    "channel_concat": {"grid": [4, 4], "dim": 32},
    "sequence_append": {"dim": 32},
}


def _model(**kw) -> MoEVisionModel:
    torch.manual_seed(0)
    return MoEVisionModel(ModelConfig(**kw)).eval()


def _batch(model: MoEVisionModel, shapes=((40, 60), (32, 32))) -> tuple[torch.Tensor, list]:
    rng = np.random.default_rng(0)
    ims = [Image.fromarray(rng.integers(0, 256, (*s, 3), dtype=np.uint8)) for s in shapes]
    inputs = [
        {k: torch.stack([pre(im)[k] for im in ims]) for k in pre(ims[0])}
        for pre in model.preprocessors
    ]
    img = model.image_token_id
    ids = torch.tensor([[15, 16, img, 17, 18], [19, img, 13, 14, 12]])[: len(ims)]
    return ids, inputs


@pytest.mark.parametrize("fusion", sorted(FUSIONS))
def test_full_budget_is_bit_identical(fusion):
    base = dict(PAIR, fusion=fusion, fusion_options=FUSIONS[fusion])
    plain = _model(**base)
    ids, inputs = _batch(plain)
    with torch.no_grad():
        want = plain(ids, images=inputs).logits
    full_budgets = [
        {"reducer": "tome", "fraction": 1.0},
        {"reducer": "text_guided", "tokens": 10_000, "allocation": "equal"},
        {"reducer": "visionzip", "experts": {plain.fusion.specs[0].name: {"fraction": 1.0}}},
    ]
    if fusion == "channel_concat":
        full_budgets[2] = {"reducer": "visionzip", "tokens": plain.num_visual_tokens}
    for budget in full_budgets:
        model = _model(**base, token_budget=budget)
        assert model.budget is None and model.num_visual_tokens == plain.num_visual_tokens
        with torch.no_grad():
            assert torch.equal(model(ids, images=inputs).logits, want), budget
    assert "token_budget" not in ModelConfig(**base).to_dict()  # cell ids unchanged


@pytest.mark.parametrize("reducer", ["tome", "visionzip", "text_guided", "in_order"])
def test_half_budget_shortens_the_sequence_and_trains(reducer):
    base = dict(PAIR, fusion="sequence_append", fusion_options=FUSIONS["sequence_append"])
    plain = _model(**base)
    model = _model(**base, token_budget={"reducer": reducer, "fraction": 0.5})
    assert model.budget.names == ["clip-tiny", "convnext-tiny"]
    assert model.num_visual_tokens == plain.num_visual_tokens // 2
    ids, inputs = _batch(model)
    labels = torch.where(ids == model.image_token_id, -100, ids)
    out = model(ids, images=inputs, labels=labels)
    assert out.logits.shape[1] == ids.shape[1] - 1 + model.num_visual_tokens
    out.loss.backward()
    assert model.fusion.projs[0].weight.grad.abs().sum() > 0  # the kept tokens train fusion
    assert model.generate([Image.new("RGB", (40, 40))], ["<image> what?"], max_new_tokens=2)


def test_ragged_splice_matches_a_loop():
    torch.manual_seed(1)
    embed = torch.nn.Embedding(50, 6)
    img = 3
    ids = torch.tensor([[5, img, 6, img, 7], [8, 9, img, 10, 11], [12, 13, 14, 15, 16]])
    visual = torch.randn(3, 4, 6)
    vmask = torch.tensor([[1, 0, 1, 1], [0, 0, 1, 0], [1, 1, 1, 1]], dtype=torch.bool)
    labels = ids.clone()
    got, mask, lab = splice_visual_tokens(
        ids, visual, embed, img, "<image>", 64, None, labels, False, vmask
    )
    with torch.no_grad():
        m, rows = 0, []
        for r in range(3):
            parts = []
            for t in ids[r].tolist():
                if t == img:
                    parts.append(visual[m][vmask[m]])
                    m += 1
                else:
                    parts.append(embed(torch.tensor([t])))
            rows.append(torch.cat(parts))
    length = max(len(r) for r in rows)
    assert got.shape[1] == length == 4 + 4  # row 1: 4 text tokens, 4 valid visual tokens
    for r, row in enumerate(rows):
        assert torch.equal(got[r, : len(row)], row)
        assert mask[r].tolist() == [1] * len(row) + [0] * (length - len(row))
    assert int((lab[0, : len(rows[0])] == -100).sum()) == 4  # visual positions: no label


def test_text_query_is_the_prompt_without_answer_or_placeholder():
    model = _model(**PAIR, fusion="channel_concat", fusion_options=FUSIONS["channel_concat"])
    ids, _ = _batch(model)
    labels = torch.tensor([[-100, -100, -100, -100, 18], [-100, -100, -100, 14, 12]])
    q = visual_budget.prompt_query(model, ids, None, labels)
    emb = model.llm.get_input_embeddings()
    with torch.no_grad():
        torch.testing.assert_close(q[0], emb(torch.tensor([15, 16, 17])).mean(0))
        torch.testing.assert_close(q[1], emb(torch.tensor([19, 13])).mean(0))


def test_tiled_canvas_padding_never_takes_an_llm_position():
    """A 2-tile dynamic canvas (2 x 2 tile slots): the in_order budget of 2 tiles keeps every
    valid tile and the thumbnail; padding tiles take no position (they did without a budget)."""
    tiling = {"max_tiles": 2, "thumbnail": True}
    base = dict(
        experts=["siglip-tiny", "convnext-tiny"],
        expert_options={"siglip-tiny": {"tiling": tiling}},
        fusion="sequence_append",
        fusion_options={"per_expert_grid": True},
        compressor="pixel_shuffle",
        compressor_options={"token_order": "tiles", "tile": [8, 8]},
        llm="tiny-qwen2",
    )
    plain = _model(**base)
    per_tile = 16  # 8 x 8 patches, pixel-shuffled
    budget = {"reducer": "in_order", "experts": {"siglip-tiny": {"tokens": 2 * per_tile}}}
    model = _model(**base, token_budget=budget)
    assert model.budget.names == ["siglip-tiny", "siglip-tiny:thumbnail", "convnext-tiny"]
    assert model.budget.kept == [32, 16, 4] and plain.num_visual_tokens == 64 + 16 + 4
    ids, inputs = _batch(model, shapes=((30, 100), (32, 32)))  # 1 x 2 tiles, 1 tile
    with torch.no_grad():
        ref = plain.encode_images(inputs)  # (2, 96, D), padding tiles included
        tokens, mask = model.encode_visual(inputs)
        embeds, attn, _ = model.embed_inputs(ids, images=inputs)
    for i, tiles in enumerate((2, 1)):
        want = torch.cat([ref[i, : tiles * per_tile], ref[i, 64:]])  # valid tiles, thumb, convnext
        assert torch.equal(tokens[i][mask[i]], want)
        assert int(attn[i].sum()) == ids.shape[1] - 1 + len(want)
    assert embeds.shape[1] == ids.shape[1] - 1 + 2 * per_tile + 16 + 4  # not 84 tokens


def test_twelve_tile_setting_fits_internvl_budget_on_meta():
    """SigLIP-so400m @448 tiled up to 12 + thumbnail, pixel shuffle per tile: the canvas holds
    144 tile slots (37,120 tokens with the thumbnail); a 12-tile in_order budget keeps 3,328."""
    tiling = {"max_tiles": 12, "thumbnail": True}
    name = "siglip-so400m-384"
    base = dict(
        experts=[name],
        expert_options={name: {"device": "meta", "input_size": [448, 448], "tiling": tiling}},
        fusion="sequence_append",
        fusion_options={"per_expert_grid": True, "dim": 64},
        compressor="pixel_shuffle",
        compressor_options={"token_order": "tiles", "tile": [32, 32]},
        llm="tiny-qwen2",
    )
    plain = MoEVisionModel(ModelConfig(**base))
    assert plain.num_visual_tokens == 37_120 == (144 + 1) * 256
    budget = {"reducer": "in_order", "experts": {name: {"tokens": 12 * 256}}}
    model = MoEVisionModel(ModelConfig(**base, token_budget=budget))
    assert model.budget.kept == [3072, 256]  # thumbnail always, then 12 tiles
    assert model.num_visual_tokens == 3328


def test_bench_section_rows_per_budget(tmp_path):
    from moe_vision.bench import BenchConfig, list_sections
    from moe_vision.bench.token_budgets import budget_rows

    assert "token_budgets" in list_sections()
    cfg = BenchConfig(batch_size=2, repeats=1, warmup=0)
    rows = {
        f: {
            r["metric"]: r["value"]
            for r in budget_rows("tome", f, cfg, torch.device("cpu"), tmp_path)
        }
        for f in (1.0, 0.5)
    }
    assert rows[0.5]["visual_tokens"] == rows[1.0]["visual_tokens"] / 2
    assert rows[0.5]["prefill_flops_per_sample"] < rows[1.0]["prefill_flops_per_sample"]
