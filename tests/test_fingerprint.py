"""A reference that cannot drift: one small cell of the default sweep, at a fixed seed, must
reproduce the committed fingerprint in ``tests/fingerprints/default_cell.json``.

The cell is the default sweep's first cell (``moe_vision.sweeps.sweep.default_sweep()``, so its
experts, fusion, recipe, stage overrides and model options are the defaults of the moment),
shrunk to a tiny benchmark and two optimizer steps per stage, run on one CPU thread. The
fingerprint holds its resolved run config, its accuracies and answers (exact: a hash of every
prediction), its final losses and per-module weight sums (relative tolerance 1e-5, for BLAS
differences between CPUs of the same kind).

When a change alters any of it on purpose (a new default, a new initialisation), refresh the
reference **in the same commit**::

    MOE_VISION_UPDATE_FINGERPRINTS=1 HF_HUB_OFFLINE=1 python -m pytest -q tests/test_fingerprint.py

and commit ``tests/fingerprints/default_cell.json`` (and re-run ``moe-vision sweep`` so that
``results/`` matches the code). Without the variable, any difference fails with what changed.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from moe_vision.sweeps.sweep import default_sweep, run_cell

FINGERPRINT = Path(__file__).resolve().parent / "fingerprints" / "default_cell.json"
UPDATE = os.environ.get("MOE_VISION_UPDATE_FINGERPRINTS") == "1"
RTOL = 1e-5
SIZES = {"align": 8, "instruct": 8, "val": 0, "test": 6}
STEPS = 2


def _small_cell(tmp_path: Path) -> tuple[str, dict[str, Any]]:
    """The default sweep's first cell with a tiny benchmark and ``STEPS`` steps per stage."""
    cell = default_sweep().expand()[0]
    config = copy.deepcopy(cell.config)
    config["data"] = {**config.get("data", {}), "benchmark_sizes": dict(SIZES)}
    config["data"]["benchmark_dir"] = str(tmp_path / "bench")
    overrides = copy.deepcopy(config.get("overrides") or {"*": {}})
    for stage in overrides:
        overrides[stage]["max_steps"] = STEPS
    overrides.setdefault("*", {})["max_steps"] = STEPS
    config["overrides"] = overrides
    config["cache_dir"] = str(tmp_path / "cache")
    config["train"] = {**config.get("train", {}), "progress_bar": False, "log_with": []}
    return cell.name, config


def _identity(config: dict[str, Any]) -> dict[str, Any]:
    """The config without machine-specific paths."""
    out = copy.deepcopy(config)
    out.pop("cache_dir", None)
    out["data"].pop("benchmark_dir", None)
    out.get("train", {}).pop("log_with", None)
    return json.loads(json.dumps(out, sort_keys=True, default=str))


def _fingerprint(tmp_path: Path) -> dict[str, Any]:
    name, config = _small_cell(tmp_path)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one reduction order on every machine
    try:
        metrics = run_cell(copy.deepcopy(config), tmp_path / "cell")
    finally:
        torch.set_num_threads(threads)
    predictions = json.loads((tmp_path / "cell" / "predictions.json").read_text())
    answers = json.dumps([[p["id"], p["prediction"]] for p in predictions])
    weights: dict[str, float] = {}
    for key, tensor in load_file(str(tmp_path / "cell" / "model" / "model.safetensors")).items():
        module = ".".join(key.split(".")[:2]) if key.startswith("experts.") else key.split(".")[0]
        weights[module] = weights.get(module, 0.0) + float(tensor.double().abs().sum())
    return {
        "cell": name,
        "config": _identity(config),
        "accuracy": {k: v for k, v in metrics.items() if k.startswith("accuracy/")},
        "answers_sha256": hashlib.sha256(answers.encode()).hexdigest(),
        "final_loss": {k: v for k, v in metrics.items() if k.startswith("final_loss/")},
        "weight_abs_sum": weights,
    }


def _close(a: Any, b: Any) -> bool:
    if isinstance(a, float) and isinstance(b, float):
        return math.isclose(a, b, rel_tol=RTOL) or (math.isnan(a) and math.isnan(b))
    return a == b


def _flat(data: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(data, dict):
        return {prefix: data}
    out: dict[str, Any] = {}
    for k, v in data.items():
        out.update(_flat(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def _differences(expected: dict[str, Any], got: dict[str, Any]) -> list[str]:
    out = []
    old, new = _flat(expected["config"]), _flat(got["config"])
    for key in sorted(set(old) | set(new)):
        if old.get(key) != new.get(key):
            out.append(f"config {key}: {old.get(key)!r} -> {new.get(key)!r}")
    for key in ("cell", "answers_sha256"):
        if expected[key] != got[key]:
            out.append(f"{key}: {expected[key]!r} -> {got[key]!r}")
    for group in ("accuracy", "final_loss", "weight_abs_sum"):
        for k in sorted(set(expected[group]) | set(got[group])):
            a, b = expected[group].get(k), got[group].get(k)
            tolerant = group != "accuracy"
            if a is None or b is None or not (_close(a, b) if tolerant else a == b):
                out.append(f"{group}[{k}]: {a!r} -> {b!r}")
    return out


def test_default_cell_matches_fingerprint(tmp_path: Path) -> None:
    got = _fingerprint(tmp_path)
    if UPDATE:
        FINGERPRINT.parent.mkdir(parents=True, exist_ok=True)
        FINGERPRINT.write_text(json.dumps(got, indent=1, sort_keys=True) + "\n")
        pytest.skip(f"fingerprint refreshed: {FINGERPRINT} (commit it with the change)")
    if not FINGERPRINT.exists():
        pytest.fail(f"{FINGERPRINT} is missing; create it with MOE_VISION_UPDATE_FINGERPRINTS=1")
    expected = json.loads(FINGERPRINT.read_text())
    diffs = _differences(expected, got)
    assert not diffs, (
        "the default cell no longer reproduces its fingerprint:\n  "
        + "\n  ".join(diffs[:20])
        + f"\nIf intended, refresh it in the same commit: MOE_VISION_UPDATE_FINGERPRINTS=1 "
        f"python -m pytest tests/test_fingerprint.py (see {Path(__file__).name}'s docstring)"
    )


def test_fingerprint_comparison_catches_changes() -> None:
    base = {
        "cell": "c",
        "config": {"seed": 0},
        "accuracy": {"accuracy/overall": 0.25},
        "answers_sha256": "ab",
        "final_loss": {"final_loss/x": 1.0},
        "weight_abs_sum": {"llm": 100.0},
    }
    assert _differences(base, copy.deepcopy(base)) == []
    within = copy.deepcopy(base)
    within["weight_abs_sum"]["llm"] = 100.0 * (1 + RTOL / 10)
    assert _differences(base, within) == []
    for group, key, value in (
        ("accuracy", "accuracy/overall", 0.25 + 1e-12),
        ("final_loss", "final_loss/x", 1.001),
        ("weight_abs_sum", "llm", 100.1),
    ):
        changed = copy.deepcopy(base)
        changed[group][key] = value
        assert _differences(base, changed) == [f"{group}[{key}]: {base[group][key]!r} -> {value!r}"]
    changed = copy.deepcopy(base)
    changed["config"]["seed"] = 1
    assert _differences(base, changed) == ["config seed: 0 -> 1"]
