"""The default sweep (``moe-vision sweep`` with no arguments; ``sweeps/default.yaml`` is its
YAML copy, and ``tests/test_cli_sweep.py`` checks that the two agree)."""

from __future__ import annotations

import copy
from typing import Any

from moe_vision.sweeps.spec import SweepSpec


def default_sweep() -> SweepSpec:
    """The main job's sweep (``moe-vision sweep`` with no arguments), = ``sweeps/default.yaml``."""
    return SweepSpec.from_dict(copy.deepcopy(DEFAULT_SWEEP))


DEFAULT_SWEEP: dict[str, Any] = {
    "name": "default",
    # Eagle's question at laptop scale, with the pretrained mini zoo: does adding a specialist
    # to a CLIP base help where it should (Pix2Struct on OCR, ConvNeXt on small details)?
    "experts": {
        "base": "clip-mini",
        "pool": ["pix2struct-mini", "convnext-mini"],
        "k": [1, 2],
    },
    "fusions": ["channel_concat", "sequence_append"],
    # one expert alone: its baseline once (under channel_concat), not once per fusion
    "exclude": [{"experts": ["clip-mini"], "fusion": "sequence_append"}],
    "recipes": ["cambrian"],
    "seeds": [0, 1, 2],
    "model": {
        "expert_options": {
            "clip-mini": {"pretrained": True},
            "pix2struct-mini": {"pretrained": True},
            "convnext-mini": {"pretrained": True},
        }
    },
    "data": {"benchmark_sizes": {"align": 600, "instruct": 2000, "val": 0, "test": 2400}},
    "run": {
        "overrides": {
            # batch 8 at lr 1e-3: twice the updates of batch 16 for the same CPU time (a tiny
            # LLM's step costs in proportion to its batch) and the steadiest of the settings
            # tried (README, "The main job": the seed std of overall accuracy halves)
            "*": {"batch_size": 8, "lr": 0.001},
            "instruct": {"epochs": 3},
        },
        "train": {"progress_bar": False},
    },
    "executor": {"kind": "process", "workers": 2, "threads": 1},
}
"""The default sweep as data: CLIP-mini alone (channel_concat), and CLIP-mini + Pix2Struct-mini
and + ConvNeXt-mini (shipped weights) under 2 fusions, x 3 seeds = 15 cells on the built-in
benchmark (400 test questions per category), 2 cells at a time on one core each (tiny models
gain nothing from more threads, and two single-threaded cells use a 2-core laptop fully)."""
