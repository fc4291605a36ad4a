"""The lmms-eval adapter: ``lmms-eval --model moe_vision`` on a local task built from the benchmark.

A tiny LLaVA run is trained; :func:`write_task` turns its test split into a local lmms-eval
task; the ``lmms-eval`` command (its own entry function, in this process) evaluates the run and
must report the accuracy :func:`moe_vision.evaluation.evaluate.evaluate` reports on the same
questions, after asking the model exactly the same batches (prompts, image pixels, answer
budget). A barely trained model answers "" to everything, so the model's ``generate`` is wrapped
by an oracle that answers correctly for half the images, found by their pixels: the accuracy is
then not trivially 0, and it only matches if each question reached the model with its own
image. ``loglikelihood`` is checked against the model's own training loss, one request at a time.

Skipped where lmms-eval is not installed (CI installs only ``[dev]``).
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("lmms_eval")

from experts.base import collate_inputs  # noqa: E402
from experts.images import load_image  # noqa: E402
from moe_vision.data.benchmark import BenchmarkSizes  # noqa: E402
from moe_vision.evaluation import lmms_eval as adapter  # noqa: E402
from moe_vision.evaluation.evaluate import evaluate  # noqa: E402
from moe_vision.experiment.run import run_experiment
from moe_vision.experiment.run_config import DataConfig, RunConfig, cache_root
from moe_vision.model.config import ModelConfig
from moe_vision.model.mllm import MoEVisionModel
from moe_vision.training.options import TrainOptions


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> tuple[Path, Path, Path]:
    """(run folder, test split, image root) of a tiny trained LLaVA run."""
    root = tmp_path_factory.mktemp("lmms")
    sizes = BenchmarkSizes(align=8, instruct=8, val=4, test=12)
    cfg = RunConfig(
        model=ModelConfig(experts=["clip-tiny"]),
        recipe="llava",
        overrides={"*": {"batch_size": 4, "max_steps": 1, "lr": 1e-3}},
        data=DataConfig(benchmark_sizes=sizes.to_dict(), benchmark_dir=str(root / "bench")),
        train=TrainOptions(progress_bar=False, log_with=[]),
        cache_dir=str(root / "cache"),
    )
    run_experiment(cfg, root / "run", resume=False)
    splits, image_root = cfg.data.resolve(cache_root(cfg))
    return root / "run", Path(splits["test"]), Path(image_root)


def _pixels(image) -> str:
    return hashlib.sha1(load_image(image).tobytes()).hexdigest()


def test_lmms_eval_reports_the_accuracy_of_evaluate(run, tmp_path, monkeypatch) -> None:
    run_dir, test_json, image_root = run
    records = json.loads(test_json.read_text())
    oracle = {}  # image pixels -> the right answer, for every other question
    for i, rec in enumerate(records):
        if i % 2 == 0:
            oracle[_pixels(image_root / rec["image"])] = rec["conversations"][1]["value"]
    calls: list[tuple] = []
    generate = MoEVisionModel.generate

    def recorded(self, images, prompts, max_new_tokens=16, **kwargs):
        keys = [_pixels(im) for im in images]
        calls.append((list(prompts), keys, max_new_tokens, kwargs))
        real = generate(self, images, prompts, max_new_tokens=max_new_tokens, **kwargs)
        return [oracle.get(k, r) for k, r in zip(keys, real)]

    monkeypatch.setattr(MoEVisionModel, "generate", recorded)

    model = MoEVisionModel.from_pretrained(run_dir / "model")
    reference = evaluate(model, test_json, image_root, batch_size=4)
    ref_calls, calls[:] = list(calls), []
    task_dir = adapter.write_task(model, test_json, image_root, tmp_path / "task", task="mv_test")

    from lmms_eval.cli.dispatch import main as lmms_eval_main  # the `lmms-eval` script

    out = tmp_path / "out"
    argv = ["lmms-eval", "--model", "moe_vision", "--model_args", f"run={run_dir},device=cpu"]
    argv += ["--tasks", "mv_test", "--include_path", str(task_dir), "--batch_size", "4"]
    argv += ["--output_path", str(out), "--log_samples"]
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(sys, "argv", argv)
    lmms_eval_main()

    results = json.loads(next(out.glob("*results.json")).read_text())["results"]["mv_test"]
    assert 0 < reference.overall < 1
    assert results["accuracy,none"] == pytest.approx(reference.overall, abs=1e-12)
    assert calls == ref_calls  # same batches: prompts, image pixels, answer budget
    samples = [json.loads(line) for line in next(out.glob("*samples*.jsonl")).open()]
    got = {s["doc_id"]: s["filtered_resps"] for s in samples}
    assert [got[i] for i in range(len(records))] == [p["prediction"] for p in reference.predictions]


def _instance(args: tuple, i: int):
    from lmms_eval.api.instance import Instance

    meta = {"task": "t", "doc_id": i, "repeats": 1}
    return Instance("loglikelihood", args, i, metadata=meta)


def test_loglikelihood_matches_the_training_loss(run) -> None:
    run_dir, test_json, image_root = run
    lm = adapter.MoEVisionLMM(run=str(run_dir), device="cpu", batch_size=3)
    records = json.loads(test_json.read_text())[:4]
    lm.task_dict = {"t": {"test": [{"image": str(image_root / r["image"])} for r in records]}}

    def visual(doc):
        return [load_image(doc["image"])]

    requests = [
        _instance(("What color is the shape?", " red", visual, 0, "t", "test"), 0),
        _instance(("<image>\nWhich shape?", "a small blue circle", visual, 1, "t", "test"), 1),
        _instance(("How many?", " 3", visual, 2, "t", "test"), 2),
        _instance(("Read it.", "GO", visual, 3, "t", "test"), 3),
        _instance(("", "yes"), 4),  # unconditional: no image
    ]
    got = lm.loglikelihood(requests)

    model, tok = lm.model, lm.model.tokenizer
    for req, (logprob, greedy) in zip(requests, got):
        ctx, cont = req.args[0], req.args[1]
        images = [] if len(req.args) == 2 else [lm.task_dict["t"]["test"][req.args[3]]["image"]]
        prompt = lm._prompt(ctx, len(images))
        prefix = model.prompt_ids(prompt, len(images))
        target = tok(cont, add_special_tokens=False)["input_ids"]
        ids = torch.tensor([prefix + target])
        labels = torch.tensor([[-100] * len(prefix) + target])
        inputs = None
        if images:
            inputs = [collate_inputs([pre(load_image(images[0]))]) for pre in model.preprocessors]
        with torch.no_grad():
            out = model(input_ids=ids, labels=labels, images=inputs)
        assert logprob == pytest.approx(-float(out.loss) * len(target), rel=1e-4, abs=1e-4)
        best = out.logits[0, -len(target) - 1 : -1].argmax(-1).tolist()
        assert greedy == (best == target)


def test_generation_settings() -> None:
    lm = object.__new__(adapter.MoEVisionLMM)  # settings only: no model needed
    lm.max_new_tokens = 128
    assert lm._generation({"until": "\n", "max_new_tokens": 5, "temperature": 0}) == (5, ["\n"], {})
    assert lm._generation({"num_beams": 3, "max_new_tokens": None}) == (128, [], {"num_beams": 3})
    with pytest.raises(ValueError, match="decodes greedily"):
        lm._generation({"do_sample": True, "temperature": 0.7})
    with pytest.raises(ValueError, match="decodes greedily"):
        lm._generation({"temperature": 0.7})
    assert lm._cut("red\n\nblue", ["\n\n"]) == "red" and lm._cut("red", []) == "red"
    with pytest.raises(FileNotFoundError, match="neither a run folder"):
        adapter.model_dir("/nonexistent/run")
