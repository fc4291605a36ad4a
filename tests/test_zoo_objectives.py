"""Each mini-zoo objective at reduced size (the family's tiny preset, a few scenes): the loss is
finite and falls on a repeated batch, gradients reach the expert and the objective's heads, and
nothing reaches frozen teachers."""

from __future__ import annotations

import json

import pytest
import torch

from moe_vision.zoo import OBJECTIVES, PretrainConfig, build_objective
from moe_vision.zoo.core import Objective
from moe_vision.zoo.data import make_scenes

CASES = {  # objective -> (tiny preset of its family, scene kinds, options)
    "clip": ("clip-tiny", ("object", "text"), {}),
    "siglip": ("siglip-tiny", ("object", "text"), {}),
    "convnext-clip": ("convnext-tiny", ("objects", "marker"), {"region_weight": 1.0}),  # shipped
    "pix2struct": ("pix2struct-tiny", ("text",), {"glyph_weight": 1.0}),  # shipped
    "sam": ("sam-tiny", ("objects", "marker"), {"prompts": 2}),
    "eva02-mim": (
        "eva02-tiny",
        ("object", "pair"),
        {"teacher": "clip-tiny", "teacher_pretrained": False},  # a random teacher: no file
    ),
    "dino": ("dinov2-tiny", ("object", "pair"), {"local_views": 2}),
}


ELSEWHERE = {"distill": "tests/test_distill.py"}
"""Objectives whose learning is tested in a file of their own (they need a student preset)."""


def test_every_objective_has_a_case() -> None:
    import moe_vision.distill  # noqa: F401  (registers 'distill', whatever ran before)

    assert set(CASES) | set(ELSEWHERE) == set(OBJECTIVES)


def _teacher(model: Objective) -> list[torch.nn.Module]:
    frozen = [m for m in getattr(model, "teacher", [])]
    for name in ("teacher_backbone", "teacher_head"):
        if hasattr(model, name):
            frozen.append(getattr(model, name))
    return frozen


@pytest.mark.parametrize("objective", sorted(CASES))
def test_objective_learns_and_sends_gradients_to_the_expert(objective: str) -> None:
    preset, kinds, options = CASES[objective]
    config = PretrainConfig(steps=6, batch_size=4, lr=3e-3, warmup=1, kinds=kinds, options=options)
    model = build_objective(preset, config, objective)
    model.train()
    scenes = make_scenes(0, 0, config.batch_size, kinds)
    opt = torch.optim.AdamW(model.trainable(), lr=config.lr, weight_decay=0.0)
    losses = []
    for step in range(config.steps):
        loss = model.loss(scenes, 0)  # the same batch (and masks/prompts) every step
        assert loss.dim() == 0 and torch.isfinite(loss)
        opt.zero_grad()
        loss.backward()
        if step == 0:
            grads = {n: p.grad for n, p in model.expert.named_parameters()}
            reached = [n for n, g in grads.items() if g is not None and g.abs().sum() > 0]
            # the patch/stem embedding and the expert's parameters at large get gradient
            assert len(reached) > 0.5 * len(grads), (objective, len(reached), len(grads))
            assert any("embed" in n or "stem" in n for n in reached), objective
            heads = [p for n, p in model.named_parameters() if not n.startswith("expert.")]
            trained = [p for p in heads if p.requires_grad]
            assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in trained)
            for frozen in _teacher(model):
                assert all(p.grad is None for p in frozen.parameters())
        opt.step()
        model.after_step(step)
        losses.append(float(loss))
    assert min(losses[-2:]) < losses[0], (objective, losses)


def test_pretraining_is_deterministic_and_the_cli_writes_loadable_weights(tmp_path) -> None:
    import experts
    from moe_vision.cli import main
    from moe_vision.zoo import pretrain

    config = PretrainConfig(steps=2, batch_size=2, warmup=1, kinds=("object",))
    a = pretrain("clip-mini", config, progress=False).expert.state_dict()
    b = pretrain("clip-mini", config, progress=False).expert.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    argv = ["pretrain", "clip-mini", "--steps", "1", "--batch-size", "2", "--out", str(tmp_path)]
    assert main([*argv, "--no-probe", "--quiet", "--threads", "1"]) == 0
    card = json.loads((tmp_path / "clip-mini.json").read_text())
    assert card["steps"] == 1 and card["objective"]["name"] == "clip"
    loaded = experts.create_expert("clip-mini", checkpoint=str(tmp_path / "clip-mini.safetensors"))
    from moe_vision.zoo.core import fingerprint

    assert fingerprint(loaded) == pytest.approx(card["fingerprint"], rel=1e-4)
    assert main(["pretrain", "no-such-mini", "--out", str(tmp_path)]) == 2


def test_refreshing_one_category_keeps_the_cards_other_scores(tmp_path) -> None:
    """``pretrain --probe-only --categories detail``: only ``detail`` is re-probed."""
    from moe_vision.analysis.probe import ProbeConfig
    from moe_vision.zoo import pretrain, save_pretrained
    from moe_vision.zoo.scores import refresh_card

    config = PretrainConfig(steps=1, batch_size=2, warmup=1, kinds=("object",))
    weights, card_path = save_pretrained(pretrain("clip-mini", config, progress=False), tmp_path)
    card = json.loads(card_path.read_text())
    kept = {"accuracy": 0.5, "lo": 0.4, "hi": 0.6, "n_test": 10}
    card["probe"] = {"pretrained": {"color": kept}, "random": {"color": kept}, "config": {}}
    card_path.write_text(json.dumps(card))
    sizes = {"align": 0, "instruct": 24, "val": 0, "test": 12}
    probe_config = ProbeConfig(
        categories=["detail"], benchmark_sizes=sizes, benchmark_dir=str(tmp_path / "bench")
    )
    refresh_card("clip-mini", tmp_path, probe_config)
    probe = json.loads(card_path.read_text())["probe"]
    for weights_kind in ("pretrained", "random"):
        assert probe[weights_kind]["color"] == kept
        assert probe[weights_kind]["detail"]["n_test"] == 2
