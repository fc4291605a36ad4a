"""Recipes as data: presets, YAML round-trip, validation, pattern matching and param groups."""

from __future__ import annotations

import logging

import pytest
import yaml
from torch import nn

from moe_vision.training.recipe_presets import get_recipe, list_recipes
from moe_vision.training.recipe_stages import Recipe, RecipeError, Stage
from moe_vision.training.recipes import apply_stage, param_groups


class _Toy(nn.Module):
    """Same top-level layout as MoEVisionModel: experts.<i>, fusion, projector, llm."""

    def __init__(self) -> None:
        super().__init__()
        self.experts = nn.ModuleList([nn.Linear(3, 4), nn.Conv2d(3, 4, 1)])
        self.fusion = nn.Sequential(nn.LayerNorm(4), nn.Linear(4, 4))
        self.projector = nn.Linear(4, 5)
        self.llm = nn.Sequential(nn.Embedding(7, 5), nn.Linear(5, 7))
        self.fusion_buffers_only = nn.Identity()


def test_presets_follow_the_papers() -> None:
    assert {"eagle", "cambrian", "llava"} <= set(list_recipes())
    eagle = get_recipe("eagle")
    assert [s.name for s in eagle.stages] == ["prealign", "joint", "sft"]
    assert eagle.stages[0].per_expert and not eagle.stages[1].per_expert
    assert not any(p.startswith("llm") for p in eagle.stages[0].train + eagle.stages[1].train)
    assert eagle.stages[2].train == ["*"]
    cambrian = get_recipe("cambrian")
    assert cambrian.stages[0].train == ["fusion.*", "projector.*"]
    assert cambrian.stages[0].lr_scale == {"fusion.*": 0.1}
    assert "llm.*" in cambrian.stages[1].train
    llava = get_recipe("llava")
    assert llava.stages[0].train == ["projector.*"]
    assert sorted(llava.stages[1].train) == ["llm.*", "projector.*"]


@pytest.mark.parametrize("name", ["eagle", "cambrian", "llava"])
def test_yaml_round_trip(name: str, tmp_path) -> None:
    recipe = get_recipe(name)
    path = tmp_path / f"{name}.yaml"
    recipe.to_yaml(path)
    again = Recipe.from_yaml(path)
    assert again == recipe
    assert get_recipe(path) == recipe  # a .yaml path works wherever a preset name does


def test_user_yaml_and_overrides() -> None:
    text = """
name: mine
stages:
  - name: warmup
    data: align
    train: [projector]
    lr: 0.01
    epochs: 2
  - name: tune
    data: /data/tune.json
    train: ["projector.*", "llm.*"]
    lr_scale: {"llm.*": 0.5}
    grad_accum: 4
"""
    recipe = Recipe.from_yaml(text)
    assert recipe.stages[0].epochs == 2 and recipe.stages[1].grad_accum == 4
    changed = recipe.with_overrides({"*": {"batch_size": 3}, "tune": {"lr": 0.5}})
    assert [s.batch_size for s in changed.stages] == [3, 3]
    assert changed.stages[1].lr == 0.5 and changed.stages[0].lr == 0.01
    assert recipe.stages[0].batch_size == 8  # the original is untouched
    with pytest.raises(RecipeError, match=r"stages \['nope'\].*\['warmup', 'tune'\]"):
        recipe.with_overrides({"nope": {"lr": 1.0}})


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"epochs": 0}, "epochs must be an integer >= 1"),
        ({"batch_size": 2.5}, "batch_size must be an integer"),
        ({"lr": -1.0}, "lr must be a positive number"),
        ({"train": []}, "train must be a non-empty list"),
        ({"scheduler": "exotic"}, "unknown scheduler 'exotic'"),
        ({"warmup_ratio": 1.5}, "warmup_ratio"),
        ({"learning_rate": 1.0}, r"unknown fields \['learning_rate'\]"),
    ],
)
def test_bad_stage_fields_are_named(changes: dict, match: str) -> None:
    base = {"name": "s", "data": "align", "train": ["projector.*"]}
    with pytest.raises(RecipeError, match=match):
        Stage.from_dict({**base, **changes})


def test_bad_recipe_yaml() -> None:
    with pytest.raises(RecipeError, match="invalid YAML"):
        Recipe.from_yaml("stages: [unclosed")
    with pytest.raises(RecipeError, match="unique"):
        Recipe.from_dict({"name": "r", "stages": [{"name": "a", "data": "x", "train": ["*"]}] * 2})
    with pytest.raises(KeyError, match="unknown recipe 'nope'.*eagle"):
        get_recipe("nope")


def test_apply_stage_sets_exactly_the_named_parameters(caplog) -> None:
    model = _Toy()
    stage = Stage("s", "align", ["experts.1.*", "projector"], lr=1.0, lr_scale={"experts.*": 0.1})
    with caplog.at_level(logging.INFO, logger="moe_vision.training.recipes"):
        groups = apply_stage(model, stage)
    expected = {
        n for n, _ in model.named_parameters() if n.startswith(("experts.1.", "projector."))
    }
    assert {n for n, p in model.named_parameters() if p.requires_grad} == expected
    assert sorted(groups["train"]) == ["experts.1", "projector"]
    assert sorted(groups["frozen"]) == ["experts.0", "fusion", "llm"]
    text = caplog.text
    assert "trains: experts.1" in text and "frozen:" in text and "llm" in text
    pg = param_groups(model, stage)
    lrs = {n: g["lr"] for g in pg for n in g["names"]}
    assert lrs["experts.1.weight"] == pytest.approx(0.1)
    assert lrs["projector.weight"] == pytest.approx(1.0)
    assert set(lrs) == expected
    # biases/1-D parameters never decay
    assert all(g["weight_decay"] == 0.0 for g in pg if any(n.endswith("bias") for n in g["names"]))


def test_pattern_naming_no_module_lists_top_level_modules() -> None:
    model = _Toy()
    stage = Stage("s", "align", ["vision_tower.*"])
    with pytest.raises(RecipeError, match=r"'vision_tower\.\*'.*\['experts', 'fusion', .*'llm'"):
        apply_stage(model, stage)
    with pytest.raises(RecipeError, match="lr_scale"):
        apply_stage(model, Stage("s", "align", ["*"], lr_scale={"adapter.*": 0.1}))


def test_parameter_free_module_is_a_warning_not_an_error(caplog) -> None:
    model = _Toy()
    with caplog.at_level(logging.WARNING):
        apply_stage(model, Stage("s", "align", ["projector.*", "fusion_buffers_only"]))
    assert "without parameters" in caplog.text
    only_empty = Stage("s", "align", ["fusion_buffers_only"])
    apply_stage(model, only_empty)
    assert not any(p.requires_grad for p in model.parameters())
    with pytest.raises(RecipeError, match="no trainable parameters"):
        param_groups(model, only_empty)


def test_example_yaml_files_load() -> None:
    from pathlib import Path

    from moe_vision.experiment.run_config import RunConfig

    folder = Path(__file__).resolve().parents[1] / "recipes"
    files = sorted(folder.glob("*.yaml"))
    assert {"eagle.yaml", "cambrian.yaml", "llava.yaml"} <= {f.name for f in files}
    for f in files:
        if "teachers" in (yaml.safe_load(f.read_text()) or {}):
            continue  # a distillation recipe (moe-vision distill): tests/test_distill.py
        if f.name.startswith("run_"):
            assert RunConfig.from_yaml(f).resolved_recipe().stages, f
        else:
            assert Recipe.from_yaml(f).stages, f


def test_presets_ship_as_package_data() -> None:
    """Each preset's one copy is its YAML in the package (pyproject's package-data names it);
    recipes/<name>.yaml is that file."""
    from pathlib import Path

    import tomllib

    from moe_vision.training.recipe_presets import CONFIG_DIR

    repo = Path(__file__).resolve().parents[1]
    package = Path(__import__("moe_vision").__file__).parent.resolve()
    patterns = tomllib.loads((repo / "pyproject.toml").read_text())["tool"]["setuptools"][
        "package-data"
    ]["moe_vision"]
    shipped = sorted(CONFIG_DIR.glob("*.yaml"))
    assert {p.stem for p in shipped} == set(list_recipes()) >= {"eagle", "cambrian", "llava"}
    for path in shipped:
        assert any(path.resolve().relative_to(package).match(p) for p in patterns), patterns
        assert (repo / "recipes" / path.name).resolve() == path.resolve()
        assert get_recipe(path.stem) == Recipe.from_yaml(path)
