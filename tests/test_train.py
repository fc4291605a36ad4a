"""Staged training: each stage trains exactly what its recipe names; NaN losses; accumulation.

Small: two tiny experts, the tiny LLM, a 24-record benchmark, 2 optimiser steps per unit.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from accelerate.utils import set_seed

from moe_vision.data.benchmark import BenchmarkPaths, BenchmarkSizes, generate_benchmark
from moe_vision.experiment.run import single_expert_model
from moe_vision.experiment.run_config import DatasetCache, RunConfig
from moe_vision.features.cache import FeatureCache
from moe_vision.model.config import ModelConfig
from moe_vision.model.mllm import MoEVisionModel
from moe_vision.training.options import TrainOptions, make_accelerator
from moe_vision.training.recipe_presets import get_recipe
from moe_vision.training.recipe_stages import Recipe, Stage
from moe_vision.training.trainer import Trainer
from moe_vision.training.units import NonFiniteLossError, StepEvent, expand_units

EXPERTS = ["clip-tiny", "convnext-tiny"]


@pytest.fixture(scope="module")
def bench(tmp_path_factory: pytest.TempPathFactory) -> BenchmarkPaths:
    sizes = BenchmarkSizes(align=24, instruct=24, val=4, test=12)
    return generate_benchmark(tmp_path_factory.getbasetemp() / "tiny-bench", seed=0, sizes=sizes)


def _model(seed: int = 0, experts: list[str] = EXPERTS) -> MoEVisionModel:
    set_seed(seed)
    return MoEVisionModel.from_config(ModelConfig(experts=experts))


def _trainer(
    model: MoEVisionModel,
    recipe: Recipe,
    bench: BenchmarkPaths,
    out: Path,
    cache: FeatureCache | None = None,
    hooks: tuple = (),
    **options: object,
) -> Trainer:
    opts = TrainOptions(progress_bar=False, log_with=[], use_feature_cache=cache is not None)
    for k, v in options.items():
        setattr(opts, k, v)
    splits = {n: bench.split(n) for n in ("align", "instruct", "val", "test")}
    return Trainer(
        model,
        recipe,
        DatasetCache(RunConfig(), splits, bench.images),
        out,
        make_accelerator(opts, out / "logs"),
        opts,
        unit_model=single_expert_model,
        cache=cache,
        hooks=hooks,
    )


def _snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _matches(name: str, patterns: list[str]) -> bool:
    import fnmatch

    return any(fnmatch.fnmatchcase(name, p) or name.startswith(p + ".") for p in patterns)


@pytest.mark.parametrize("recipe_name", ["eagle", "cambrian"])
def test_each_stage_trains_exactly_its_parameters(recipe_name: str, bench, tmp_path) -> None:
    """Parameter by parameter: frozen ones bitwise unchanged, named ones trainable and moved."""
    model = _model()
    recipe = get_recipe(recipe_name).with_overrides(
        {"*": {"max_steps": 2, "batch_size": 2, "lr": 1e-2}}
    )
    for k, stage in enumerate(recipe.stages):
        seen_flags: dict[str, bool] = {}

        def record(event: StepEvent, stage: Stage = stage, seen_flags: dict = seen_flags) -> None:
            if not stage.per_expert and not seen_flags:
                seen_flags.update({n: p.requires_grad for n, p in model.named_parameters()})

        before = _snapshot(model)
        one = Recipe(recipe.name, [stage])
        _trainer(model, one, bench, tmp_path / f"s{k}", hooks=(record,)).fit()
        after = _snapshot(model)
        changed = {n for n in before if not torch.equal(before[n], after[n])}
        if stage.per_expert:
            # each expert trains in its own unit; the mixture's fusion/projector/LLM do not
            expected = {n for n in before if n.startswith("experts.")}
        else:
            expected = {n for n in before if _matches(n, stage.train)}
            assert {n for n, f in seen_flags.items() if f} == expected, stage.name
        assert changed <= expected, f"{stage.name}: frozen parameters moved: {changed - expected}"
        # every named module group really trained (parameters without gradient, such as
        # heads the feature map does not use, may stay put)
        groups = {
            ".".join(n.split(".")[:2]) if n.startswith("experts.") else n.split(".")[0]
            for n in expected
        }
        moved = {
            ".".join(n.split(".")[:2]) if n.startswith("experts.") else n.split(".")[0]
            for n in changed
        }
        assert groups == moved, f"{stage.name}: named but unchanged groups {groups - moved}"
        assert len(changed) >= 0.8 * len(expected), f"{stage.name}: too few parameters moved"


def test_units_and_accumulation(bench, tmp_path) -> None:
    recipe = Recipe(
        "acc", [Stage("s", "align", ["projector.*"], batch_size=4, grad_accum=2, epochs=2)]
    )
    assert [u.name for u in expand_units(get_recipe("eagle"), 2)] == [
        "prealign[0]",
        "prealign[1]",
        "joint",
        "sft",
    ]
    events: list[StepEvent] = []
    model = _model(experts=["clip-tiny"])
    reports = _trainer(model, recipe, bench, tmp_path, hooks=(events.append,)).fit()
    # 24 samples / 4 = 6 micro-batches per epoch, 2 per optimiser step -> 3 steps x 2 epochs
    assert [e.optimizer_steps for e in events] == [1, 2, 3, 4, 5, 6]
    assert [e.batches_done for e in events] == [2, 4, 6, 2, 4, 6]
    assert reports[0].optimizer_steps == 6 and reports[0].samples == 48
    assert reports[0].train == ["projector"]


def test_nonfinite_loss_is_counted_then_raises(bench, tmp_path) -> None:
    model = _model(experts=["clip-tiny"])
    model.projector.register_forward_hook(lambda m, i, o: o * float("nan"))
    before = _snapshot(model)
    recipe = Recipe("nan", [Stage("s", "align", ["projector.*"], batch_size=4)])
    with pytest.raises(NonFiniteLossError, match=r"unit 's', epoch 0.*max_nonfinite=0"):
        _trainer(model, recipe, bench, tmp_path / "a").fit()
    trainer = _trainer(model, recipe, bench, tmp_path / "b", max_nonfinite=1)
    with pytest.raises(NonFiniteLossError, match="2 non-finite losses exceed max_nonfinite=1"):
        trainer.fit()
    assert trainer.state.nonfinite_skipped == 2
    after = _snapshot(model)
    assert all(torch.equal(before[n], after[n]) for n in before)  # no update from NaN batches


def test_gradient_checkpointing_gives_the_same_training(bench, tmp_path) -> None:
    recipe = Recipe("gc", [Stage("s", "instruct", ["*"], batch_size=4, max_steps=2, lr=1e-3)])
    results = []
    for flag in (False, True):
        model = _model(experts=["clip-tiny"])
        _trainer(model, recipe, bench, tmp_path / str(flag), gradient_checkpointing=flag).fit()
        results.append(_snapshot(model))
        assert model.is_gradient_checkpointing == flag
    for n in results[0]:
        torch.testing.assert_close(results[0][n], results[1][n], rtol=1e-5, atol=1e-6, msg=n)


def test_per_expert_stage_needs_a_unit_model_factory(bench, tmp_path) -> None:
    opts = TrainOptions(progress_bar=False, log_with=[])
    with pytest.raises(ValueError, match="per_expert stage but no unit_model"):
        Trainer(
            _model(),
            get_recipe("eagle"),
            DatasetCache(RunConfig(), {}, bench.images),
            tmp_path,
            make_accelerator(opts, tmp_path),
            opts,
        )


def test_stage_optimiser_is_torchs_fused_adamw_with_the_stage_groups() -> None:
    """The stages' AdamW runs torch's fused kernel on CPU, with the stage's groups (per-pattern
    LR, no decay on 1-D), and steps as torch's per-tensor AdamW does on the same groups."""
    from moe_vision.training.steps import fused_adamw_supported, make_optimizer

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.LayerNorm(5), torch.nn.Linear(5, 2))
    reference = copy.deepcopy(net)
    stage = Stage(
        name="s",
        data="align",
        train=["*"],
        lr=1e-2,
        lr_scale={"2.*": 0.5},
        weight_decay=0.1,
        warmup_ratio=0.0,
        scheduler="constant",
    )
    optimizer, _, _ = make_optimizer(net, stage, num_batches=4, num_processes=1)
    assert optimizer.defaults["fused"] is True
    groups = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    assert sorted((g["lr"], g["weight_decay"]) for g in groups) == [
        (5e-3, 0.0),
        (5e-3, 0.1),
        (1e-2, 0.0),
        (1e-2, 0.1),
    ]
    by_name = dict(reference.named_parameters())
    names = [n for n, _ in net.named_parameters()]
    ref_groups = []
    for g in optimizer.param_groups:
        ids = {id(p) for p in g["params"]}
        params = [by_name[n] for n, p in net.named_parameters() if id(p) in ids]
        ref_groups.append({"params": params, "lr": g["lr"], "weight_decay": g["weight_decay"]})
    ref_opt = torch.optim.AdamW(ref_groups, foreach=False)
    x = torch.randn(8, 6)
    for _ in range(3):
        for model, opt in ((net, optimizer), (reference, ref_opt)):
            opt.zero_grad()
            model(x).square().mean().backward()
            opt.step()
    for name in names:
        torch.testing.assert_close(
            dict(net.named_parameters())[name], by_name[name], rtol=1e-5, atol=1e-6
        )
    assert not fused_adamw_supported([])
    assert not fused_adamw_supported([torch.zeros(3, dtype=torch.long)])
    assert not fused_adamw_supported([torch.zeros(3, device="meta")])


def test_compiled_llm_blocks_train_like_eager_and_evaluate_without_compiling(
    bench, tmp_path
) -> None:
    """``train.compile_llm``: the LLM's decoder blocks compiled in place (names unchanged), a
    training step with the same loss and gradients as eager, one graph for every batch length,
    evaluation under ``eager()`` compiling nothing; through the trainer, the blocks end compiled."""
    from torch._dynamo.utils import counters

    from moe_vision.training.steps import compile_llm_blocks, eager, repeated_blocks

    compiled, reference = _model(), _model()
    names = list(compiled.state_dict())
    blocks = compiled.llm.config.num_hidden_layers
    assert compile_llm_blocks(compiled) == blocks == compile_llm_blocks(compiled)
    assert list(compiled.state_dict()) == names
    ds = DatasetCache(RunConfig(), {"instruct": bench.split("instruct")}, bench.images)
    data = ds("instruct", compiled)
    for size in (2, 3):  # two batches, two text lengths
        batch = data.collate([data[i] for i in range(size)])
        losses, grads = [], []
        for model in (compiled, reference):
            model.zero_grad(set_to_none=True)
            loss = model(
                **{k: batch[k] for k in ("input_ids", "attention_mask", "labels")},
                images=batch["images"],
            ).loss
            loss.backward()
            losses.append(loss.detach())
            grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
        torch.testing.assert_close(losses[0], losses[1], rtol=1e-5, atol=1e-6)
        assert grads[0].keys() == grads[1].keys()
        for n in grads[0]:
            torch.testing.assert_close(grads[0][n], grads[1][n], rtol=1e-4, atol=1e-6)
    graphs = counters["stats"]["unique_graphs"]
    compiled.eval()
    with eager(), torch.no_grad():
        out = compiled(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            images=batch["images"],
        ).logits
    assert counters["stats"]["unique_graphs"] == graphs
    reference.eval()
    with torch.no_grad():
        expected = reference(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            images=batch["images"],
        ).logits
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)

    model = _model()
    recipe = get_recipe("llava").with_overrides({"*": {"max_steps": 1, "batch_size": 2}})
    _trainer(model, recipe, bench, tmp_path / "run", compile_llm=True).fit()
    assert all(b._compiled_call_impl is not None for b in repeated_blocks(model.llm))
    with pytest.raises(TypeError, match="no repeated LLM blocks"):
        compile_llm_blocks(torch.nn.Linear(2, 2))
