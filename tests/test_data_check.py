"""``moe-vision data check``: finds every planted problem (and nothing in a clean dataset), counts
text-only and multi-image records without dropping them, runs in worker processes, writes JSON and
exits non-zero when anything would be dropped."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from hostile import png_claiming, truncated_jpeg
from PIL import Image

from moe_vision.cli import main
from moe_vision.data.benchmark import BenchmarkSizes, generate_benchmark
from moe_vision.data.check import check_files, format_report
from moe_vision.data.llava import load_records
from moe_vision.data.records import DataError
from moe_vision.data.validation import RecordValidator
from moe_vision.model.llm import build_tokenizer


def _rec(rid: str, image, question: str = "<image>\nWhat?") -> dict:
    conv = [{"from": "human", "value": question}, {"from": "gpt", "value": "red"}]
    return {"id": rid, "image": image, "conversations": conv}


PLANTED = {
    "missing_image": [_rec("m1", "nowhere.png"), _rec("m2", "gone/x.png")],
    "corrupt_image": [_rec("c1", "corrupt.png"), _rec("c2", "cut.jpg"), _rec("c3", "empty.png")],
    "image_too_large": [_rec("b", "bomb.png")],
    "outside_root": [_rec("o", "../x.png")],
    "placeholder_mismatch": [_rec("p", ["a.png", "a.png"], "<image> one?")],
    "over_length": [_rec("l", "a.png", "<image>" + " why" * 3000)],
    "bad_conversation": [{"id": "n", "image": "a.png"}],
}


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict:
    tmp = tmp_path_factory.mktemp("check")
    bench = generate_benchmark(tmp / "b", seed=0, sizes=BenchmarkSizes(align=4, instruct=6))
    root = tmp / "root"
    shutil.copytree(bench.images, root)
    Image.new("RGB", (16, 16)).save(root / "a.png")
    (root / "corrupt.png").write_bytes(b"garbage")
    (root / "empty.png").write_bytes(b"")
    (root / "cut.jpg").write_bytes(truncated_jpeg())
    (root / "bomb.png").write_bytes(png_claiming(10_000, 10_000))
    clean = load_records(bench.split("instruct"))
    clean += [
        _rec("text", "", "Tell me a story."),
        _rec("multi", ["a.png", "a.png"], "<image> and <image>?"),
    ]
    (tmp / "clean.json").write_text(json.dumps(clean))
    dirty = list(clean)
    for records in PLANTED.values():
        dirty += records
    lines = [json.dumps(r).encode() for r in dirty] + [b'{"id": "x", "conv', b'{"id": "\xff"}']
    lines += [b"[" * 100_000, b'{"id": ' + b"7" * 5000 + b"}"]  # issue 27.11: parser limits
    (tmp / "dirty.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    return {"tmp": tmp, "root": root, "clean": tmp / "clean.json", "dirty": tmp / "dirty.jsonl"}


def test_finds_every_planted_problem_and_nothing_in_clean_data(data) -> None:
    validator = RecordValidator(build_tokenizer(), num_visual_tokens=16)
    clean = check_files([data["clean"]], data["root"], validator, workers=2)
    assert clean["dropped"] == 0 and clean["problems"] == {}
    assert clean["layouts"] == {"text_only": 1, "single_image": 6, "multi_image": 1}
    report = check_files([data["dirty"]], data["root"], validator, workers=2, examples=2)
    expected = {k: len(v) for k, v in PLANTED.items()} | {"malformed": 3, "not_utf8": 1}
    assert {k: v["count"] for k, v in report["problems"].items()} == expected
    assert report["records"] == clean["records"] + sum(expected.values())
    assert report["dropped"] == sum(expected.values())
    examples = report["problems"]["corrupt_image"]["examples"]
    assert [e["id"] for e in examples] == ["c1", "c2"]  # the first examples, in file order
    assert examples[0]["where"].startswith(f"{data['dirty']} record 10 (line 11)")
    table = format_report(report)
    assert "would be dropped" in table and "image_too_large" in table and "bomb.png" in table


def test_cli_exit_code_json_and_mixtures(data, tmp_path: Path, capsys) -> None:
    out = tmp_path / "report.json"
    argv = ["data", "check", str(data["dirty"]), "--image-root", str(data["root"])]
    assert main([*argv, "--json", str(out), "--workers", "1"]) == 1
    report = json.loads(out.read_text())
    assert report["problems"]["outside_root"]["count"] == 1
    assert "would be dropped" in capsys.readouterr().out
    mix = tmp_path / "mix.yaml"
    mix.write_text(
        yaml.safe_dump(
            {
                "image_root": str(data["root"]),
                "datasets": [{"json_path": str(data["clean"]), "sampling_strategy": "first:3"}],
            }
        )
    )
    assert main(["data", "check", str(mix), "--workers", "0"]) == 0
    assert "3 records in 1 file(s): 3 ok, 0 would be dropped" in capsys.readouterr().out


def test_a_refused_file_does_not_hide_the_report_of_the_others(data, tmp_path, capsys) -> None:
    """Issue 27.4: ``data check good.json bad.json`` exited 2 with no report for the good file."""
    bad = tmp_path / "bad.json"
    bad.write_text('[{"id": 1}, {"id": 2 oops')
    out = tmp_path / "report.json"
    argv = ["data", "check", str(data["clean"]), str(bad), "--image-root", str(data["root"])]
    assert main([*argv, "--workers", "0", "--json", str(out)]) == 2
    printed = capsys.readouterr().out
    assert "8 records in 2 file(s): 8 ok, 0 would be dropped" in printed
    assert f"refused file {bad}: " in printed and "malformed JSON at line 1" in printed
    report = json.loads(out.read_text())
    assert [r["file"] for r in report["refused_files"]] == [str(bad)]


def test_duplicate_ids_are_reported_and_refused_by_evaluation(data, tmp_path, capsys) -> None:
    """Issue 27.12: data check, training and evaluation accepted repeated ids; a sweep then ended
    with "question ids appear twice" after training every cell."""
    from moe_vision.evaluation.evaluate import load_eval_items

    records = load_records(data["clean"])[:3]
    path = tmp_path / "dup.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in [*records, records[1]]))
    validator = RecordValidator(build_tokenizer(), num_visual_tokens=16)
    report = check_files([path], data["root"], validator, workers=0)
    assert report["dropped"] == 0 and report["duplicate_ids"]["count"] == 1
    example = report["duplicate_ids"]["examples"][0]
    assert example["id"] == records[1]["id"] and example["where"].startswith(f"{path} record 3")
    assert example["first"].startswith(f"{path} record 1")
    argv = ["data", "check", str(path), "--image-root", str(data["root"]), "--workers", "0"]
    assert main(argv) == 1 and "duplicate ids: 1 record(s)" in capsys.readouterr().out
    with pytest.raises(DataError, match=r"record 3 \(line 4\).*is already the id of .* record 1"):
        load_eval_items(path, data["root"], validator)
    items, skipped = load_eval_items(path, data["root"], validator, on_bad_record="skip")
    assert len(items) == 3 and [s.kind for s in skipped] == ["duplicate_id"]
    mix = tmp_path / "twice.yaml"  # a mixture's repeats of one record are not duplicates
    mix.write_text(
        f"image_root: {data['root']}\ndatasets:\n  - json_path: {data['clean']}\n    weight: 2\n"
    )
    assert check_files([mix], None, validator, workers=0)["duplicate_ids"]["count"] == 0
