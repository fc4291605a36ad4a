"""``scripts/gpu_checks.sh``, the GPU checks as one command for a GPU node, runs end to end here:
without CUDA every ``gpu`` test skips and the bench writes its one ``skipped`` row, so a test
moved or a bench option renamed breaks this test rather than a session's only device call."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "gpu_checks.sh"


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU node, run the script itself")
def test_gpu_checks_script_runs_and_writes_its_files(tmp_path: Path) -> None:
    out = tmp_path / "out"
    env = {**os.environ, "OUT": str(out), "PYTHON": sys.executable}
    env.update(PYTEST_S="240", BENCH_S="240")
    done = subprocess.run(
        ["bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=400
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert sorted(p.name for p in out.iterdir()) == [
        "bench-gpu.csv",
        "bench-gpu.log",
        "env.txt",
        "pytest-gpu.log",
    ]
    assert "available False" in (out / "env.txt").read_text()
    log = (out / "pytest-gpu.log").read_text()
    assert " skipped" in log and "passed" not in log and "failed" not in log and "error" not in log
    rows = list(csv.DictReader((out / "bench-gpu.csv").open()))
    metrics = [(r["section"], r["metric"]) for r in rows]
    assert metrics[0] == ("gpu", "skipped")
    # the dry run says what a GPU would train: parameters per shape, then the shape per size
    assert metrics[1:] == [("gpu", "plan_params")] * 4 + [("gpu", "plan_shape_params")] * 2
