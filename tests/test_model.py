"""MoEVisionModel: splicing against a loop reference, loss masking, gradients, generate,
checkpointing, the feature-cache path, save/load round trip and bad input."""

from __future__ import annotations

import json
from pathlib import Path
from unittest.mock import patch

import pytest
import synthetic
import torch
import torch.nn.functional as F

from moe_vision.data.benchmark import BenchmarkSizes, generate_benchmark
from moe_vision.data.llava import LlavaDataset
from moe_vision.data.records import IGNORE_INDEX
from moe_vision.model.config import ModelConfig
from moe_vision.model.mllm import MoEVisionModel

CONFIG = ModelConfig(
    experts=["clip-tiny", "convnext-tiny"],
    fusion="channel_concat",
    fusion_options={"grid": [4, 4], "dim": 48},
    llm="tiny-qwen2",
)


@pytest.fixture(scope="module")
def bench(tmp_path_factory: pytest.TempPathFactory):
    sizes = BenchmarkSizes(align=6, instruct=12, val=6, test=6)
    return generate_benchmark(tmp_path_factory.mktemp("model") / "b", seed=1, sizes=sizes)


@pytest.fixture(scope="module")
def model() -> MoEVisionModel:
    torch.manual_seed(0)
    return MoEVisionModel.from_config(CONFIG).eval()


@pytest.fixture(scope="module")
def batch(model, bench) -> dict:
    ds = LlavaDataset(
        bench.split("instruct"),
        bench.images,
        model.preprocessors,
        model.tokenizer,
        max_length=model.max_length,
        num_visual_tokens=model.num_visual_tokens,
    )
    return ds.collate([ds[i] for i in range(8)])


def _loop_splice(model, input_ids, visual, mask, labels):
    """Reference: per-row concatenation around the image token."""
    embed = model.llm.get_input_embeddings()
    rows, masks, labs = [], [], []
    for r in range(input_ids.shape[0]):
        p = int((input_ids[r] == model.image_token_id).nonzero()[0, 0])
        n = visual.shape[1]
        rows.append(torch.cat([embed(input_ids[r, :p]), visual[r], embed(input_ids[r, p + 1 :])]))
        masks.append(torch.cat([mask[r, :p], torch.ones(n, dtype=mask.dtype), mask[r, p + 1 :]]))
        ignore = torch.full((n,), IGNORE_INDEX)
        labs.append(torch.cat([labels[r, :p], ignore, labels[r, p + 1 :]]))
    return torch.stack(rows), torch.stack(masks), torch.stack(labs)


def test_structure_and_token_count(model) -> None:
    assert model.num_visual_tokens == 16 == model.fusion.num_tokens
    names = {n.split(".")[0] for n, _ in model.named_parameters()}
    assert names == {"experts", "fusion", "projector", "llm"}
    assert any(n.startswith("experts.1.") for n, _ in model.named_parameters())
    assert len(model.preprocessors) == 2
    assert model.max_length == model.llm.config.max_position_embeddings


def test_splice_matches_loop_reference(model, batch) -> None:
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    with torch.no_grad():
        visual = model.encode_images(batch["images"])
        assert visual.shape == (8, model.num_visual_tokens, model.llm.config.hidden_size)
        got = model.splice(ids, visual, mask, labels)
        want = _loop_splice(model, ids, visual, mask, labels)
    for g, w in zip(got, want):
        assert torch.equal(g, w)


def test_loss_is_cross_entropy_on_answer_tokens_only(model, batch) -> None:
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    with torch.no_grad():
        out = model(ids, mask, labels, batch["images"])
        visual = model.encode_images(batch["images"])
        embeds, full_mask, full_labels = _loop_splice(model, ids, visual, mask, labels)
        logits = model.llm(inputs_embeds=embeds, attention_mask=full_mask).logits
    assert out.logits.shape == (8, ids.shape[1] - 1 + model.num_visual_tokens, len(model.tokenizer))
    targets = full_labels[:, 1:]
    keep = targets != IGNORE_INDEX
    reference = F.cross_entropy(logits[:, :-1][keep], targets[keep])
    torch.testing.assert_close(out.loss, reference, rtol=1e-5, atol=1e-6)
    # Only answer tokens and end-of-turn tokens are trained.
    trained = set(targets[keep].tolist())
    assert model.tokenizer.eos_token_id in trained
    assert model.image_token_id not in trained and model.tokenizer.pad_token_id not in trained


def test_loss_at_label_positions_equals_the_full_loss_and_gradients(model, batch) -> None:
    """``logits="labels"`` (training) runs the LM head only where a label is predicted: same
    loss and same gradients as the LLM's own loss over every position."""
    args = (batch["input_ids"], batch["attention_mask"], batch["labels"], batch["images"])
    model.train()
    grads = {}
    for mode in ("all", "labels"):
        model.zero_grad()
        out = model(*args, logits=mode)
        out.loss.backward()
        named = model.named_parameters()
        grads[mode] = (
            out.loss.detach(),
            {n: p.grad.clone() for n, p in named if p.grad is not None},
        )
    model.eval()
    model.zero_grad()
    torch.testing.assert_close(grads["labels"][0], grads["all"][0], rtol=1e-6, atol=1e-7)
    assert grads["labels"][1].keys() == grads["all"][1].keys()
    for name, g in grads["all"][1].items():
        torch.testing.assert_close(grads["labels"][1][name], g, rtol=1e-4, atol=1e-7, msg=name)
    answer_rows = (batch["labels"] != IGNORE_INDEX).sum()
    assert out.logits.shape[1] < batch["input_ids"].shape[1]  # far fewer positions than tokens
    assert out.logits.shape[1] >= int(answer_rows > 0)
    with pytest.raises(ValueError, match="logits must be"):
        model(*args, logits="some")


def test_gradients_reach_every_module(model, batch) -> None:
    model.zero_grad()
    model.train()
    out = model(batch["input_ids"], batch["attention_mask"], batch["labels"], batch["images"])
    out.loss.backward()
    model.eval()
    for prefix in ("experts.0.", "experts.1.", "fusion.", "projector.", "llm."):
        grads = [p.grad for n, p in model.named_parameters() if n.startswith(prefix)]
        assert any(g is not None and g.abs().sum() > 0 for g in grads), prefix
    model.zero_grad()


def test_no_gradient_through_placeholder_or_padding(model, batch) -> None:
    """The text embeddings at the placeholder (replaced) and at padding (masked) get no
    gradient; every other text position does."""
    ids = batch["input_ids"]
    embeds = model.llm.get_input_embeddings()
    text = embeds(ids).detach().requires_grad_(True)  # (B, T, D)
    with torch.no_grad():
        visual = model.encode_images(batch["images"])
    handle = embeds.register_forward_hook(lambda module, args, output: text)
    try:
        e, m, lab = model.splice(ids, visual, batch["attention_mask"], batch["labels"])
        model.llm(inputs_embeds=e, attention_mask=m, labels=lab).loss.backward()
    finally:
        handle.remove()
    is_placeholder = ids == model.image_token_id
    is_pad = batch["attention_mask"] == 0
    assert is_pad.any()
    assert text.grad[is_placeholder].abs().max() == 0
    assert text.grad[is_pad].abs().max() == 0
    assert (text.grad[~is_placeholder & ~is_pad].abs().sum(-1) > 0).float().mean() > 0.9


def test_precomputed_maps_skip_the_experts(model, batch) -> None:
    calls = []
    handles = [e.register_forward_hook(lambda *_: calls.append(1)) for e in model.experts]
    try:
        with torch.no_grad():
            maps = {i: e(batch["images"][i]) for i, e in enumerate(model.experts)}
            calls.clear()
            cached = model.encode_images(None, precomputed=maps)
            assert calls == []
            mixed = model.encode_images(batch["images"], precomputed={1: maps[1]})
            assert len(calls) == 1
            fresh = model.encode_images(batch["images"])
    finally:
        for h in handles:
            h.remove()
    torch.testing.assert_close(cached, fresh)
    torch.testing.assert_close(mixed, fresh)
    with pytest.raises(ValueError, match=r"no precomputed maps for experts \[1\]"):
        model.encode_images(None, precomputed={0: maps[0]})


@pytest.fixture(scope="module")
def seeing_model() -> MoEVisionModel:
    """A model whose greedy answers depend on the pixels (:func:`synthetic.seeing_model`)."""
    return synthetic.seeing_model(CONFIG)


def _generated_ids(model, images, prompts, max_new_tokens: int = 4) -> list[list[int]]:
    """Token ids ``model.generate`` decodes, one list per prompt (trailing padding removed)."""
    seen: list[torch.Tensor] = []
    decode = model.tokenizer.batch_decode

    def spy(ids, **kwargs):
        seen.append(ids.clone())
        return decode(ids, **kwargs)

    with patch.object(model.tokenizer, "batch_decode", spy):
        model.generate(images, prompts, max_new_tokens=max_new_tokens)
    pad, eos = model.tokenizer.pad_token_id, model.tokenizer.eos_token_id
    rows = []
    for row in seen[-1].tolist():
        while len(row) > 1 and row[-1] == pad and row[-2] in (pad, eos):
            row.pop()
        rows.append(row)
    return rows


def test_generate_batch_equals_one_by_one(seeing_model, bench) -> None:
    model = seeing_model
    records = json.loads(bench.split("test").read_text())[:6]
    images = [bench.images / r["image"] for r in records]
    # one question for every image but the second, whose much longer one needs left padding
    prompts = [records[0]["conversations"][0]["value"]] * len(images)
    prompts[1] = "<image>\nA much longer question, so that the batch needs left padding here?"
    batched = _generated_ids(model, images, prompts)
    single = [_generated_ids(model, [im], [p])[0] for im, p in zip(images, prompts)]
    assert batched == single  # token for token
    # the answers depend on the image: same question, different images, different answers
    same_question = {tuple(ids) for i, ids in enumerate(batched) if i != 1}
    assert len(same_question) >= 3, batched
    assert all(1 <= len(ids) <= 4 for ids in batched)


def test_bad_prompts_and_inputs(model, batch) -> None:
    ids = batch["input_ids"].clone()
    no_image = ids.clone()
    no_image[no_image == model.image_token_id] = 5
    with pytest.raises(ValueError, match=r"0 '<image>' tokens.*\(0, 0\).*but 8 images"):
        model(no_image, batch["attention_mask"], images=batch["images"])
    two = ids.clone()
    two[1, 2] = model.image_token_id
    with pytest.raises(ValueError, match=r"9 '<image>' tokens.*\(1, 2\)"):
        model(two, batch["attention_mask"], images=batch["images"])
    with pytest.raises(ValueError, match="1 image needs 1 '<image>' placeholders, found 0"):
        model.generate([torch.zeros(3, 8, 8, dtype=torch.uint8)], ["What color?"])
    with pytest.raises(ValueError, match="found 2"):
        model.generate([torch.zeros(3, 8, 8, dtype=torch.uint8)], ["<image><image>"])
    with pytest.raises(ValueError, match="2 images but 1 prompts"):
        model.generate([torch.zeros(3, 8, 8, dtype=torch.uint8)] * 2, ["<image>"])
    with pytest.raises(ValueError, match="got inputs for 1 experts"):
        model.encode_images(batch["images"][:1])
    half = [{k: v[:4] for k, v in d.items()} for d in batch["images"]]
    with pytest.raises(ValueError, match=r"8 '<image>' tokens.*but 4 images"):
        model(ids, batch["attention_mask"], images=half)


def test_sequence_too_long_names_lengths(model, batch) -> None:
    limit = model.max_length
    t = limit - model.num_visual_tokens + 2  # one position too many
    ids = torch.full((1, t), 10)
    ids[0, 3] = model.image_token_id
    images = [{k: v[:1] for k, v in d.items()} for d in batch["images"]]
    with pytest.raises(ValueError, match=rf"{t} text tokens .* {limit + 1} positions.*{limit}"):
        model(ids, images=images)
    with pytest.raises(ValueError, match="exceeds what the LLM"):
        MoEVisionModel.from_config(ModelConfig(experts=["clip-tiny"], max_length=10**6))


def test_gradient_checkpointing_gives_same_loss_and_grads(bench) -> None:
    torch.manual_seed(0)
    cfg = ModelConfig(experts=["clip-tiny"], fusion_options={"grid": [4, 4]})
    model = MoEVisionModel.from_config(cfg)
    ds = LlavaDataset(
        bench.split("val"),
        bench.images,
        model.preprocessors,
        model.tokenizer,
        num_visual_tokens=model.num_visual_tokens,
    )
    b = ds.collate([ds[i] for i in range(4)])

    def loss_and_grads():
        model.zero_grad()
        loss = model(b["input_ids"], b["attention_mask"], b["labels"], b["images"]).loss
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        return loss.detach(), grads

    model.train()
    loss0, grads0 = loss_and_grads()
    switched = model.gradient_checkpointing_enable()
    assert "llm" in switched and any(s.startswith("experts.0") for s in switched)
    assert model.is_gradient_checkpointing
    loss1, grads1 = loss_and_grads()
    torch.testing.assert_close(loss1, loss0)
    assert grads1.keys() == grads0.keys()
    for name in grads0:
        torch.testing.assert_close(grads1[name], grads0[name], rtol=1e-4, atol=1e-6)
    model.gradient_checkpointing_disable()
    assert not model.is_gradient_checkpointing


def test_save_and_load_round_trip_exactly(model, batch, tmp_path: Path) -> None:
    with torch.no_grad():
        for p in model.projector.parameters():  # weights that differ from any fresh init
            p.add_(0.01)
    model.save_pretrained(tmp_path / "m")
    assert {"config.json", "model.safetensors"} <= {p.name for p in (tmp_path / "m").iterdir()}
    saved = json.loads((tmp_path / "m" / "config.json").read_text())
    assert ModelConfig.from_dict(saved) == CONFIG
    loaded = MoEVisionModel.from_pretrained(tmp_path / "m").eval()
    for (n1, p1), (n2, p2) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert n1 == n2 and torch.equal(p1, p2), n1
    with torch.no_grad():
        a = model(batch["input_ids"], batch["attention_mask"], images=batch["images"]).logits
        b = loaded(batch["input_ids"], batch["attention_mask"], images=batch["images"]).logits
    assert torch.equal(a, b)
    assert loaded.tokenizer.get_vocab() == model.tokenizer.get_vocab()
    assert [e.spec for e in loaded.experts] == [e.spec for e in model.experts]
    with pytest.raises(FileNotFoundError, match="save_pretrained"):
        MoEVisionModel.from_pretrained(tmp_path / "nothing")


def test_config_round_trip_and_errors() -> None:
    assert ModelConfig.from_dict(CONFIG.to_dict()) == CONFIG
    with pytest.raises(ValueError, match="unknown ModelConfig keys"):
        ModelConfig.from_dict({"expert": ["clip-tiny"]})
    with pytest.raises(ValueError, match="not in experts"):
        ModelConfig(experts=["clip-tiny"], expert_options={"sam-tiny": {}})
    with pytest.raises(KeyError, match="valid experts"):
        MoEVisionModel.from_config({"experts": ["no-such-expert"]})


def test_reload_does_not_fetch_expert_checkpoints(tmp_path: Path) -> None:
    """Saved weights already hold the experts: reloading never touches their checkpoints,
    and the spec keeps the checkpoint name (feature-cache keys stay the same)."""
    cfg = ModelConfig(
        experts=["clip-tiny"],
        expert_options={"clip-tiny": {"checkpoint": str(tmp_path / "not-here")}},
        fusion_options={"grid": [2, 2]},
    )
    with pytest.raises(FileNotFoundError, match="not-here"):
        MoEVisionModel.from_config(cfg)
    model = MoEVisionModel(cfg, load_checkpoints=False)
    assert model.experts[0].spec.checkpoint == str(tmp_path / "not-here")
    model.save_pretrained(tmp_path / "m")
    loaded = MoEVisionModel.from_pretrained(tmp_path / "m")
    assert loaded.experts[0].spec == model.experts[0].spec
    for (n1, p1), (n2, p2) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert n1 == n2 and torch.equal(p1, p2), n1
