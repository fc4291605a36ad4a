"""Evaluation: answer normalisation and VQA score against hand-computed cases, per-category
accuracy with a scripted answerer, a real model end to end, and bad records."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from moe_vision.data.benchmark import BenchmarkSizes, generate_benchmark
from moe_vision.data.records import DataError
from moe_vision.evaluation.evaluate import (
    EvalResult,
    evaluate,
    normalize_answer,
    score,
    summarize,
    vqa_score,
)
from moe_vision.model.config import ModelConfig
from moe_vision.model.llm import build_tokenizer
from moe_vision.model.mllm import MoEVisionModel


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("Red", "red"),
        ("  The red circle. ", "red circle"),
        ("Three", "3"),
        ("two apples!", "2 apples"),
        ("an apple", "apple"),
        ("3.5", "3.5"),
        ("yes, it is", "yes it is"),
        ("GO", "go"),
        ("left-of", "left of"),
    ],
)
def test_normalize_answer(raw: str, expected: str) -> None:
    assert normalize_answer(raw) == expected


def test_vqa_score_hand_computed() -> None:
    answers = ["2", "two", "2", "3", "three", "2", "4", "2", "two", "5"]
    assert vqa_score("2", answers) == 1.0  # six matches, capped
    assert vqa_score("three", answers) == pytest.approx(2 / 3)  # matches "3" and "three"
    assert vqa_score("4", answers) == pytest.approx(1 / 3)
    assert vqa_score("6", answers) == 0.0
    assert vqa_score("The 4.", answers) == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match="at least one"):
        vqa_score("x", [])
    assert score("Red.", ["red"]) == 1.0 and score("blue", ["red"]) == 0.0
    assert score("red", ["red", "blue", "red"]) == pytest.approx(2 / 3)


@pytest.fixture(scope="module")
def bench(tmp_path_factory: pytest.TempPathFactory):
    sizes = BenchmarkSizes(align=6, instruct=6, val=6, test=12)
    return generate_benchmark(tmp_path_factory.mktemp("eval") / "b", seed=2, sizes=sizes)


class ScriptedAnswerer:
    """Answers from a table keyed by prompt+image, to check the scoring arithmetic alone."""

    def __init__(self, table: dict[tuple[str, str], str]) -> None:
        self.table = table
        self.tokenizer = build_tokenizer()
        self.config = SimpleNamespace(image_token="<image>")
        self.calls: list[int] = []

    def generate(self, images, prompts, max_new_tokens):
        self.calls.append(len(prompts))
        return [self.table[(p, Path(i).name)] for i, p in zip(images, prompts)]


def test_per_category_accuracy_hand_computed(bench) -> None:
    records = json.loads(bench.split("test").read_text())
    table = {}
    for r in records:
        question, answer = r["conversations"][0]["value"], r["conversations"][1]["value"]
        # Right on colour (with noise the normaliser removes), wrong on shape, right on the
        # first record of every other category only.
        if r["category"] == "color":
            pred = f"The {answer.upper()}."
        elif r["category"] == "shape":
            pred = "hexagon"
        else:
            pred = answer if r["id"] in {"test-00002", "test-00003"} else "nope"
        table[(question, r["image"])] = pred
    model = ScriptedAnswerer(table)
    result = evaluate(model, bench.split("test"), bench.images, batch_size=5)
    assert model.calls == [5, 5, 2]
    assert result.per_category["color"] == 1.0
    assert result.per_category["shape"] == 0.0
    assert result.per_category["count"] == 0.5 and result.per_category["spatial"] == 0.5
    assert result.per_category["ocr"] == 0.0 and result.per_category["detail"] == 0.0
    assert result.overall == pytest.approx(4 / 12)
    assert result.macro == pytest.approx((1 + 0.5 + 0.5) / 6)
    assert result.counts == {c: 2 for c in result.per_category}
    metrics = result.to_metrics()
    assert metrics["accuracy/overall"] == result.overall and "accuracy/color" in metrics
    assert [p["id"] for p in result.predictions] == [r["id"] for r in records]


def test_vqa_style_file_with_several_answers(bench, tmp_path: Path) -> None:
    records = json.loads(bench.split("val").read_text())[:2]
    records[0]["answers"] = ["red", "red", "blue"]
    records[1]["answers"] = ["3", "three", "3", "4"]
    records[1]["category"] = "count"
    records[0]["category"] = "vqa"
    path = tmp_path / "vqa.json"
    path.write_text(json.dumps(records))
    table = {
        (records[0]["conversations"][0]["value"], records[0]["image"]): "red",
        (records[1]["conversations"][0]["value"], records[1]["image"]): "Three",
    }
    result = evaluate(ScriptedAnswerer(table), path, bench.images)
    assert result.per_category == {"count": 1.0, "vqa": pytest.approx(2 / 3)}


def test_bad_records_error_or_are_counted(bench, tmp_path: Path) -> None:
    records = json.loads(bench.split("val").read_text())[:3]
    records[1]["conversations"][0]["value"] = "no placeholder"
    records[2]["answers"] = []
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(records))
    model = ScriptedAnswerer({(records[0]["conversations"][0]["value"], records[0]["image"]): "x"})
    with pytest.raises(DataError, match=r"bad\.json record 1 .*exactly one '<image>'"):
        evaluate(model, path, bench.images)
    result = evaluate(model, path, bench.images, on_bad_record="skip")
    assert [s.index for s in result.skipped] == [1, 2]
    assert len(result.predictions) == 1
    with pytest.raises(ValueError, match="batch_size"):
        evaluate(model, path, bench.images, batch_size=0)


def test_summarize_empty_categories() -> None:
    result = summarize([{"category": "a", "score": 1.0}, {"category": "b", "score": 0.0}])
    assert isinstance(result, EvalResult)
    assert result.per_category == {"a": 1.0, "b": 0.0} and result.overall == 0.5


def test_real_model_end_to_end(bench) -> None:
    model = MoEVisionModel.from_config(
        ModelConfig(experts=["clip-tiny"], fusion_options={"grid": [2, 2]})
    )
    result = evaluate(model, bench.split("test"), bench.images, batch_size=6, limit=6)
    assert len(result.predictions) == 6
    assert set(result.per_category) == {"color", "shape", "count", "spatial", "ocr", "detail"}
    for p in result.predictions:
        assert isinstance(p["prediction"], str) and p["score"] in (0.0, 1.0)
        assert p["score"] == float(
            normalize_answer(p["prediction"]) == normalize_answer(p["answers"][0])
        )


def test_evaluation_through_the_feature_cache_gives_the_same_answers(
    bench, tmp_path: Path, monkeypatch
) -> None:
    """The first cached evaluation computes and stores the test images' maps, the second reads
    them back without decoding an image or running an expert; both answer exactly as the
    uncached evaluation (a model whose answers depend on the pixels)."""
    from synthetic import seeing_model

    from experts.base import Expert
    from moe_vision.data.validation import RecordValidator
    from moe_vision.features.cache import FeatureCache

    model = seeing_model(ModelConfig(experts=["clip-tiny", "convnext-tiny"]))
    plain = evaluate(model, bench.split("test"), bench.images, batch_size=5)
    assert len({p["prediction"] for p in plain.predictions}) > 1
    cache = FeatureCache(tmp_path, policy="always")
    first = evaluate(model, bench.split("test"), bench.images, batch_size=5, cache=cache)
    assert cache.misses == 2 * 12
    answers = [p["prediction"] for p in plain.predictions]
    assert [p["prediction"] for p in first.predictions] == answers

    def refuse(*args, **kwargs):
        raise AssertionError("ran although every map is stored")

    monkeypatch.setattr(Expert, "forward", refuse)
    monkeypatch.setattr(RecordValidator, "open", refuse)
    monkeypatch.setattr("moe_vision.model.mllm.load_image", refuse)
    warm = FeatureCache(tmp_path, policy="always")
    second = evaluate(model, bench.split("test"), bench.images, batch_size=5, cache=warm)
    assert (warm.misses, warm.hits) == (0, 2 * 12)
    assert [p["prediction"] for p in second.predictions] == answers


def test_answers_do_not_depend_on_the_batch_size_and_the_prompt_format_is_recorded(
    tmp_path: Path,
) -> None:
    """`moe-vision eval` at batch 1 and at batch 16 (prompts of different lengths, so left
    padding, attention mask and position ids matter), each in a fresh process, gives the same
    answers for every fusion strategy; the run folder records the prompt format."""
    import os
    import subprocess
    import sys

    from synthetic import seeing_model

    import fusion
    from moe_vision.evaluation.evaluate import QUESTION_FIELD

    bench = generate_benchmark(
        tmp_path / "bench", seed=0, sizes=BenchmarkSizes(align=1, instruct=1, val=0, test=16)
    )
    runs = {}
    for name in fusion.list_fusions():
        model = seeing_model(
            ModelConfig(experts=["clip-tiny", "convnext-tiny"], fusion=name, llm="tiny-qwen2")
        )
        model.save_pretrained(tmp_path / name / "model")
        runs[name] = tmp_path / name
    data = ["--data", str(bench.split("test")), "--image-root", str(bench.images)]
    answers: dict[int, dict[str, list[str]]] = {}
    for batch in (1, 16):
        script = (
            "import sys\nfrom moe_vision.cli import main\n"
            f"for run in {[str(r) for r in runs.values()]!r}:\n"
            f"    assert main(['eval', '--run', run, '--batch-size', '{batch}'] + {data!r}) == 0\n"
        )
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
        proc = subprocess.run(
            [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=900
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        answers[batch] = {}
        for name, run in runs.items():
            out = json.loads((run / "eval" / "test.json").read_text())
            answers[batch][name] = [p["prediction"] for p in out["predictions"]]
            fmt = out["prompt_format"]
            assert fmt["chat_template"] == model.tokenizer.chat_template
            question = out["predictions"][0]["prompt"]
            assert fmt["prompt"].replace(QUESTION_FIELD, question) == (
                model.tokenizer.apply_chat_template(
                    [{"role": "user", "content": question}],
                    tokenize=False,
                    add_generation_prompt=True,
                )
            )
    prompts = [p["prompt"] for p in out["predictions"]]
    assert len({len(model.prompt_ids(p)) for p in prompts}) > 1  # batch 16 pads
    for name in runs:
        assert len(set(answers[1][name])) > 1, name  # answers depend on the image
        assert answers[16][name] == answers[1][name], name


def _longest_answer_plus_two(bench, tokenizer) -> int:
    answers = [r["conversations"][1]["value"] for r in json.loads(bench.split("test").read_text())]
    return max(len(tokenizer(a, add_special_tokens=False)["input_ids"]) for a in answers) + 2


def test_evaluate_asks_with_the_longest_answer_plus_two(bench) -> None:
    """Default max_new_tokens (answer_budget): the longest reference in tokens + 2."""
    records = json.loads(bench.split("test").read_text())
    model = ScriptedAnswerer({(r["conversations"][0]["value"], r["image"]): "x" for r in records})
    budgets: list[int] = []
    generate = model.generate
    model.generate = lambda images, prompts, max_new_tokens: (
        budgets.append(max_new_tokens) or generate(images, prompts, max_new_tokens)
    )
    evaluate(model, bench.split("test"), bench.images, batch_size=5)
    assert set(budgets) == {_longest_answer_plus_two(bench, model.tokenizer)}


def test_the_lmms_eval_task_asks_with_evaluates_budget(bench, tmp_path) -> None:
    pytest.importorskip("lmms_eval")  # the [eval] extra
    from moe_vision.evaluation import lmms_eval as adapter

    model = ScriptedAnswerer({})
    task = adapter.write_task(model, bench.split("test"), bench.images, tmp_path, task="t")
    budget = _longest_answer_plus_two(bench, model.tokenizer)
    assert f"max_new_tokens: {budget}\n" in (task / "t.yaml").read_text()
