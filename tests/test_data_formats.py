"""Formats researchers reuse (issue 27.2, 27.3): video records are refused by name everywhere;
Eagle 2 ``sft_jsonl`` records, Eagle 2 recipes and InternVL ``meta.json`` files are read as data
and mixtures (``repeat_time`` as the weight); InternVL single-image records without ``<image>``
get it prepended in the ``internvl`` layout only. Samples are written in each project's format."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from moe_vision.cli import main
from moe_vision.data.check import check_files
from moe_vision.data.llava import LlavaDataset, resolve_data
from moe_vision.data.records import DataError, RecordProblem
from moe_vision.data.validation import RecordValidator
from moe_vision.evaluation.evaluate import load_eval_items
from moe_vision.model.llm import build_tokenizer


def _conv(question: str, answer: str = "a red square") -> list[dict]:
    return [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]


VIDEO = {
    "video key": {"id": "v1", "video": "clip.mp4", "conversations": _conv("<video>\nSummarize.")},
    "placeholder only": {"id": "v2", "conversations": _conv("<video>\nSummarize.")},
    "eagle 2.5 entry": {
        "id": "v3",
        "conversations": _conv("<video>\nWhat happens?"),
        "data": [{"type": "video", "video": "clip.mp4", "fps": 2}],
    },
}


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("formats")
    for k, colour in enumerate([(200, 0, 0), (0, 200, 0), (0, 0, 200)]):
        Image.new("RGB", (24 + 8 * k, 24), colour).save(folder / f"im{k}.png")
    return folder


@pytest.fixture(scope="module")
def validator() -> RecordValidator:
    return RecordValidator(build_tokenizer(), num_visual_tokens=4)


def _jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.mark.parametrize("case", sorted(VIDEO))
def test_video_records_are_refused_by_name(case, root, validator) -> None:
    with pytest.raises(RecordProblem, match="video records are not supported") as err:
        validator.validate(VIDEO[case], 0, root)
    assert err.value.kind == "video"


def test_video_refused_in_check_training_and_evaluation(root, validator, tmp_path) -> None:
    good = {"id": "g", "image": "im0.png", "conversations": _conv("<image>\nColour?")}
    path = _jsonl(tmp_path / "mixed.jsonl", [good, *VIDEO.values()])
    report = check_files([path], root, validator, workers=0)
    assert report["problems"]["video"]["count"] == 3 and report["dropped"] == 3
    assert report["layouts"] == {"text_only": 0, "single_image": 1, "multi_image": 0}
    where = report["problems"]["video"]["examples"][0]["where"]
    assert where.startswith(f"{path} record 1 (line 2)")
    argv = ["data", "check", str(path), "--image-root", str(root), "--workers", "0"]
    assert main(argv) == 1
    import experts

    pre = [experts.create_expert("clip-tiny").preprocessor]
    train = LlavaDataset(path, root, pre, validator.tokenizer, num_visual_tokens=4)
    with pytest.raises(DataError, match=r"record 1 \(line 2\) \(id 'v1'\): video records are not"):
        train[1]
    skip = LlavaDataset(
        path, root, pre, validator.tokenizer, num_visual_tokens=4, on_bad_record="skip"
    )
    assert skip[1]["id"] == "g"  # replaced by the next good record (wrapping round)
    assert skip.skipped_reasons() == {"video": 3}
    with pytest.raises(DataError, match="video records are not supported"):
        load_eval_items(path, root, validator)
    items, skipped = load_eval_items(path, root, validator, on_bad_record="skip")
    assert [i.id for i in items] == ["g"] and [s.kind for s in skipped] == ["video"] * 3


def _eagle(rid: str, images: list[str], question: str) -> dict:
    """An Eagle 2 / 2.5 sft_jsonl record (Eagle2_5/document/2.preparing_playground.md)."""
    return {
        "id": rid,
        "conversations": [
            {"from": "system", "value": "This system prompt is optional."},
            *_conv(question),
        ],
        "data": [{"type": "image", "image_list": images}],
    }


def test_eagle_sft_jsonl_records_read_their_image_list(root, validator) -> None:
    two = _eagle("e2", ["im0.png", "im1.png"], "<image>\n<image>\nCompare them.")
    sample = validator.validate(two, 0, root)
    assert [p.name for p in sample.image_paths] == ["im0.png", "im1.png"]
    split = {**two, "data": [{"type": "image", "image_list": ["im0.png"]}] * 2}
    assert len(validator.validate(split, 0, root).image_paths) == 2
    text = {**two, "data": [], "conversations": _conv("Tell me a story.")}
    assert validator.validate(text, 0, root).image_paths == []
    with pytest.raises(RecordProblem, match="needs exactly 2"):  # placeholders still checked
        validator.validate(_eagle("e", ["im0.png", "im1.png"], "<image> one?"), 0, root)
    with pytest.raises(RecordProblem, match="entry 0 must be"):
        validator.validate({**two, "data": [{"type": "audio"}]}, 0, root)


def _meta(tmp_path: Path, root: Path) -> tuple[Path, list[dict], list[dict]]:
    """An InternVL meta.json (and an Eagle recipe entry) over two annotation files."""
    internvl = [  # InternVL single-image records without <image>, and one with it
        {"id": "i0", "image": "im0.png", "width": 24, "height": 24, "conversations": _conv("Hue?")},
        {"id": "i1", "image": "im1.png", "conversations": _conv("<image>\nHue?")},
        {"id": "i2", "conversations": _conv("Text only.")},
    ]
    eagle = [_eagle("e0", ["im2.png"], "What colour?")]
    (tmp_path / "ann").mkdir()
    _jsonl(tmp_path / "ann" / "internvl.jsonl", internvl)
    _jsonl(tmp_path / "ann" / "eagle.jsonl", eagle)
    meta = {
        "internvl_set": {
            "root": str(root),
            "annotation": "ann/internvl.jsonl",
            "data_augment": False,
            "repeat_time": 2,
            "length": 3,
        },
        "LLaVAR-Instruct-16K": {  # Eagle 2 recipe entry
            "root": str(root),
            "annotation": "ann/eagle.jsonl",
            "weight": 1,
            "repeat_time": 0.5,
            "length": 1,
            "modality": ["image"],
        },
    }
    path = tmp_path / "meta.json"
    path.write_text(json.dumps(meta, indent=2))
    return path, internvl, eagle


def test_internvl_meta_and_eagle_recipe_read_as_a_mixture(root, validator, tmp_path) -> None:
    meta, internvl, eagle = _meta(tmp_path, root)
    index, roots, counts = resolve_data(meta, None, seed=0)
    assert [c["selected"] for c in counts] == [6, 0] or [c["selected"] for c in counts] == [6, 1]
    assert [c["weight"] for c in counts] == [2, 0.5] and counts[0]["layout"] == "internvl"
    assert counts[0]["available"] == 3 and counts[1]["available"] == 1
    first = index.read(0)  # InternVL prepends "<image>\n" to a single-image record without one
    assert first["conversations"][0]["value"] == "<image>\nHue?"
    assert index.read(1) == internvl[1] and index.read(2) == internvl[2]
    report = check_files([meta], None, validator, workers=0)
    assert report["dropped"] == 0 and report["layouts"]["single_image"] >= 4
    recipe = json.loads(meta.read_text())
    recipe["LLaVAR-Instruct-16K"]["repeat_time"] = 1
    meta.write_text(json.dumps(recipe))
    index, _, _ = resolve_data(meta, None, seed=0)
    eagle_record = index.read(len(index) - 1)  # Eagle: the same layout as InternVL
    assert eagle_record["conversations"][1]["value"] == "<image>\nWhat colour?"
    assert len(validator.validate(eagle_record, 0, root).image_paths) == 1
    assert eagle[0]["conversations"][1]["value"] == "What colour?"


def test_a_missing_placeholder_stays_an_error_in_llava_files(root, validator, tmp_path) -> None:
    meta, internvl, _ = _meta(tmp_path, root)
    plain = tmp_path / "ann" / "internvl.jsonl"  # the same file, read as LLaVA data
    report = check_files([plain], root, validator, workers=0)
    assert report["problems"]["placeholder_mismatch"]["count"] == 1
    assert main(["data", "check", str(meta), "--workers", "0"]) == 0


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({"x": {"root": "", "annotation": "a.jsonl", "repeat_time": float("inf")}}, "finite"),
        ({"x": {"root": "", "annotation": "a.jsonl", "repeat_time": 2_000_000}}, "above the max"),
        ({"x": {"root": ""}}, "'annotation'"),
    ],
)
def test_bad_meta_files_are_refused_clearly(entry, message, tmp_path) -> None:
    path = tmp_path / "meta.json"
    path.write_text(json.dumps(entry))
    with pytest.raises(DataError, match=message) as err:
        resolve_data(path, tmp_path)
    assert str(path) in str(err.value) and "dataset 'x'" in str(err.value)
