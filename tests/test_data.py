"""LLaVA dataset: tokenisation and label masking, batching, workers, the byte-offset index, and
every bad input (found lazily, in ``__getitem__``: an error naming file and record, or a skip
that is counted, listed and replaced)."""

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
from moe_vision.data.index import index_file
from moe_vision.data.llava import LlavaDataset, load_records, read_skips
from moe_vision.data.records import IGNORE_INDEX, DataError, tokenize_conversation
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
    assert batch["image_counts"] == [1, 1, 1, 1]
    assert batch["image_keys"] == [k for it in items for k in it["image_keys"]]
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
    assert ds[0]["image_keys"] == ds[1]["image_keys"] == [digest]


def test_dataloader_workers_preprocess(bench, tokenizer, preprocessors) -> None:
    ds = _dataset(bench.split("val"), bench, tokenizer, preprocessors)
    loader = DataLoader(ds, batch_size=3, num_workers=1, collate_fn=ds.collate)
    batches = list(loader)
    assert sum(len(b["ids"]) for b in batches) == len(ds)
    direct = ds.collate([ds[i] for i in range(3)])
    assert torch.equal(batches[0]["images"][0]["pixel_values"], direct["images"][0]["pixel_values"])


# ---------------------------------------------------------------------------- the index
@pytest.mark.parametrize("chunk", [1 << 24, 37])  # 37 bytes: records cut by every block
def test_index_matches_a_line_split_and_a_json_parse(chunk, tmp_path: Path, monkeypatch) -> None:
    from moe_vision.data import index as index_module

    monkeypatch.setattr(index_module, "CHUNK", chunk)
    monkeypatch.setattr(index_module, "_INDEX_CACHE", {})
    records = [{"id": i, "text": "é" * i + "\n" * (i % 2), "n": 10**i} for i in range(7)]
    lines = [json.dumps(r, ensure_ascii=False) for r in records]
    jsonl = tmp_path / "a.jsonl"
    jsonl.write_bytes(("\n".join(lines[:3]) + "\n\n  \n" + "\r\n".join(lines[3:])).encode())
    index = index_file(jsonl)
    assert [index.read(i) for i in range(len(index))] == records
    raw = jsonl.read_bytes()  # brute force: the byte offset of every non-blank line
    starts = [0] + [k + 1 for k, b in enumerate(raw) if b == 10]
    expected = [s for s in starts if raw[s:].split(b"\n")[0].strip()]
    assert index.offset.tolist() == expected
    assert index.line.tolist() == [1, 2, 3, 6, 7, 8, 9]
    js = tmp_path / "a.json"
    js.write_text(json.dumps(records, indent=2, ensure_ascii=False), encoding="utf-8")
    jindex = index_file(js)
    assert [jindex.read(i) for i in range(len(jindex))] == records
    assert jindex.line[1] == 1 + json.dumps(records, indent=2).split("\n").index("  {", 2)


@pytest.mark.parametrize("space", ["\n", "  ", "\r\n\t "])
def test_every_block_size_reads_a_list_with_spaces_after_commas(space, tmp_path: Path) -> None:
    """Issue 27.1: a block that ends just after a ',' (or inside the whitespace after it) whose
    next block starts with whitespace; before, "malformed JSON ... Expecting value" after the
    block had been regrown to the end of the file. Every block size from 1 byte up."""
    from moe_vision.data import index as index_module

    records = [{"id": "a", "v": "x" * 5}, {"id": "b"}, {"id": "c", "v": [1, 2]}]
    text = "[" + space + ("," + space).join(json.dumps(r) for r in records) + space + "]"
    path = tmp_path / "d.json"
    path.write_text(text)
    for size in range(1, len(text) + 2):
        index_module._INDEX_CACHE.clear()
        index = index_file(path, block_size=size)
        assert [index.read(i) for i in range(len(index))] == records, size
    index_module._INDEX_CACHE.clear()


def test_the_16_mib_block_boundary_of_issue_27(tmp_path: Path) -> None:
    """The issue's reproduction at the default block size: a 3-record list whose second record
    is padded so that the head, the record and its ',' are exactly 2**24 bytes."""
    from moe_vision.data.index import CHUNK

    head = '[\n {"id": 0},\n '
    stub = '{"id": 1, "pad": ""}'
    second = stub.replace('""', '"' + "p" * (CHUNK - len(head) - len(stub) - 1) + '"')
    text = head + second + ',\n {"id": 2}\n]\n'
    assert len((head + second + ",").encode()) == CHUNK
    path = tmp_path / "big.json"
    path.write_text(text)
    index = index_file(path)
    assert len(index) == 3 and index.read(2) == {"id": 2} and index.read(1)["id"] == 1


@pytest.mark.parametrize("suffix", [".jsonl", ".json"])
def test_a_byte_order_mark_keeps_the_first_record(suffix, tmp_path: Path) -> None:
    """Issue 27.4: a ``.jsonl`` file starting with a UTF-8 BOM lost its first record (read as
    malformed); a ``.json`` one was already accepted."""
    records = [{"id": "first"}, {"id": "second"}]
    text = "\n".join(map(json.dumps, records)) if suffix == ".jsonl" else json.dumps(records)
    path = tmp_path / f"bom{suffix}"
    path.write_bytes(b"\xef\xbb\xbf" + text.encode())
    assert load_records(path) == records
    blank = tmp_path / "blank.jsonl"  # a BOM on an otherwise blank first line
    blank.write_bytes(b"\xef\xbb\xbf\n" + text.encode())
    if suffix == ".jsonl":
        index = index_file(blank)
        assert [index.read(i) for i in range(len(index))] == records
        assert index.line.tolist() == [2, 3]


def test_a_rewritten_file_is_read_afresh(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text('{"id": "old"}\n')
    assert index_file(path).read(0) == {"id": "old"}
    path.unlink()
    path.write_text('{"id": "new one"}\n{"id": 2}\n')
    index = index_file(path)
    assert len(index) == 2 and index.read(0) == {"id": "new one"}


def test_text_side_is_memoised_and_images_are_read_every_time(
    bench, tokenizer, preprocessors, tmp_path, monkeypatch
) -> None:
    records = load_records(bench.split("val"))[:2]
    for r in records:
        shutil.copy(bench.images / r["image"], tmp_path / r["image"])
    (tmp_path / "d.json").write_text(json.dumps(records))
    ds = LlavaDataset(tmp_path / "d.json", tmp_path, preprocessors, tokenizer, memo_records=1)
    first = ds[0]
    ds[1]
    monkeypatch.setattr(ds.index, "read", lambda i: pytest.fail(f"record {i} parsed again"))
    again = ds[0]  # from the memo: not parsed or tokenised again
    assert torch.equal(first["input_ids"], again["input_ids"])
    assert torch.equal(first["labels"], again["labels"]) and first["id"] == again["id"]
    with pytest.raises(pytest.fail.Exception, match="record 1 parsed again"):
        ds[1]  # beyond memo_records
    (tmp_path / records[0]["image"]).write_bytes(b"broken now")
    with pytest.raises(DataError, match="record 0 .*cannot read image"):
        ds[0]


def test_building_reads_no_record(bench, tokenizer, preprocessors, tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text("not json\n" * 50)
    ds = _dataset(path, bench, tokenizer, preprocessors)  # no error: nothing parsed yet
    assert len(ds) == 50
    with pytest.raises(DataError, match=r"bad\.jsonl record 0 \(line 1\).*malformed JSON"):
        ds[0]


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
    "no placeholder": (
        {"conversations": _conv("What color?")},
        "single-image record needs exactly one '<image>' placeholder, found 0",
    ),
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
    "text-only with a placeholder": ({"image": None}, "text-only record needs exactly 0"),
    "image in an answer": (
        {"conversations": [*_conv("<image>"), *_conv("Again?", "<image>")]},
        "found 2",
    ),
    "bad image field": ({"image": 3}, "'image' must be a path"),
}


@pytest.mark.parametrize("case", sorted(BAD_RECORDS))
def test_bad_record_errors_name_file_and_record(case, bench, tokenizer, preprocessors, tmp_path):
    changes, message = BAD_RECORDS[case]
    path = _write_bad(tmp_path, bench, changes)
    ds = _dataset(path, bench, tokenizer, preprocessors)
    ds[0]
    with pytest.raises(DataError, match=message) as err:
        ds[1]
    assert str(path) in str(err.value) and "record 1 (line" in str(err.value)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("case", sorted(BAD_RECORDS))
def test_bad_record_is_skipped_counted_listed_and_replaced(
    case, bench, tokenizer, preprocessors, tmp_path, caplog
):
    changes, message = BAD_RECORDS[case]
    path = _write_bad(tmp_path, bench, changes)
    log = tmp_path / "skipped.jsonl"
    ds = _dataset(path, bench, tokenizer, preprocessors, on_bad_record="skip", skip_log=log)
    assert len(ds) == SIZES.val
    replaced = ds[1]
    assert replaced["id"] == ds[2]["id"]  # the next record, deterministically
    assert torch.equal(replaced["input_ids"], ds[2]["input_ids"])
    ds[1]  # found again (next epoch): listed once
    assert [s.index for s in ds.skipped] == [1] and message in ds.skipped[0].reason
    assert [(s.file, s.index) for s in read_skips(log)] == [(str(path), 1)]
    assert sum(ds.skipped_reasons().values()) == 1
    assert "skipping" in caplog.text


def test_skips_found_in_workers_reach_the_skip_list(bench, tokenizer, preprocessors, tmp_path):
    path = _write_bad(tmp_path, bench, {"image": "nowhere.png"})
    log = tmp_path / "skipped.jsonl"
    ds = _dataset(path, bench, tokenizer, preprocessors, on_bad_record="skip", skip_log=log)
    batches = list(DataLoader(ds, batch_size=2, num_workers=2, collate_fn=ds.collate))
    assert sum(len(b["ids"]) for b in batches) == len(ds)
    assert ds.skipped == []  # found in the workers, not here
    (skip,) = read_skips(log)
    assert (skip.index, skip.kind) == (1, "missing_image")


def test_errors_in_workers_stay_one_line(bench, tokenizer, preprocessors, tmp_path) -> None:
    path = _write_bad(tmp_path, bench, {"image": "nowhere.png"})
    ds = _dataset(path, bench, tokenizer, preprocessors)
    loader = DataLoader(ds, batch_size=6, num_workers=1, collate_fn=ds.collate)
    with pytest.raises(DataError) as err:
        next(iter(loader))
    assert str(err.value).startswith(f"{path} record 1 (line") and "\n" not in str(err.value)


def test_corrupt_and_truncated_images(bench, tokenizer, preprocessors, tmp_path: Path) -> None:
    records = load_records(bench.split("val"))[:4]
    for r in records:
        shutil.copy(bench.images / r["image"], tmp_path / r["image"])
    (tmp_path / records[1]["image"]).write_bytes(b"not a png at all")
    good = (bench.images / records[2]["image"]).read_bytes()
    (tmp_path / records[2]["image"]).write_bytes(good[: len(good) // 2])
    (tmp_path / "d.json").write_text(json.dumps(records))
    ds = LlavaDataset(tmp_path / "d.json", tmp_path, preprocessors, tokenizer)
    for i in (1, 2):
        with pytest.raises(DataError, match=f"record {i} .*cannot read image"):
            ds[i]
    skip = LlavaDataset(
        tmp_path / "d.json", tmp_path, preprocessors, tokenizer, on_bad_record="skip"
    )
    assert skip[1]["id"] == records[3]["id"]
    assert [(s.index, s.kind) for s in skip.skipped] == [(1, "corrupt_image"), (2, "corrupt_image")]


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


def test_non_utf8_names_file_and_line(tmp_path: Path, tokenizer, preprocessors) -> None:
    good = json.dumps({"id": "a", "conversations": _conv("hi")}).encode()
    bad = good.replace(b"hi", b"h\xff")
    (tmp_path / "d.jsonl").write_bytes(good + b"\n" + bad + b"\n")
    ds = LlavaDataset(tmp_path / "d.jsonl", tmp_path, preprocessors, tokenizer)
    with pytest.raises(DataError, match=r"d\.jsonl record 1 \(line 2\).*not UTF-8 on line 2"):
        ds[1]
    (tmp_path / "d.json").write_bytes(b"[" + good + b",\n" + bad + b"]")
    with pytest.raises(DataError, match=r"d\.json: bytes that are not UTF-8 on line 2"):
        LlavaDataset(tmp_path / "d.json", tmp_path, preprocessors, tokenizer)


def test_sequence_too_long(bench, tokenizer, preprocessors) -> None:
    ds = _dataset(bench.split("val"), bench, tokenizer, preprocessors, num_visual_tokens=500)
    with pytest.raises(DataError, match=r"sequence too long: \d+ text tokens \+ 1 x 500 visual"):
        ds[0]
    ds = _dataset(
        bench.split("val"),
        bench,
        tokenizer,
        preprocessors,
        num_visual_tokens=500,
        max_length=1000,
    )
    assert all(ds[i]["id"] for i in range(len(ds)))


def test_jsonl_is_read_like_json(bench, tokenizer, preprocessors, tmp_path: Path) -> None:
    records = load_records(bench.split("val"))
    path = tmp_path / "val.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    a = _dataset(path, bench, tokenizer, preprocessors)
    b = _dataset(bench.split("val"), bench, tokenizer, preprocessors)
    for i in range(len(a)):
        assert torch.equal(a[i]["input_ids"], b[i]["input_ids"])


def test_bad_policy_and_all_bad(bench, tokenizer, preprocessors, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="on_bad_record"):
        _dataset(bench.split("val"), bench, tokenizer, preprocessors, on_bad_record="ignore")
    (tmp_path / "bad.json").write_text(json.dumps([{"id": "x"}] * 3))
    ds = _dataset(tmp_path / "bad.json", bench, tokenizer, preprocessors, on_bad_record="skip")
    with pytest.raises(DataError, match="records after it are all bad.*moe-vision data check"):
        ds[0]
    (tmp_path / "empty.json").write_text("[]")
    with pytest.raises(DataError, match="no records"):
        _dataset(tmp_path / "empty.json", bench, tokenizer, preprocessors)
