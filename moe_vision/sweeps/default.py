"""The default sweep (``moe-vision sweep`` with no arguments): read from its one copy,
``moe_vision/sweeps/configs/default.yaml``, shipped with the package (``sweeps/default.yaml``
links to it in a checkout)."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from moe_vision.sweeps.spec import SweepSpec


def default_sweep_file() -> Path:
    """The default sweep's YAML, where the installed package keeps it."""
    return Path(str(resources.files("moe_vision.sweeps") / "configs" / "default.yaml"))


def default_sweep() -> SweepSpec:
    """The main job's sweep (``moe-vision sweep`` with no arguments): CLIP-mini alone,
    + ConvNeXt-mini and its random-init twin (channel_concat), + Pix2Struct-mini (both fusions)
    and its twin (sequence_append), shipped weights, 3 seeds: 18 cells on the built-in
    benchmark, 2 at a time on one core each."""
    return SweepSpec.from_yaml(default_sweep_file())
