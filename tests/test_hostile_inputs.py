"""Hostile inputs through ``moe-vision train`` and ``moe-vision eval`` (issue 9), with the skip and
the error policy: corrupt PNG, 0-byte file, truncated JPEG, decompression-bomb-sized PNG,
over-long conversation, image paths outside the image root (``..`` and absolute), non-UTF-8
bytes, JSON nested 100,000 deep and a 5000-digit integer (issue 27.11). Under skip every run
completes and ``metrics.json`` holds the skip counts; under error each stops with a one-line
message naming the file and the record. And: no file outside the
image root is ever opened."""

from __future__ import annotations

import builtins
import io
import json
import os
import shutil
from pathlib import Path

import pytest
from hostile import png_claiming, truncated_jpeg
from PIL import Image

from moe_vision.cli import main
from moe_vision.data.benchmark import BenchmarkSizes, generate_benchmark
from moe_vision.data.llava import load_records, read_skips
from moe_vision.data.records import DataError, RecordProblem
from moe_vision.experiment.run_config import DataConfig, RunConfig
from moe_vision.training.options import TrainOptions


def _conv(question: str) -> list[dict]:
    return [{"from": "human", "value": question}, {"from": "gpt", "value": "red"}]


def _hostile(secret: Path) -> dict[str, tuple[bytes, str]]:
    """Case -> (one JSONL line, the problem kind it must be reported as)."""

    def line(rid: str, image: str, question: str = "<image>\nWhat color?") -> bytes:
        return json.dumps({"id": rid, "image": image, "conversations": _conv(question)}).encode()

    return {
        "corrupt png": (line("corrupt", "corrupt.png"), "corrupt_image"),
        "0-byte file": (line("empty", "empty.png"), "corrupt_image"),
        "truncated jpeg": (line("cut", "cut.jpg"), "corrupt_image"),
        "bomb png": (line("bomb", "bomb.png"), "image_too_large"),
        "over-long": (line("long", "ok.png", "<image>\n" + "why " * 3000), "over_length"),
        "dot-dot path": (line("up", "../secret.png"), "outside_root"),
        "absolute path": (line("abs", str(secret)), "outside_root"),
        "non-utf8": (
            line("bytes", "ok.png", "<image>\nWhat colour?").replace(b"colour", b"col\xffr"),
            "not_utf8",
        ),
        "deep nesting": (b"[" * 100_000, "malformed"),  # RecursionError in the JSON parser
        "huge integer": (b'{"id": ' + b"7" * 5000 + b"}", "malformed"),  # int digit limit
    }


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict:
    tmp = tmp_path_factory.mktemp("hostile")
    bench = generate_benchmark(
        tmp / "bench", seed=0, sizes=BenchmarkSizes(align=8, instruct=8, val=2, test=6)
    )
    root = tmp / "root"
    shutil.copytree(bench.images, root)
    Image.new("RGB", (24, 24), (200, 10, 10)).save(root / "ok.png")
    (root / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    (root / "empty.png").write_bytes(b"")
    (root / "cut.jpg").write_bytes(truncated_jpeg())
    (root / "bomb.png").write_bytes(png_claiming(10_000, 10_000))
    secret = tmp / "secret.png"
    Image.new("RGB", (8, 8)).save(secret)
    cases = _hostile(secret)

    def mix(good: list[dict], path: Path) -> Path:
        lines = [json.dumps(r).encode() for r in good]
        for k, (bad, _) in enumerate(cases.values()):
            lines.insert(2 * k + 1, bad)
        path.write_bytes(b"\n".join(lines) + b"\n")
        return path

    train = mix(load_records(bench.split("instruct")), tmp / "train.jsonl")
    test = mix(load_records(bench.split("test")), tmp / "test.jsonl")
    cfg = RunConfig(
        recipe="llava",
        overrides={"*": {"batch_size": 32, "max_steps": 1}},  # one batch: every record, once
        data=DataConfig(benchmark_dir=str(tmp / "bench")),
        train=TrainOptions(progress_bar=False, log_with=[]),
        cache_dir=str(tmp / "cache"),
    )
    cfg.model.experts = ["clip-tiny"]
    cfg.to_yaml(tmp / "run.yaml")
    argv = ["train", "--config", str(tmp / "run.yaml"), "--image-root", str(root)]
    for split, path in (("align", train), ("instruct", train), ("test", test)):
        argv += ["--data", f"{split}={path}"]
    return {"tmp": tmp, "root": root, "train": train, "test": test, "argv": argv, "cases": cases}


def _one_line_error(argv: list[str], capsys) -> str:
    """The error a failing command reports: its ``error: ...`` line on stderr (or, without the
    CLI's formatting, the DataError raised)."""
    try:
        code = main(argv)
    except DataError as err:
        return str(err)
    except SystemExit as err:
        code = err.code
    assert code not in (0, None)
    errors = [x for x in capsys.readouterr().err.splitlines() if x.startswith("error: ")]
    assert len(errors) == 1, errors
    return errors[0]


@pytest.fixture(scope="module")
def skip_run(setup) -> Path:
    out = setup["tmp"] / "skip"
    assert main([*setup["argv"], "--out", str(out), "--on-bad-record", "skip"]) == 0
    return out


def test_skip_training_and_evaluation_complete_with_counts(setup, skip_run) -> None:
    kinds = sorted(kind for _, kind in setup["cases"].values())
    metrics = json.loads((skip_run / "metrics.json").read_text())
    n = len(kinds)
    assert metrics["skipped_records/train"] == n and metrics["skipped_records/eval"] == n
    assert metrics["skipped_records"] == 2 * n and metrics["eval_samples"] == 6
    written = {p.name for p in (skip_run / "data").glob("*.sources.json")}
    assert written == {"align.sources.json", "instruct.sources.json"}  # one file, two names
    train = read_skips(skip_run / "skipped_train.jsonl")
    assert sorted(s.kind for s in train) == kinds
    assert {s.file for s in train} == {str(setup["train"])}
    evals = read_skips(skip_run / "skipped_eval.jsonl")
    assert sorted(s.kind for s in evals) == kinds and {s.file for s in evals} == {
        str(setup["test"])
    }


def test_eval_skip_bad_completes_with_counts(setup, skip_run, capsys) -> None:
    argv = ["eval", "--run", str(skip_run), "--data", str(setup["test"])]
    argv += ["--image-root", str(setup["root"]), "--skip-bad"]
    assert main(argv) == 0
    report = json.loads((skip_run / "eval" / "test.json").read_text())
    assert report["scores"]["skipped_records"] == len(setup["cases"])
    assert report["scores"]["skipped_records/corrupt_image"] == 3
    assert len(report["predictions"]) == 6


@pytest.mark.parametrize(
    "case",
    [
        "corrupt png",
        "0-byte file",
        "truncated jpeg",
        "bomb png",
        "over-long",
        "dot-dot path",
        "absolute path",
        "non-utf8",
        "deep nesting",
        "huge integer",
    ],
)
def test_eval_error_stops_naming_file_and_record(case, setup, skip_run, capsys) -> None:
    line, kind = setup["cases"][case]
    data = setup["tmp"] / f"case-{kind}-{abs(hash(case))}.jsonl"
    good = json.dumps({"id": "g", "image": "ok.png", "conversations": _conv("<image>\nColor?")})
    data.write_bytes(good.encode() + b"\n" + line + b"\n")
    argv = ["eval", "--run", str(skip_run), "--data", str(data), "--image-root", str(setup["root"])]
    message = _one_line_error(argv, capsys)
    assert "\n" not in message and f"{data} record 1 (line 2)" in message


def test_train_error_stops_naming_file_and_record(setup, capsys) -> None:
    out = setup["tmp"] / "error"
    message = _one_line_error([*setup["argv"], "--out", str(out)], capsys)
    assert "\n" not in message and f"{setup['train']} record " in message
    assert not (out / "metrics.json").exists()


def test_no_file_outside_the_image_root_is_opened(setup, monkeypatch) -> None:
    from moe_vision.data.validation import RecordValidator
    from moe_vision.model.llm import build_tokenizer

    root, secret = setup["root"], setup["tmp"] / "secret.png"
    opened: list[str] = []

    def spy(real):
        def wrapper(path, *args, **kwargs):
            opened.append(os.path.realpath(path) if isinstance(path, (str, os.PathLike)) else "")
            return real(path, *args, **kwargs)

        return wrapper

    monkeypatch.setattr(builtins, "open", spy(builtins.open))
    monkeypatch.setattr(io, "open", spy(io.open))
    monkeypatch.setattr(os, "open", spy(os.open))
    monkeypatch.setattr(Image, "open", spy(Image.open))
    validator = RecordValidator(build_tokenizer(), num_visual_tokens=4)
    for image in ("../secret.png", str(secret), "sub/../../secret.png", "./../secret.png"):
        record = {"id": "x", "image": image, "conversations": _conv("<image>\nWhat?")}
        with pytest.raises(RecordProblem, match="leaves the image root") as err:
            validator.validate(record, 0, root)
        assert err.value.kind == "outside_root"
    validator.validate({"image": "ok.png", "conversations": _conv("<image>?")}, 0, root)
    assert str(root / "ok.png") in opened  # the spy sees the files that are opened
    assert str(secret) not in opened
    allowed = RecordValidator(build_tokenizer(), num_visual_tokens=4, allow_outside_root=True)
    allowed.validate({"image": "../secret.png", "conversations": _conv("<image>?")}, 0, root)
    assert os.path.realpath(secret) in opened  # explicitly allowed: read
