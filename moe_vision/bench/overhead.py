"""Bench section ``overhead``: the platform's cost over the same computation written by hand.

The mixture's forward + backward (:class:`~moe_vision.model.mllm.MoEVisionModel`) against the
same computation on the same modules: each expert's wrapped library module called directly
(transformers ``model(**inputs).last_hidden_state``, timm ``forward_features``), the fusion's
``forward``, the projector, and the LLM on hand-spliced ``inputs_embeds``. Ratio = mixture time
/ direct time (1.0 = no overhead). Where an expert's library output cannot be read as its map
(other readout layer, ragged grid), the expert module itself stands in and the row says so.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from moe_vision.bench.batches import benchmark_batch, to_device
from moe_vision.bench.harness import BenchConfig, bench_row, config_name, register_section
from moe_vision.bench.measure import median_time


def library_map(expert: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor | None:
    """The expert's map ``(B, C, H, W)`` from its wrapped library module called directly.

    transformers models: ``model(**inputs)``, the expert's readout block from
    ``hidden_states`` (else ``last_hidden_state``); timm/open_clip trunks:
    ``model.forward_features(pixels)``; token outputs ``(B, P + H*W, C)`` drop the ``P``
    prefix tokens. ``None`` when the expert wraps no such module or the output is not a grid
    of the spec's size.
    """
    from transformers import PreTrainedModel

    module = getattr(expert, "model", None)
    if isinstance(module, PreTrainedModel):
        # The expert may read an earlier block (LLaVA reads CLIP's penultimate one): take that
        # block's output from the library's own hidden_states (the library runs every block).
        block = getattr(expert, "feature_block", None)
        out = module(**inputs, output_hidden_states=block is not None)
        hidden = out.last_hidden_state if block is None else out.hidden_states[block + 1]
    elif module is not None and callable(getattr(module, "forward_features", None)):
        if len(inputs) != 1:
            return None
        hidden = module.forward_features(next(iter(inputs.values())))
    else:
        return None
    h, w = expert.spec.grid
    c = expert.spec.channels
    if hidden.dim() == 4:
        return hidden if tuple(hidden.shape[1:]) == (c, h, w) else None
    if hidden.dim() != 3 or hidden.shape[1] < h * w or hidden.shape[2] != c:
        return None
    return hidden[:, hidden.shape[1] - h * w :].transpose(1, 2).reshape(hidden.shape[0], c, h, w)


def direct_forward(model: Any, batch: dict) -> tuple[torch.Tensor, list[str]]:
    """The mixture's loss computed by hand on the same modules; returns ``(loss, paths)``
    where ``paths[i]`` says how expert ``i`` ran (``"library"`` or ``"expert module"``)."""
    from experts.spec import FeatureMap

    maps, paths = [], []
    for expert, inputs in zip(model.experts, batch["images"]):
        features = library_map(expert, inputs)
        if features is None:
            maps.append(expert(inputs))
            paths.append("expert module")
        else:
            maps.append(FeatureMap(features, expert.spec.patch_size, expert.spec.name))
            paths.append("library")
    visual = model.projector(model.fusion(maps))  # (B, N, D)
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    text = model.llm.get_input_embeddings()(ids)  # (B, T, D)
    n = visual.shape[1]
    rows_e, rows_m, rows_l = [], [], []
    for b in range(ids.shape[0]):
        p = int((ids[b] == model.image_token_id).nonzero()[0, 0])
        rows_e.append(torch.cat([text[b, :p], visual[b], text[b, p + 1 :]]))
        rows_m.append(torch.cat([mask[b, :p], mask.new_ones(n), mask[b, p + 1 :]]))
        rows_l.append(torch.cat([labels[b, :p], labels.new_full((n,), -100), labels[b, p + 1 :]]))
    out = model.llm(
        inputs_embeds=torch.stack(rows_e),
        attention_mask=torch.stack(rows_m),
        labels=torch.stack(rows_l),
    )
    return out.loss, paths


def mixture_loss(model: Any, batch: dict) -> torch.Tensor:
    return model(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        labels=batch["labels"],
        images=batch["images"],
    ).loss


@register_section("overhead")
def bench_overhead(cfg: BenchConfig, device: torch.device, data_root: Path) -> list[dict]:
    """Section 1: mixture vs direct forward + backward (see the module docstring)."""
    from moe_vision.model.mllm import MoEVisionModel

    torch.manual_seed(cfg.seed)
    model = MoEVisionModel.from_config(cfg.model).to(device)
    batch = to_device(benchmark_batch(model, cfg.batch_size, data_root, cfg.seed), device)
    model.eval()  # no dropout: both paths must compute the same loss
    with torch.no_grad():
        mixture, (direct, paths) = mixture_loss(model, batch), direct_forward(model, batch)
    same = bool(torch.allclose(mixture, direct, rtol=1e-4, atol=1e-5))

    def step(loss_fn: Callable[[], torch.Tensor]) -> Callable[[], None]:
        def run() -> None:
            model.zero_grad(set_to_none=True)
            loss_fn().backward()

        return run

    t_mix = step(lambda: mixture_loss(model, batch))
    t_dir = step(lambda: direct_forward(model, batch)[0])
    for _ in range(cfg.warmup):
        t_mix(), t_dir()
    mix_times, dir_times = [], []
    for _ in range(cfg.repeats):  # interleaved, so drifting machine load hits both alike
        mix_times.append(median_time(t_mix, device, 1, 0))
        dir_times.append(median_time(t_dir, device, 1, 0))
    mix, dirc = statistics.median(mix_times), statistics.median(dir_times)
    name = config_name(cfg.model, cfg.batch_size)
    note = f"experts via {paths}; losses equal: {same}"
    return [
        bench_row("overhead", name, "mixture_fwd_bwd_ms", 1e3 * mix, "ms", device, note),
        bench_row("overhead", name, "direct_fwd_bwd_ms", 1e3 * dirc, "ms", device, note),
        bench_row("overhead", name, "overhead_ratio", mix / dirc, "x", device, note),
    ]
