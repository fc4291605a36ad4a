"""The shipped mini zoo: every mini preset loads its packaged weights offline through its
family's checkpoint path, gives the outputs its card records, differs from its random-init
twin, and ``experts`` stays free of ``fusion`` and ``moe_vision``."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

import experts
from experts.families.mini import MINI_DIR, mini_card, mini_checkpoint

MINIS = experts.list_experts("*-mini")
SHIPPED = [n for n in MINIS if mini_checkpoint(n).is_file()]
CARD_FIELDS = ("objective", "data", "steps", "wall_time_s", "final_loss", "probe", "fingerprint")


def test_every_family_has_a_mini_preset_with_its_own_class() -> None:
    families = {experts.get_spec(n).family for n in MINIS}
    assert families == {"clip", "siglip", "convnext", "eva02", "pix2struct", "sam", "dinov2"}
    for name in MINIS:
        spec = experts.get_spec(name)
        tiny = experts.get_spec(f"{spec.family}-tiny")
        assert type(experts.create_expert(name, device="meta")) is type(
            experts.create_expert(tiny.name, device="meta")
        )
        assert spec.checkpoint == str(mini_checkpoint(name))


def test_high_resolution_minis_see_more_pixels_than_clip() -> None:
    def pixels(name: str) -> int:
        spec = experts.get_spec(name)
        if spec.variable_resolution:
            return spec.max_patches * spec.patch_size**2
        return spec.input_size[0] * spec.input_size[1]

    for name in ("convnext-mini", "sam-mini", "pix2struct-mini"):
        assert pixels(name) > pixels("clip-mini"), name


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_weights_load_and_match_their_card(name: str) -> None:
    from moe_vision.zoo.core import fingerprint

    card = mini_card(name)
    assert all(k in card for k in CARD_FIELDS), sorted(card)
    assert card["name"] == name
    expert = experts.create_expert(name, pretrained=True)
    got = fingerprint(expert)
    for key, want in card["fingerprint"].items():
        assert got[key] == pytest.approx(want, rel=1e-3, abs=1e-4), (name, key)
    torch.manual_seed(0)
    twin = experts.create_expert(name)
    assert fingerprint(twin) != pytest.approx(got, rel=1e-3)
    assert mini_checkpoint(name).stat().st_size < 8 * 2**20  # a few MB at most


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_card_records_the_recipe_it_ships_with(name: str) -> None:
    """A recipe changed without regenerating its weights would ship a card (and weights) that
    ``moe-vision pretrain NAME`` no longer reproduces."""
    from moe_vision.zoo.recipes import DEFAULTS

    objective, config = DEFAULTS[name]
    card = mini_card(name)
    assert card["objective"]["name"] == objective
    assert card["config"] == json.loads(json.dumps(dataclasses.asdict(config)))


def test_damaged_weights_name_the_file(tmp_path) -> None:
    if not SHIPPED:
        pytest.skip("no mini weights shipped yet")
    name = SHIPPED[0]
    bad = tmp_path / f"{name}.safetensors"
    shutil.copy(mini_checkpoint(name), bad)
    bad.write_bytes(bad.read_bytes()[:1000])
    with pytest.raises(ValueError, match=str(bad.name)):
        experts.create_expert(name, checkpoint=str(bad))


def test_missing_card_names_the_file() -> None:
    with pytest.raises(FileNotFoundError, match="moe-vision pretrain"):
        mini_card("no-such-mini")
    assert MINI_DIR.name == "mini"


def test_experts_loads_minis_without_fusion_or_moe_vision() -> None:
    if not SHIPPED:
        pytest.skip("no mini weights shipped yet")
    code = (
        "import sys, experts\n"
        f"experts.create_expert({SHIPPED[0]!r}, pretrained=True)\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('fusion', 'moe_vision')]\n"
        "assert not bad, bad\n"
    )
    subprocess.run(
        [sys.executable, "-c", code],
        check=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
