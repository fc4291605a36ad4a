"""A reference that cannot drift: one small cell of the default sweep, at a fixed seed, must
reproduce the committed fingerprint in ``tests/fingerprints/default_cell.json``.

The cell is the default sweep's first cell (``moe_vision.sweeps.sweep.default_sweep()``, so its
experts, fusion, recipe, stage overrides and model options are the defaults of the moment),
shrunk to a tiny benchmark and two optimizer steps per stage, run on one CPU thread. It must
pass on any CPU, so only what floating point cannot change is compared bit for bit:

* exact: the resolved run config, and the benchmark the cell trained and was tested on (a hash
  of every split's records and every image's decoded pixels, ``data_sha256``);
* within tolerance: final losses and per-module weight sums (relative ``RTOL``: BLAS kernels and
  SIMD widths differ between CPU types; measured drift after two steps is about 1e-7), and the
  greedy answers (at most ``ANSWER_FLIPS`` may differ: a near-tie in the logits can decode
  differently), with each accuracy allowed to move by the answers that changed in its category.

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
RTOL = 1e-4
ANSWER_FLIPS = 1
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


def _data_sha256(bench: Path) -> str:
    """Hash of the benchmark: every split's records and every image's pixels (decoded, so the
    PNG encoder's version does not matter). Integer data: equal on every machine."""
    from PIL import Image

    digest = hashlib.sha256()
    for split in sorted(bench.glob("*.json")):
        digest.update(split.name.encode())
        digest.update(json.dumps(json.loads(split.read_text()), sort_keys=True).encode())
    for image in sorted((bench / "images").iterdir()):
        with Image.open(image) as im:
            digest.update(f"{image.name} {im.mode} {im.size}".encode())
            digest.update(im.tobytes())
    return digest.hexdigest()


def _fingerprint(tmp_path: Path) -> dict[str, Any]:
    name, config = _small_cell(tmp_path)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one reduction order on every machine
    try:
        metrics = run_cell(copy.deepcopy(config), tmp_path / "cell")
    finally:
        torch.set_num_threads(threads)
    predictions = json.loads((tmp_path / "cell" / "predictions.json").read_text())
    weights: dict[str, float] = {}
    for key, tensor in load_file(str(tmp_path / "cell" / "model" / "model.safetensors")).items():
        module = ".".join(key.split(".")[:2]) if key.startswith("experts.") else key.split(".")[0]
        weights[module] = weights.get(module, 0.0) + float(tensor.double().abs().sum())
    return {
        "cell": name,
        "config": _identity(config),
        "accuracy": {k: v for k, v in metrics.items() if k.startswith("accuracy/")},
        "answers": {p["id"]: [p["category"], p["prediction"]] for p in predictions},
        "data_sha256": _data_sha256(tmp_path / "bench"),
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


def _accuracy_slack(expected: dict[str, Any], got: dict[str, Any]) -> dict[str, float]:
    """How far each accuracy may move: the changed answers' share of its category (overall:
    of all answers). The bounds (``/lo``, ``/hi``) move with their accuracy."""
    old, new = expected["answers"], got["answers"]
    sizes: dict[str, int] = {"overall": len(old)}
    changed: dict[str, int] = {"overall": 0}
    for qid, (category, answer) in old.items():
        sizes[category] = sizes.get(category, 0) + 1
        if new.get(qid, [category, answer])[1] != answer:
            changed[category] = changed.get(category, 0) + 1
            changed["overall"] += 1
    return {c: changed.get(c, 0) / n for c, n in sizes.items() if n}


def _differences(expected: dict[str, Any], got: dict[str, Any]) -> list[str]:
    out = []
    old, new = _flat(expected["config"]), _flat(got["config"])
    for key in sorted(set(old) | set(new)):
        if old.get(key) != new.get(key):
            out.append(f"config {key}: {old.get(key)!r} -> {new.get(key)!r}")
    for key in ("cell", "data_sha256"):
        if expected[key] != got[key]:
            out.append(f"{key}: {expected[key]!r} -> {got[key]!r}")
    if set(expected["answers"]) != set(got["answers"]):
        out.append(f"answers: questions {sorted(expected['answers'])} -> {sorted(got['answers'])}")
    flips = [q for q, a in expected["answers"].items() if got["answers"].get(q, a) != a]
    if len(flips) > ANSWER_FLIPS:
        out.append(f"answers: {len(flips)} changed (at most {ANSWER_FLIPS} may), e.g. {flips[:3]}")
    slack = _accuracy_slack(expected, got)
    for k in sorted(set(expected["accuracy"]) | set(got["accuracy"])):
        a, b = expected["accuracy"].get(k), got["accuracy"].get(k)
        allowed = slack.get(k.split("/")[1], 0.0)  # accuracy/<category>[/lo|/hi]
        if a is None or b is None or abs(a - b) > (allowed + 1e-9 if allowed else 0.0):
            out.append(f"accuracy[{k}]: {a!r} -> {b!r}")
    for group in ("final_loss", "weight_abs_sum"):
        for k in sorted(set(expected[group]) | set(got[group])):
            a, b = expected[group].get(k), got[group].get(k)
            if a is None or b is None or not _close(a, b):
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
        "accuracy": {"accuracy/overall": 0.25, "accuracy/color": 0.5, "accuracy/shape": 0.0},
        "answers": {
            "q0": ["color", "red"],
            "q1": ["color", "x"],
            "q2": ["shape", "x"],
            "q3": ["shape", "x"],
        },
        "data_sha256": "ab",
        "final_loss": {"final_loss/x": 1.0},
        "weight_abs_sum": {"llm": 100.0},
    }
    assert _differences(base, copy.deepcopy(base)) == []
    within = copy.deepcopy(base)  # floating-point drift between CPUs, and one near-tie answer
    within["weight_abs_sum"]["llm"] = 100.0 * (1 + RTOL / 10)
    within["final_loss"]["final_loss/x"] = 1.0 * (1 - RTOL / 10)
    within["answers"]["q2"] = ["shape", "circle"]
    within["accuracy"].update({"accuracy/overall": 0.5, "accuracy/shape": 0.5})
    assert _differences(base, within) == []
    for group, key, value in (
        ("accuracy", "accuracy/overall", 0.25 + 1e-12),  # no answer changed: exact
        ("final_loss", "final_loss/x", 1.001),
        ("weight_abs_sum", "llm", 100.1),
    ):
        changed = copy.deepcopy(base)
        changed[group][key] = value
        assert _differences(base, changed) == [f"{group}[{key}]: {base[group][key]!r} -> {value!r}"]
    moved = copy.deepcopy(within)  # one shape answer changed: colour may not move
    moved["accuracy"]["accuracy/color"] = 1.0
    assert _differences(base, moved) == ["accuracy[accuracy/color]: 0.5 -> 1.0"]
    two = copy.deepcopy(within)
    two["answers"]["q3"] = ["shape", "square"]
    assert _differences(base, two) == ["answers: 2 changed (at most 1 may), e.g. ['q2', 'q3']"]
    changed = copy.deepcopy(base)
    changed["config"]["seed"] = 1
    changed["data_sha256"] = "cd"
    assert _differences(base, changed) == ["config seed: 0 -> 1", "data_sha256: 'ab' -> 'cd'"]
