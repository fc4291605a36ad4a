"""LoRA / QLoRA stages (:mod:`moe_vision.model.adapters`).

The end-to-end test trains a tiny Eagle recipe: per-expert pre-alignment adapts each expert's
``fc1`` (rank 2), the joint stage adapts one expert (CLIP, q/v, rank 4) and SFT adds LoRA on the
LLM. Only fusion, projector and the adapters change, every base weight stays bitwise what it was
at init, the other expert (frozen adapters) is served from the feature cache, the per-stage
trainable counts equal an independent count, a run killed twice (inside joint, whose resume
rebuilds the per-expert adapters, and inside SFT) resumes to bitwise the same weights, and the
adapter and merged saves give the same outputs.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from moe_vision.data.benchmark import BenchmarkSizes
from moe_vision.experiment.run import run_experiment
from moe_vision.experiment.run_config import DataConfig, RunConfig
from moe_vision.features.cache_keys import expert_cache_key
from moe_vision.model import adapters
from moe_vision.model.adapters import AdapterError, LoraConfig
from moe_vision.model.config import ModelConfig
from moe_vision.model.mllm import MoEVisionModel
from moe_vision.training.checkpoint import TrainerState, latest_checkpoint
from moe_vision.training.options import TrainOptions
from moe_vision.training.recipe_stages import Recipe, RecipeError, Stage
from moe_vision.training.recipes import add_stage_adapters, apply_stage
from moe_vision.training.units import StepEvent

QV = ["q_proj", "v_proj"]
CLIP_LORA = {"targets": ["experts.0.*"], "modules": QV, "r": 4, "alpha": 8}
LLM_LORA = {"targets": ["llm.*"], "modules": QV, "r": 4, "alpha": 8, "dropout": 0.1}
FC1_LORA = {"targets": ["experts.*"], "modules": ["fc1"], "r": 2, "alpha": 4}


def _recipe() -> Recipe:
    fp = ["fusion.*", "projector.*"]
    return Recipe(
        "eagle_lora_tiny",
        [
            Stage("prealign", "align", fp, per_expert=True, max_steps=1, lora=[FC1_LORA]),
            Stage("joint", "align", fp, lora=[CLIP_LORA], max_steps=3),
            Stage("sft", "instruct", ["projector.*"], lora=[LLM_LORA, CLIP_LORA], max_steps=3),
        ],
    )


def _config(tmp_path) -> RunConfig:
    sizes = BenchmarkSizes(align=12, instruct=12, val=2, test=4)
    return RunConfig(
        model=ModelConfig(experts=["clip-tiny", "convnext-tiny"]),
        recipe=_recipe(),
        overrides={"*": {"batch_size": 2, "lr": 5e-3}},
        data=DataConfig(benchmark_sizes=sizes.to_dict(), benchmark_dir=str(tmp_path / "bench")),
        train=TrainOptions(progress_bar=False, log_with=[], checkpoint_every=2, keep_checkpoints=1),
        cache_dir=str(tmp_path / "cache"),
    )


class Killed(RuntimeError):
    pass


def _kill_at(step: int, log: list):
    def hook(event: StepEvent) -> None:
        log.append((event.unit.name, event.optimizer_steps, event.loss))
        if event.global_step == step:
            raise Killed(step)

    return hook


def _adapted(model: torch.nn.Module, prefix: str) -> dict[str, torch.nn.Linear]:
    """The q/v projections under ``prefix`` of a plain model (brute force over names)."""
    return {
        n: m
        for n, m in model.named_modules()
        if n.startswith(prefix) and n.rsplit(".", 1)[-1] in QV and isinstance(m, torch.nn.Linear)
    }


def _batch(model: MoEVisionModel) -> dict:
    from PIL import Image

    images = [Image.new("RGB", (40, 30), c) for c in [(200, 30, 30), (20, 200, 60)]]
    inputs = [
        {k: torch.stack([pre(im)[k] for im in images]) for k in pre(images[0])}
        for pre in model.preprocessors
    ]
    ids = torch.tensor([[1, model.image_token_id, 5, 6], [7, 8, model.image_token_id, 9]])
    return {"input_ids": ids, "images": inputs}


@pytest.mark.timeout(400)
def test_eagle_with_lora_trains_only_adapters_resumes_and_saves_both_forms(tmp_path) -> None:
    cfg = _config(tmp_path)
    ref_log: list = []
    ref = run_experiment(cfg, tmp_path / "ref", resume=False, hooks=[_kill_at(-1, ref_log)])
    units = ["prealign[0]", "prealign[1]", "joint", "sft"]
    assert [u for u, _, _ in ref_log] == units[:2] + ["joint"] * 3 + ["sft"] * 3

    # -- only the adapters and what the stages name changed; base weights bitwise as at init
    from accelerate.utils import set_seed

    set_seed(cfg.seed)
    init = MoEVisionModel.from_config(cfg.model)
    saved = ref_dir = tmp_path / "ref" / "model"
    base = load_file(str(saved / "model.safetensors"))
    tied = {"llm.model.embed_tokens.weight": "llm.lm_head.weight"}  # stored once
    for key, value in init.state_dict().items():
        if key.startswith(("experts.", "llm.")):
            assert torch.equal(base[key if key in base else tied[key]], value), key
    assert any(
        not torch.equal(base[k], v) for k, v in init.state_dict().items() if "projector" in k
    )
    saved_adapters = load_file(str(saved / adapters.ADAPTERS_WEIGHTS))
    clip, llm = _adapted(init, "experts.0."), _adapted(init, "llm.")
    fc1 = {n: m for n, m in init.named_modules() if n.startswith("experts.") and n.endswith("fc1")}
    expected = {f"{n}.lora_{ab}.default.weight" for n in [*clip, *llm, *fc1] for ab in "AB"}
    assert set(saved_adapters) == expected
    block = init.experts[0].feature_block  # CLIP is read there: later blocks never train
    for key in (k for k in expected if ".lora_B." in k and "layers." in k):
        layer = int(key.split("layers.")[1].split(".")[0])
        reached = key.startswith("llm.") or layer <= block
        assert bool(saved_adapters[key].abs().sum() > 0) == reached, key  # B starts at 0
    assert any(saved_adapters[k].abs().sum() > 0 for k in expected if "experts.1." in k)

    # -- trainable parameters per stage, counted independently: r * (in + out) per module
    def lora_count(mods: dict, r: int = 4) -> int:
        return sum(r * (m.in_features + m.out_features) for m in mods.values())

    def numel(prefix: str) -> int:
        return sum(p.numel() for n, p in init.named_parameters() if n.startswith(prefix))

    assert ref["params_trainable/joint"] == numel("fusion.") + numel("projector.") + lora_count(
        clip
    )
    assert ref["params_trainable/sft"] == numel("projector.") + lora_count(clip) + lora_count(llm)
    assert ref["params_adapter"] == lora_count(clip) + lora_count(llm) + lora_count(fc1, r=2)
    assert ref["params_total"] == sum(p.numel() for p in init.parameters()) + ref["params_adapter"]

    # -- an expert whose adapters train is not cached; ConvNeXt (frozen adapters) is
    reports = TrainerState.load(latest_checkpoint(tmp_path / "ref" / "checkpoints")).unit_reports
    cached = {r["unit"]: r["cached_experts"] for r in reports}
    assert cached == {"prealign[0]": [], "prealign[1]": [], "joint": [1], "sft": [1]}

    # -- killed inside joint (its last step is lost) and inside SFT (after a checkpoint)
    log: list = []
    out = tmp_path / "killed"
    with pytest.raises(Killed):
        run_experiment(cfg, out, resume=False, hooks=[_kill_at(5, log)])
    with pytest.raises(Killed):
        run_experiment(cfg, out, resume=True, hooks=[_kill_at(7, log)])
    state = TrainerState.load(latest_checkpoint(out / "checkpoints"))
    assert (state.kind, state.unit_name, state.optimizer_steps) == ("mid", "sft", 2)
    metrics = run_experiment(cfg, out, resume=True, hooks=[_kill_at(-1, log)])
    reference = {(u, s): loss for u, s, loss in ref_log}
    assert [(u, s) for u, s, _ in log].count(("joint", 3)) == 2  # lost, then redone
    for unit, step, loss in log:
        assert loss == reference[(unit, step)], (unit, step)
    for name in ("model.safetensors", adapters.ADAPTERS_WEIGHTS):
        a, b = load_file(str(ref_dir / name)), load_file(str(out / "model" / name))
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), k
    assert metrics["accuracy/overall"] == ref["accuracy/overall"]

    # -- adapters beside the base, or merged: the same outputs
    unmerged = MoEVisionModel.from_pretrained(ref_dir).eval()
    unmerged.save_pretrained(tmp_path / "merged", merge_lora=True)
    assert not (tmp_path / "merged" / adapters.ADAPTERS_CONFIG).exists()
    merged = MoEVisionModel.from_pretrained(tmp_path / "merged").eval()
    assert adapters.lora_layers(merged) == {}
    assert set(adapters.lora_layers(unmerged)) == set(clip) | set(llm) | set(fc1)
    batch = _batch(unmerged)
    with torch.no_grad():
        a, b = unmerged(**batch).logits, merged(**batch).logits
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    merged_w = load_file(str(tmp_path / "merged" / "model.safetensors"))
    q = next(iter(llm)) + ".weight"
    assert not torch.equal(merged_w[q], base[q])  # the update went into the weight


def test_lora_config_yaml_round_trip_and_errors() -> None:
    stage = Stage("sft", "instruct", ["projector.*"], lora={**LLM_LORA, "quantize": "nf4"})
    assert isinstance(stage.lora[0], LoraConfig)  # a single mapping becomes a list
    recipe = Recipe("r", [stage])
    again = Recipe.from_yaml(recipe.to_yaml())
    assert again == recipe and again.stages[0].lora[0].quantize == "nf4"
    assert stage.replace(lora=[]).lora == [] and stage.replace(lora=None).lora == []
    with pytest.raises(RecipeError, match="lora must be a mapping, a list of mappings or null"):
        stage.replace(lora="llm.*")
    with pytest.raises(RecipeError, match=r"lora\[0\]: unknown fields \['rank'\]"):
        Stage("s", "align", ["*"], lora={"targets": ["llm.*"], "modules": QV, "rank": 4})
    with pytest.raises(RecipeError, match="r must be an integer >= 1"):
        Stage("s", "align", ["*"], lora={**LLM_LORA, "r": 0})
    with pytest.raises(RecipeError, match="missing required fields \\['modules'\\]"):
        Stage("s", "align", ["*"], lora={"targets": ["llm.*"]})
    with pytest.raises(RecipeError, match="quantize must be null or one of"):
        Stage("s", "align", ["*"], lora={**LLM_LORA, "quantize": "int3"})


@pytest.fixture(scope="module")
def tiny() -> MoEVisionModel:
    torch.manual_seed(0)
    return MoEVisionModel.from_config(ModelConfig(experts=["clip-tiny", "convnext-tiny"]))


def _fresh(tiny: MoEVisionModel) -> MoEVisionModel:
    import copy

    return copy.deepcopy(tiny)


def test_stage_adapters_train_base_frozen_and_gradients_reach_only_them(tiny) -> None:
    model = _fresh(tiny)
    stage = Stage("s", "instruct", ["llm.*"], lora=[LLM_LORA])
    selected = add_stage_adapters(model, stage, seed=0)
    assert len(next(iter(selected.values()))) == 4
    apply_stage(model, stage)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    base = {n for n in trainable if ".base_layer." in n}
    assert not base  # 'llm.*' names them, the stage's adapters keep them frozen
    assert {n for n in trainable if adapters.is_adapter_key(n)} == {
        f"{n}.lora_{ab}.default.weight" for n in _adapted(tiny, "llm.") for ab in "AB"
    }
    assert "llm.model.layers.0.mlp.up_proj.weight" in trainable  # the rest of the LLM trains
    model.train()
    model(**_batch(model)).logits.sum().backward()
    assert {n for n, p in model.named_parameters() if p.grad is not None} == trainable
    # B = 0 at init: the adapted model computes what the plain one does
    model.eval()
    with torch.no_grad():
        plain = tiny.eval()(**_batch(tiny)).logits
        torch.testing.assert_close(model(**_batch(model)).logits, plain)


def test_same_seed_same_adapters_and_continuation_rules(tiny) -> None:
    a, b = _fresh(tiny), _fresh(tiny)
    stage = Stage("s", "instruct", ["projector.*"], lora=[LLM_LORA])
    before = torch.random.get_rng_state()
    add_stage_adapters(a, stage, seed=3)
    assert torch.equal(torch.random.get_rng_state(), before)  # the run's RNG is untouched
    add_stage_adapters(b, stage, seed=3)
    sa, sb = a.state_dict(), b.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    add_stage_adapters(a, stage, seed=4)  # continuing: the adapters stay as they are
    assert all(torch.equal(a.state_dict()[k], sb[k]) for k in sa)
    with pytest.raises(RecipeError, match="already has an adapter with r=4"):
        add_stage_adapters(a, stage.replace(lora=[{**LLM_LORA, "r": 8}]), seed=0)
    twice = stage.replace(lora=[LLM_LORA, {**LLM_LORA, "targets": ["llm.model.*"]}])
    with pytest.raises(RecipeError, match=r"lora\[1\]: modules .* already selected by lora\[0\]"):
        add_stage_adapters(_fresh(tiny), twice, seed=0)


def test_bad_targets_and_modules_name_what_is_there(tiny) -> None:
    model = _fresh(tiny)
    with pytest.raises(AdapterError, match=r"targets \['vision\.\*'\] match no module; .*'llm'"):
        adapters.select_modules(model, LoraConfig(["vision.*"], QV))
    with pytest.raises(AdapterError, match=r"no module .* ends with one of \['qkv'\].*'fc1'"):
        adapters.select_modules(model, LoraConfig(["experts.1.*"], ["qkv"]))
    with pytest.raises(AdapterError, match="is a LayerNorm; LoRA adapts nn.Linear"):
        adapters.select_modules(model, LoraConfig(["experts.0.*"], ["layer_norm1"]))
    with pytest.raises(AdapterError, match="conv_dw' is a Conv2d with groups=16"):
        adapters.select_modules(model, LoraConfig(["experts.1.*"], ["conv_dw"]))  # depthwise
    conv = adapters.select_modules(model, LoraConfig(["experts.1.*"], ["stem.0"]))
    assert conv == ["experts.1.model.stem.0"]


def test_frozen_adapter_is_part_of_the_expert_cache_key(tiny) -> None:
    model = _fresh(tiny)
    plain = expert_cache_key(model.experts[0])
    stage = Stage("s", "align", ["projector.*"], lora=[CLIP_LORA])
    add_stage_adapters(model, stage, seed=0)
    expert = model.experts[0].requires_grad_(False)
    layers = adapters.lora_layers(expert)
    keyed = expert_cache_key(expert)
    assert keyed != plain  # the wrapped layout (and A) differ, though B = 0
    for layer in layers.values():
        torch.nn.init.normal_(layer.lora_B["default"].weight)
    trained = expert_cache_key(expert)
    assert trained != keyed
    for layer in layers.values():
        layer.scaling["default"] *= 2  # same tensors, another alpha
    assert expert_cache_key(expert) != trained
    assert adapters.adapter_fingerprint(tiny.experts[1]) == ""  # no adapters: keys as before


def test_qlora_refuses_without_cuda(tiny, monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    stage = Stage("sft", "instruct", ["projector.*"], lora={**LLM_LORA, "quantize": "nf4"})
    with pytest.raises(adapters.QLoraUnavailableError) as err:
        add_stage_adapters(_fresh(tiny), stage, seed=0)
    text = str(err.value)
    assert "needs CUDA and bitsandbytes" in text and "no CUDA device" in text
    assert "Use plain LoRA" in text and "stage 'sft' lora[0]" in text


def test_eagle_lora_example_adapts_the_default_experts(tiny) -> None:
    from pathlib import Path

    recipe = Recipe.from_yaml(Path(__file__).resolve().parents[1] / "recipes" / "eagle_lora.yaml")
    model = _fresh(tiny)
    sft = recipe.stages[-1]
    chosen = add_stage_adapters(model, sft, seed=0)
    experts = next(v for k, v in chosen.items() if "lora[1]" in k)
    assert {n.split(".")[1] for n in experts} == {"0", "1"}  # CLIP and ConvNeXt both adapted
    counts = adapters.count_parameters(model)
    assert counts["adapter"] == sum(
        layer.r["default"] * (m.in_features + m.out_features)
        for layer in adapters.lora_layers(model).values()
        for m in [layer.get_base_layer()]
    )


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="QLoRA needs CUDA")
def test_qlora_on_cuda(tiny, tmp_path) -> None:
    pytest.importorskip("bitsandbytes")
    model = _fresh(tiny).cuda()
    modules = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    cfg = {"targets": ["llm.*"], "modules": modules, "r": 4, "alpha": 8, "quantize": "nf4"}
    stage = Stage("sft", "instruct", ["projector.*"], lora=[cfg])
    add_stage_adapters(model, stage, seed=0)
    apply_stage(model, stage)
    quantized = [n for n, p in model.named_parameters() if adapters.is_4bit(p)]
    assert len(quantized) == 2 * len(modules)
    batch = {k: v for k, v in _batch(model).items()}
    batch["input_ids"] = batch["input_ids"].cuda()
    batch["images"] = [{k: v.cuda() for k, v in x.items()} for x in batch["images"]]
    with torch.autocast("cuda", dtype=torch.bfloat16):
        logits = model(**batch).logits
    logits.float().sum().backward()
    grads = {n for n, p in model.named_parameters() if p.grad is not None}
    assert grads and all(adapters.is_adapter_key(n) or n.startswith("projector.") for n in grads)
    model.eval().save_pretrained(tmp_path / "q")
    again = MoEVisionModel.from_pretrained(tmp_path / "q", device="cuda").eval()
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        a, b = model(**batch).logits.float(), again(**batch).logits.float()
    torch.testing.assert_close(a, b, rtol=0.05, atol=0.05)  # 4-bit vs dequantised base, bf16
    info = json.loads((tmp_path / "q" / adapters.ADAPTERS_CONFIG).read_text())
    assert all(m["quantized"] for m in info["modules"].values())


def test_4bit_base_weights_adapters_and_dequantised_save(tiny, tmp_path) -> None:
    """The QLoRA code path (4-bit base + adapters, dequantised save) on bitsandbytes' CPU
    backend; the public entry refuses without CUDA (above), this calls its parts directly."""
    pytest.importorskip("bitsandbytes")
    model = _fresh(tiny).eval()
    names = list(_adapted(model, "llm."))
    try:
        adapters.quantize_4bit(model, names, "nf4", torch.device("cpu"))
    except (RuntimeError, NotImplementedError) as err:  # a bitsandbytes without a CPU backend
        pytest.skip(f"bitsandbytes cannot quantise on CPU here: {err}")
    adapters._inject(model, names, r=4, alpha=8, dropout=0.0, seed=0)
    stage = Stage("sft", "instruct", ["llm.*"], lora=[{**LLM_LORA, "dropout": 0.0}])
    apply_stage(model, stage)  # 'llm.*' names the 4-bit weights: they stay frozen
    packed = [p for p in model.parameters() if adapters.is_4bit(p)]
    assert len(packed) == len(names) and not any(p.requires_grad for p in packed)
    total = adapters.count_parameters(tiny)["total"]
    assert adapters.count_parameters(model)["total"] == total + sum(
        4 * (m.in_features + m.out_features) for m in _adapted(tiny, "llm.").values()
    )
    for layer in adapters.lora_layers(model).values():
        torch.nn.init.normal_(layer.lora_B["default"].weight, std=0.02)
    model.save_pretrained(tmp_path / "q")
    again = MoEVisionModel.from_pretrained(tmp_path / "q").eval()
    assert not any(adapters.is_4bit(p) for p in again.parameters())  # dequantised base
    with torch.no_grad():
        a, b = model(**_batch(model)).logits, again(**_batch(again)).logits
        plain = tiny(**_batch(tiny)).logits
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(a, plain, atol=1e-3)  # 4-bit weights and adapters do act


def test_bench_counts_optimizer_state_of_exactly_the_trainable_parameters() -> None:
    from moe_vision.bench import lora as bench_lora

    arch = {
        "vocab_size": 600,
        "hidden_size": 64,
        "intermediate_size": 96,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "max_position_embeddings": 512,
    }
    cfg = {"experts": ["clip-tiny"], "fusion": "channel_concat"}
    found = {}
    for scenario, fields in bench_lora.SCENARIOS.items():
        model = bench_lora.meta_model(cfg, arch)
        assert next(model.parameters()).is_meta
        found[scenario] = bench_lora.optimizer_memory(model, Stage("sft", "instruct", **fields))
    plain = bench_lora.meta_model(cfg, arch)
    total = sum(p.numel() for p in plain.parameters())
    proj = sum(p.numel() for p in plain.projector.parameters())
    linear = {n: m for n, m in plain.named_modules() if isinstance(m, torch.nn.Linear)}

    def lora_params(prefix: str, entry: dict) -> int:
        return sum(
            entry["r"] * (m.in_features + m.out_features)
            for n, m in linear.items()
            if n.startswith(prefix) and n.rsplit(".", 1)[-1] in entry["modules"]
        )

    llm = lora_params("llm.", bench_lora.LLM_LORA)
    experts = lora_params("experts.", bench_lora.EXPERT_LORA)
    expected = {"full": total, "lora_llm": proj + llm, "lora_llm_experts": proj + llm + experts}
    for scenario, n in expected.items():
        m = found[scenario]
        assert m["params_trainable"] == n, scenario
        assert m["grad_bytes"] == 4 * n  # fp32 gradients
        tensors = m["adamw_state_bytes"] - 8 * n  # exp_avg + exp_avg_sq, fp32
        assert 0 < tensors <= 4 * 1000  # plus one fp32 'step' per parameter tensor


@pytest.mark.parametrize("mode", ["eval", "train", "mixed"])
def test_adding_an_entry_keeps_every_modules_train_eval_mode(tiny, mode) -> None:
    """peft 0.22's ``inject_adapter_in_model`` puts every ``"default"`` adapter of the model in
    train mode; a second entry must not switch the first entry's ``lora_dropout`` on in an eval
    model (nor switch anything off in a training one, nor undo a frozen expert's eval)."""
    model = _fresh(tiny).train(mode != "eval")
    if mode == "mixed":
        model.experts[1].eval()  # a frozen expert stays in eval inside a training model
    fc2 = {"targets": ["experts.1.*"], "modules": ["mlp.fc2"], "r": 2, "alpha": 4, "dropout": 0.2}
    adapters.add_adapters(model, LoraConfig(**LLM_LORA), seed=0)
    before = {n: m.training for n, m in model.named_modules()}
    assert any(".lora_dropout.default" in n for n in before)
    add_stage_adapters(model, Stage("s", "instruct", ["*"], lora=[fc2, CLIP_LORA]), seed=1)
    after = {n: m.training for n, m in model.named_modules()}
    changed = sorted(n for n in before if after[n] != before[n])
    assert not changed, f"modes flipped by the second injection: {changed[:5]}"
    for name, layer in adapters.lora_layers(model).items():  # new layers follow the wrapped module
        want = layer.get_base_layer().training
        assert all(m.training == want for m in layer.modules()), name
    if mode == "mixed":
        assert not any(m.training for m in model.experts[1].modules())
        assert all(m.training for m in model.llm.modules())
    else:
        assert all(t == (mode == "train") for t in after.values())


def test_merged_and_adapter_saves_agree_for_linear_and_conv_adapters(tiny, tmp_path) -> None:
    model = _fresh(tiny).eval()
    stem = {"targets": ["experts.1.*"], "modules": ["stem.0", "mlp.fc2"], "r": 2, "alpha": 6}
    add_stage_adapters(model, Stage("s", "instruct", ["*"], lora=[LLM_LORA, stem]), seed=1)
    for layer in adapters.lora_layers(model).values():
        torch.nn.init.normal_(layer.lora_B["default"].weight, std=0.05)
    model.save_pretrained(tmp_path / "adapters")
    model.save_pretrained(tmp_path / "merged", merge_lora=True)
    a = MoEVisionModel.from_pretrained(tmp_path / "adapters").eval()
    b = MoEVisionModel.from_pretrained(tmp_path / "merged").eval()
    assert len(adapters.lora_layers(a)) == len(adapters.lora_layers(model))
    assert not adapters.lora_layers(b)
    conv = "experts.1.model.stem.0"
    w = model.get_submodule(conv)
    delta = 3.0 * torch.einsum(  # alpha / r * B @ A for a conv: (out, r) x (r, in, k, k)
        "or,rikl->oikl",
        w.lora_B["default"].weight.flatten(1),
        w.lora_A["default"].weight,
    )
    merged = load_file(str(tmp_path / "merged" / "model.safetensors"))
    torch.testing.assert_close(merged[f"{conv}.weight"], w.base_layer.weight + delta)
    with torch.no_grad():
        ref, la, lb = (m(**_batch(m)).logits for m in (model, a, b))
    torch.testing.assert_close(la, ref, rtol=0, atol=0)  # adapters beside the base: exact
    torch.testing.assert_close(lb, ref, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(ref, tiny(**_batch(tiny)).logits, atol=1e-3)


def test_merging_a_tied_weight_is_refused(tiny, tmp_path) -> None:
    model = _fresh(tiny)  # the tiny LLM ties lm_head to the input embeddings
    head = {"targets": ["llm.*"], "modules": ["lm_head"], "r": 2, "alpha": 4}
    add_stage_adapters(model, Stage("s", "instruct", ["*"], lora=[head]), seed=0)
    with pytest.raises(ValueError, match=r"'llm.lm_head'.* tied to \['llm.model.embed_tokens"):
        model.save_pretrained(tmp_path / "m", merge_lora=True)
    model.save_pretrained(tmp_path / "a")  # beside the base it is fine
    assert adapters.has_saved_adapters(tmp_path / "a")
