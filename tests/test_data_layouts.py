"""Every LLaVA-family record layout, with the tiny LLM's real tokenizer: text-only records (every
marker), multi-image records (one placeholder per image, every expert on every image),
``<image>`` after the text, multi-turn, and the model's splice of mixed batches against a
brute-force reference."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from moe_vision.data.llava import LlavaDataset
from moe_vision.data.records import IGNORE_INDEX, DataError
from moe_vision.model.config import ModelConfig
from moe_vision.model.mllm import MoEVisionModel

ANSWER = "a red square"


@pytest.fixture(scope="module")
def model() -> MoEVisionModel:
    torch.manual_seed(0)
    cfg = ModelConfig(experts=["clip-tiny", "convnext-tiny"], fusion_options={"grid": [2, 2]})
    return MoEVisionModel.from_config(cfg).eval()


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for k in range(3):
        pixels = rng.integers(0, 256, size=(40 + 8 * k, 48, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"im{k}.png")
    return folder


def _rec(rid: str, question: str, image=None, turns: int = 1, drop_key: bool = False) -> dict:
    conv = []
    for t in range(turns):
        conv += [
            {"from": "human", "value": question if t == 0 else f"and turn {t}?"},
            {"from": "gpt", "value": ANSWER if t == 0 else f"answer {t}"},
        ]
    rec: dict = {"id": rid, "conversations": conv}
    if not drop_key:
        rec["image"] = image
    return rec


def _dataset(model, root: Path, records: list[dict], tmp_path: Path, **kw) -> LlavaDataset:
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    return LlavaDataset(
        path,
        root,
        model.preprocessors,
        model.tokenizer,
        max_length=model.max_length,
        num_visual_tokens=model.num_visual_tokens,
        **kw,
    )


TEXT_ONLY = {
    "no image key": dict(drop_key=True),
    "empty": dict(image=""),
    "None": dict(image="None"),
    "none": dict(image="none"),
    "nan": dict(image="nan"),
    "NaN number": dict(image=math.nan),
    "null": dict(image=None),
}


def test_text_only_records_train_the_llm_without_visual_tokens(model, root, tmp_path) -> None:
    records = [_rec(k, "Tell me a story.", **kw) for k, kw in TEXT_ONLY.items()]
    ds = _dataset(model, root, records, tmp_path)
    tok = model.tokenizer
    for i, rec in enumerate(records):
        item = ds[i]
        assert item["image_keys"] == [] and item["expert_inputs"] == [[], []]
        assert int((item["input_ids"] == model.image_token_id).sum()) == 0
        trained = item["labels"][item["labels"] != IGNORE_INDEX]
        assert tok.decode(trained) == ANSWER + tok.eos_token
        prompt = tok.apply_chat_template(
            [{"role": "user", "content": rec["conversations"][0]["value"]}],
            tokenize=False,
            add_generation_prompt=True,
        )
        n_prompt = int((item["labels"] == IGNORE_INDEX).sum())
        assert tok.decode(item["input_ids"][:n_prompt]) == prompt
    batch = ds.collate([ds[i] for i in range(3)])
    assert batch["images"] is None and batch["image_counts"] == [0, 0, 0]
    out = model(batch["input_ids"], batch["attention_mask"], batch["labels"], batch["images"])
    assert out.logits.shape[:2] == batch["input_ids"].shape and torch.isfinite(out.loss)


def test_multi_image_records_preprocess_every_image_for_every_expert(model, root, tmp_path) -> None:
    q = "<image>\nFirst picture. <image> Second picture. What changed?"
    records = [_rec("m", q, ["im2.png", "im0.png"], turns=2)]
    ds = _dataset(model, root, records, tmp_path)
    item = ds[0]
    assert len(item["image_keys"]) == 2 and item["image_keys"][0] != item["image_keys"][1]
    for e, pre in enumerate(model.preprocessors):
        for k, name in enumerate(["im2.png", "im0.png"]):
            expected = pre(Image.open(root / name).convert("RGB"))
            got = item["expert_inputs"][e][k]
            assert all(torch.equal(got[key], expected[key]) for key in expected)
    ids, labels = item["input_ids"], item["labels"]
    assert int((ids == model.image_token_id).sum()) == 2
    assert (labels[ids == model.image_token_id] == IGNORE_INDEX).all()
    tok = model.tokenizer
    trained = labels[labels != IGNORE_INDEX]
    assert tok.decode(trained) == f"{ANSWER}{tok.eos_token}answer 1{tok.eos_token}"


def test_placeholder_after_the_text(model, root, tmp_path) -> None:
    ds = _dataset(model, root, [_rec("a", "Describe the photo.\n<image>", "im1.png")], tmp_path)
    ids = ds[0]["input_ids"].tolist()
    at = ids.index(model.image_token_id)
    before = model.tokenizer.decode(ids[:at])
    assert before.endswith("Describe the photo.\n")


MISMATCH = {
    "text-only with one placeholder": (
        _rec("t", "<image> story", ""),
        "text-only record needs exactly 0 '<image>' placeholders, found 1",
    ),
    "two images, one placeholder": (
        _rec("m", "<image> both?", ["im0.png", "im1.png"]),
        "multi-image record with 2 images needs exactly 2 '<image>' placeholders, found 1",
    ),
    "one image, three placeholders": (
        _rec("s", "<image><image><image>", "im0.png"),
        "single-image record needs exactly one '<image>' placeholder, found 3",
    ),
}


@pytest.mark.parametrize("case", sorted(MISMATCH))
def test_placeholder_count_must_match_images(case, model, root, tmp_path) -> None:
    record, message = MISMATCH[case]
    ds = _dataset(model, root, [_rec("ok", "<image>?", "im0.png"), record], tmp_path)
    with pytest.raises(DataError, match=rf"d\.jsonl record 1 \(line 2\) \(id .*{message}"):
        ds[1]


def _reference_splice(model, input_ids, visual, mask, labels):
    """Brute force: walk each row, emit text embeddings and the next image's tokens in turn."""
    embed = model.llm.get_input_embeddings()
    rows, m = [], 0
    for r in range(input_ids.shape[0]):
        e, a, lab = [], [], []
        for t in range(input_ids.shape[1]):
            if int(input_ids[r, t]) == model.image_token_id:
                e += list(visual[m])
                a += [1] * visual.shape[1]
                lab += [IGNORE_INDEX] * visual.shape[1]
                m += 1
            else:
                e.append(embed(input_ids[r, t]))
                a.append(int(mask[r, t]))
                lab.append(int(labels[r, t]))
        rows.append((e, a, lab))
    width = max(len(e) for e, _, _ in rows)
    d = visual.shape[-1]
    out_e = torch.zeros(len(rows), width, d)
    out_m = torch.zeros(len(rows), width, dtype=torch.long)
    out_l = torch.full((len(rows), width), IGNORE_INDEX)
    for r, (e, a, lab) in enumerate(rows):
        out_e[r, : len(e)] = torch.stack(e)
        out_m[r, : len(a)] = torch.tensor(a)
        out_l[r, : len(lab)] = torch.tensor(lab)
    return out_e, out_m, out_l


def test_mixed_batch_splices_each_image_at_its_placeholder(model, root, tmp_path) -> None:
    records = [
        _rec("two", "<image> then <image>: same?", ["im0.png", "im1.png"]),
        _rec("text", "Just talk.", drop_key=True),
        _rec("one", "Look: <image>", "im2.png", turns=2),
    ]
    ds = _dataset(model, root, records, tmp_path)
    batch = ds.collate([ds[i] for i in range(3)])
    assert batch["image_counts"] == [2, 0, 1] and len(batch["image_keys"]) == 3
    with torch.no_grad():
        visual = model.encode_images(batch["images"])  # (3, N, D)
        one = [
            model.encode_images([{k: v[m : m + 1] for k, v in x.items()} for x in batch["images"]])
            for m in range(3)
        ]
        assert torch.allclose(visual, torch.cat(one), atol=1e-5)  # image m is image m
        got = model.splice(batch["input_ids"], visual, batch["attention_mask"], batch["labels"])
        ref = _reference_splice(
            model, batch["input_ids"], visual, batch["attention_mask"], batch["labels"]
        )
    assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])
    assert torch.equal(got[2], ref[2])
    left = model.splice(batch["input_ids"], visual, batch["attention_mask"], pad_left=True)
    width, t, n_vis = ref[0].shape[1], batch["input_ids"].shape[1], visual.shape[1]
    for r, k in enumerate(batch["image_counts"]):
        n = t + k * (n_vis - 1)  # the row's own length: shorter rows are padded on the left
        assert torch.equal(left[0][r, width - n :], ref[0][r, :n])
        assert (left[1][r, : width - n] == 0).all() and torch.equal(
            left[1][r, width - n :], ref[1][r, :n]
        )
    model.train()
    model.zero_grad()
    loss = model(batch["input_ids"], batch["attention_mask"], batch["labels"], batch["images"]).loss
    loss.backward()
    model.eval()
    grads = [p.grad for p in model.projector.parameters()]
    assert torch.isfinite(loss) and any(g is not None and g.abs().sum() > 0 for g in grads)


def test_generate_takes_text_only_and_multi_image_prompts(model, root) -> None:
    answers = model.generate(
        [None, [root / "im0.png", root / "im1.png"], root / "im2.png"],
        ["Say hi.", "<image> vs <image>?", "<image> colour?"],
        max_new_tokens=3,
    )
    assert len(answers) == 3 and all(isinstance(a, str) for a in answers)
    with pytest.raises(ValueError, match="2 images needs 2 '<image>' placeholders, found 1"):
        model.generate([[root / "im0.png", root / "im1.png"]], ["<image>?"])
