"""Bench section ``lora``: optimiser memory of a real-size SFT stage, full weights vs LoRA.

The real-size configuration is the bench's ``real_model`` experts and fusion (default CLIP
ViT-L/336 + ConvNeXt-L/320, channel concatenation) in front of a 7B LLM with Vicuna-7B v1.5's
architecture (LLaMA, 32 layers, width 4096, MLP 11008, vocabulary 32000: the LLM of LLaVA-1.5
and Eagle-X5-7B). It is built on the ``meta`` device (shapes, no weights), so it fits any
machine. For each way of training the SFT stage, the stage's adapters are added
(:func:`moe_vision.training.recipes.add_stage_adapters`), ``apply_stage`` sets what trains, and
``torch.optim.AdamW`` takes one step on meta gradients: the rows report the trainable
parameters, the bytes of AdamW's own state after that step (``exp_avg``, ``exp_avg_sq``,
``step``) and of the fp32 gradients, counted from the tensors, not from a formula:

* ``full``: everything trains (Eagle's SFT);
* ``lora_llm``: fusion + projector train, rank-64 LoRA on every projection of the LLM;
* ``lora_llm_experts``: as ``lora_llm`` plus rank-16 LoRA on the experts' attention and MLP
  projections (``recipes/eagle_lora.yaml``'s SFT stage).
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any

import torch

from moe_vision.bench.harness import BenchConfig, bench_row, register_section

logger = logging.getLogger(__name__)

LLM_7B: dict[str, Any] = {
    "vocab_size": 32000,
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "max_position_embeddings": 4096,
}
"""Vicuna-7B v1.5's architecture (``LlamaConfig`` fields)."""

LLM_LORA: dict[str, Any] = {
    "targets": ["llm.*"],
    "modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "r": 64,
    "alpha": 128,
    "dropout": 0.05,
}
EXPERT_LORA: dict[str, Any] = {
    "targets": ["experts.*"],
    "modules": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
    "r": 16,
    "alpha": 32,
    "dropout": 0.05,
}
SCENARIOS: dict[str, dict[str, Any]] = {
    "full": {"train": ["*"], "lora": []},
    "lora_llm": {"train": ["fusion.*", "projector.*"], "lora": [LLM_LORA]},
    "lora_llm_experts": {"train": ["fusion.*", "projector.*"], "lora": [LLM_LORA, EXPERT_LORA]},
}
"""SFT-stage variants: ``Stage`` fields (the stage's name, data and LR do not matter here)."""


def meta_model(model_cfg: dict[str, Any], llm_arch: dict[str, Any] | None = None) -> Any:
    """The mixture of ``model_cfg`` with a LLaMA LLM of ``llm_arch`` (default
    :data:`LLM_7B`), on the ``meta`` device (the tiny presets' tokenizer stands in)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from moe_vision.model.config import ModelConfig
    from moe_vision.model.llm import build_tokenizer
    from moe_vision.model.mllm import MoEVisionModel

    tokenizer = build_tokenizer()
    cfg = {k: v for k, v in model_cfg.items() if k not in ("llm", "llm_options")}
    with torch.device("meta"):
        llm = AutoModelForCausalLM.from_config(LlamaConfig(**(llm_arch or LLM_7B)))
        return MoEVisionModel(ModelConfig(**cfg, llm="llama-7b-arch"), llm=llm, tokenizer=tokenizer)


def optimizer_memory(model: torch.nn.Module, stage: Any) -> dict[str, float]:
    """Add ``stage``'s adapters, apply it, take one AdamW step on meta gradients; returns
    ``params_total``, ``params_trainable``, ``adamw_state_bytes`` and ``grad_bytes``."""
    from moe_vision.training.recipes import add_stage_adapters, apply_stage, param_groups

    with torch.device("meta"):  # peft builds the adapters on the default device first
        add_stage_adapters(model, stage, seed=0)
    apply_stage(model, stage)
    groups = param_groups(model, stage)
    optimizer = torch.optim.AdamW([{k: v for k, v in g.items() if k != "names"} for g in groups])
    trainable = [p for g in groups for p in g["params"]]
    for p in trainable:
        p.grad = torch.empty_like(p)
    optimizer.step()
    state = sum(
        t.numel() * t.element_size()
        for s in optimizer.state.values()
        for t in s.values()
        if isinstance(t, torch.Tensor)
    )
    return {
        "params_total": float(sum(p.numel() for p in model.parameters())),
        "params_trainable": float(sum(p.numel() for p in trainable)),
        "adamw_state_bytes": float(state),
        "grad_bytes": float(sum(p.grad.numel() * p.grad.element_size() for p in trainable)),
    }


@register_section("lora")
def bench_lora(cfg: BenchConfig, device: torch.device, work: Path) -> list[dict]:
    """Optimiser state and gradients of the real-size SFT stage per :data:`SCENARIOS`."""
    from moe_vision.training.recipe_stages import Stage

    if cfg.real_model is None:
        logger.info("bench lora: no real-size configuration; skipped")
        return []
    name = f"{'+'.join(cfg.real_model['experts'])} + LLaMA-7B arch (meta)"
    base, found = meta_model(cfg.real_model), {}
    for scenario, fields in SCENARIOS.items():
        stage = Stage.from_dict({"name": "sft", "data": "instruct", **fields})
        found[scenario] = optimizer_memory(copy.deepcopy(base), stage)  # meta: no data copied
    full = found["full"]["adamw_state_bytes"]
    rows = []
    for scenario, m in found.items():
        note = (
            f"SFT stage '{scenario}', {m['params_total'] / 1e9:.2f}B parameters; counted on the "
            "meta device from AdamW's state after one step and the fp32 gradients"
        )
        config = f"{name}, {scenario}"
        rows += [
            bench_row(
                "lora", config, "params_trainable", m["params_trainable"], "params", device, note
            ),
            bench_row(
                "lora",
                config,
                "adamw_state_gib",
                m["adamw_state_bytes"] / 2**30,
                "GiB",
                device,
                note,
            ),
            bench_row("lora", config, "grads_gib", m["grad_bytes"] / 2**30, "GiB", device, note),
            bench_row(
                "lora",
                config,
                "adamw_state_vs_full",
                m["adamw_state_bytes"] / full,
                "x",
                device,
                note,
            ),
        ]
    return rows
