"""LLaVA dataset: tokenisation and label masking, batching, workers, and every bad input."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

import experts
from moe_vision.data.benchmark import BenchmarkSizes, generate_benchmark
from moe_vision.data.llava import (
    IGNORE_INDEX,
    DataError,
    LlavaDataset,
    load_records,
    tokenize_conversation,
)
from moe_vision.model.llm import build_tokenizer

SIZES = BenchmarkSizes(align=6, instruct=12, val=6, test=6)


@pytest.fixture(scope="module")
def bench(tmp_path_factory: pytest.TempPathFactory):
    return generate_benchmark(tmp_path_factory.mktemp("data") / "b", seed=0, sizes=SIZES)


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="module")
def preprocessors():
    return [experts.create_expert(n).preprocessor for n in ("clip-tiny", "convnext-tiny")]


def _dataset(path, bench, tokenizer, preprocessors, **kw) -> LlavaDataset:
    kw.setdefault("num_visual_tokens", 16)
    return LlavaDataset(path, bench.images, preprocessors, tokenizer, **kw)


def test_labels_train_only_the_answer_and_end_token(bench, tokenizer, preprocessors) -> None:
    ds = _dataset(bench.split("instruct"), bench, tokenizer, preprocessors)
    records = load_records(bench.split("instruct"))
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    for i in range(len(ds)):
        item = ds[i]
        ids, labels = item["input_ids"], item["labels"]
        assert ids.shape == labels.shape and int((ids == image_id).sum()) == 1
        trained = labels[labels != IGNORE_INDEX]
        answer = records[i]["conversations"][1]["value"]
        assert tokenizer.decode(trained) == answer + tokenizer.eos_token
        assert torch.equal(ids[labels != IGNORE_INDEX], trained)
        # Everything before the answer is the chat-template prompt, masked.
        prompt = tokenizer.apply_chat_template(
            [{"role": "user", "content": records[i]["conversations"][0]["value"]}],
            tokenize=False,
            add_generation_prompt=True,
        )
        n_prompt = int((labels == IGNORE_INDEX).sum())
        assert tokenizer.decode(ids[:n_prompt]) == prompt
        assert item["category"] == records[i]["category"] and item["id"] == records[i]["id"]


def test_multi_turn_masks_every_user_turn(tokenizer) -> None:
    messages = [
        {"role": "user", "content": "<image>\nWhat color is the shape?"},
        {"role": "assistant", "content": "red"},
        {"role": "user", "content": "What shape is shown?"},
        {"role": "assistant", "content": "circle"},
    ]
    ids, labels = tokenize_conversation(tokenizer, messages)
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    assert tokenizer.decode(ids) == full
    trained = [t for t in labels if t != IGNORE_INDEX]
    assert tokenizer.decode(trained) == "red<|im_end|>circle<|im_end|>"


def test_collate_pads_right_and_batches_each_expert(bench, tokenizer, preprocessors) -> None:
    ds = _dataset(bench.split("instruct"), bench, tokenizer, preprocessors)
    items = [ds[i] for i in range(4)]
    batch = ds.collate(items)
    lengths = [int(it["input_ids"].numel()) for it in items]
    b, t = batch["input_ids"].shape
    assert (b, t) == (4, max(lengths))
    for r, n in enumerate(lengths):
        assert batch["attention_mask"][r].tolist() == [1] * n + [0] * (t - n)
        assert (batch["input_ids"][r, n:] == tokenizer.pad_token_id).all()
        assert (batch["labels"][r, n:] == IGNORE_INDEX).all()
        assert torch.equal(batch["input_ids"][r, :n], items[r]["input_ids"])
    clip_spec = experts.get_spec("clip-tiny")
    conv_spec = experts.get_spec("convnext-tiny")
    assert batch["images"][0]["pixel_values"].shape == (4, 3, *clip_spec.input_size)
    assert batch["images"][1]["pixel_values"].shape == (4, 3, *conv_spec.input_size)
    assert batch["ids"] == [it["id"] for it in items]
    assert batch["categories"] == [it["category"] for it in items]


def test_image_key_is_a_content_hash(bench, tokenizer, preprocessors, tmp_path: Path) -> None:
    records = load_records(bench.split("test"))[:1]
    shutil.copy(bench.images / records[0]["image"], tmp_path / "renamed.png")
    records.append({**records[0], "id": "copy", "image": "renamed.png"})
    (tmp_path / "d.json").write_text(json.dumps(records))
    shutil.copy(bench.images / records[0]["image"], tmp_path / records[0]["image"])
    ds = LlavaDataset(tmp_path / "d.json", tmp_path, preprocessors, tokenizer)
    digest = hashlib.sha256((bench.images / records[0]["image"]).read_bytes()).hexdigest()
    assert ds[0]["image_key"] == ds[1]["image_key"] == digest


def test_dataloader_workers_preprocess(bench, tokenizer, preprocessors) -> None:
    ds = _dataset(bench.split("val"), bench, tokenizer, preprocessors)
    loader = DataLoader(ds, batch_size=3, num_workers=1, collate_fn=ds.collate)
    batches = list(loader)
    assert sum(len(b["ids"]) for b in batches) == len(ds)
    direct = ds.collate([ds[i] for i in range(3)])
    assert torch.equal(batches[0]["images"][0]["pixel_values"], direct["images"][0]["pixel_values"])


# ---------------------------------------------------------------------------- bad input
def _write_bad(tmp_path: Path, bench, record_changes: dict) -> Path:
    """A copy of the val split with one record (index 1) broken by ``record_changes``."""
    records = load_records(bench.split("val"))
    bad = dict(records[1])
    for key, value in record_changes.items():
        if value is None:
            bad.pop(key)
        else:
            bad[key] = value
    records[1] = bad
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(records, indent=1))
    return path


def _conv(question: str, answer: str = "red") -> list[dict]:
    return [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]


BAD_RECORDS = {
    "no conversations": ({"conversations": None}, "no 'conversations'"),
    "no placeholder": ({"conversations": _conv("What color?")}, "exactly one '<image>'"),
    "two placeholders": ({"conversations": _conv("<image>\n<image>\nWhat?")}, "found 2"),
    "empty answer": ({"conversations": _conv("<image>\nWhat?", "  ")}, "empty answer"),
    "unknown role": (
        {"conversations": [{"from": "robot", "value": "<image>"}, {"from": "gpt", "value": "x"}]},
        "expected one of",
    ),
    "answer first": (
        {"conversations": list(reversed(_conv("<image>\nWhat?")))},
        "must start with a human turn",
    ),
    "missing image": ({"image": "nowhere.png"}, "image file not found"),
    "no image field": ({"image": None}, "needs an 'image'"),
}


@pytest.mark.parametrize("case", sorted(BAD_RECORDS))
def test_bad_record_errors_name_file_and_record(case, bench, tokenizer, preprocessors, tmp_path):
    changes, message = BAD_RECORDS[case]
    path = _write_bad(tmp_path, bench, changes)
    with pytest.raises(DataError, match=message) as err:
        _dataset(path, bench, tokenizer, preprocessors)
    assert str(path) in str(err.value) and "record 1" in str(err.value)


@pytest.mark.parametrize("case", sorted(BAD_RECORDS))
def test_bad_record_is_skipped_counted_and_reported(
    case, bench, tokenizer, preprocessors, tmp_path, caplog
):
    changes, message = BAD_RECORDS[case]
    path = _write_bad(tmp_path, bench, changes)
    ds = _dataset(path, bench, tokenizer, preprocessors, on_bad_record="skip")
    assert len(ds) == SIZES.val - 1
    assert [s.index for s in ds.skipped] == [1]
    assert message in ds.skipped[0].reason
    assert sum(ds.skipped_reasons().values()) == 1
    assert "skipped 1 of" in caplog.text


def test_corrupt_and_truncated_images(bench, tokenizer, preprocessors, tmp_path: Path) -> None:
    records = load_records(bench.split("val"))[:3]
    for r in records:
        shutil.copy(bench.images / r["image"], tmp_path / r["image"])
    (tmp_path / records[1]["image"]).write_bytes(b"not a png at all")
    good = (bench.images / records[2]["image"]).read_bytes()
    (tmp_path / records[2]["image"]).write_bytes(good[: len(good) // 2])
    (tmp_path / "d.json").write_text(json.dumps(records))
    with pytest.raises(DataError, match="record 1 .*cannot read image"):
        LlavaDataset(tmp_path / "d.json", tmp_path, preprocessors, tokenizer)
    ds = LlavaDataset(tmp_path / "d.json", tmp_path, preprocessors, tokenizer, on_bad_record="skip")
    assert [s.index for s in ds.skipped] == [1, 2] and len(ds) == 1
    # Without the up-front check the bad file fails in __getitem__, naming the record.
    lazy = LlavaDataset(
        tmp_path / "d.json", tmp_path, preprocessors, tokenizer, verify_images=False
    )
    with pytest.raises(DataError, match=f"{records[1]['id']}.*cannot read image"):
        lazy[1]


def test_malformed_json_names_file_and_line(tmp_path: Path, tokenizer, preprocessors) -> None:
    path = tmp_path / "broken.json"
    path.write_text('[\n {"id": 1},\n {"id": 2,,}\n]')
    with pytest.raises(DataError, match=r"broken\.json: malformed JSON at line 3"):
        LlavaDataset(path, tmp_path, preprocessors, tokenizer)
    lines = tmp_path / "broken.jsonl"
    lines.write_text('{"id": 1}\n{"id": 2\n')
    with pytest.raises(DataError, match=r"broken\.jsonl: malformed JSON on line 2"):
        load_records(lines)
    (tmp_path / "obj.json").write_text('{"id": 1}')
    with pytest.raises(DataError, match="expected a JSON list"):
        load_records(tmp_path / "obj.json")
    with pytest.raises(DataError, match="data file not found"):
        load_records(tmp_path / "missing.json")


def test_sequence_too_long(bench, tokenizer, preprocessors) -> None:
    with pytest.raises(DataError, match=r"sequence too long: \d+ text tokens \+ 500 visual"):
        _dataset(bench.split("val"), bench, tokenizer, preprocessors, num_visual_tokens=500)
    ds = _dataset(
        bench.split("val"),
        bench,
        tokenizer,
        preprocessors,
        num_visual_tokens=500,
        max_length=1000,
    )
    assert len(ds) == SIZES.val


def test_jsonl_is_read_like_json(bench, tokenizer, preprocessors, tmp_path: Path) -> None:
    records = load_records(bench.split("val"))
    path = tmp_path / "val.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    a = _dataset(path, bench, tokenizer, preprocessors)
    b = _dataset(bench.split("val"), bench, tokenizer, preprocessors)
    assert [s.input_ids for s in a.samples] == [s.input_ids for s in b.samples]


def test_bad_policy_and_empty_result(bench, tokenizer, preprocessors, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="on_bad_record"):
        _dataset(bench.split("val"), bench, tokenizer, preprocessors, on_bad_record="ignore")
    (tmp_path / "bad.json").write_text(json.dumps([{"id": "x"}]))
    with pytest.raises(DataError, match="no usable records"):
        _dataset(tmp_path / "bad.json", bench, tokenizer, preprocessors, on_bad_record="skip")
