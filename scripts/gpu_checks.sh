#!/usr/bin/env bash
# The GPU checks as one prepared command (issue 14): the tests marked `gpu` and the `gpu` bench
# section, for a machine with a CUDA device and PyTorch, transformers, timm, accelerate and peft
# already installed but no network (the `device` tool's H200 image is such a machine).
#
#   OUT=/some/folder bash scripts/gpu_checks.sh      # defaults to results/gpu-checks
#
# It writes, under $OUT:
#   env.txt          nvidia-smi and the versions of the libraries the checks use
#   bench-gpu.csv    `moe-vision bench --sections gpu`, row by row (commit it as results/bench-gpu.csv)
#   bench-gpu.log    the bench's console
#   pytest-gpu.log   `pytest -m gpu` (tests/test_gpu.py, tests/test_lora.py)
# The project is used from this checkout (PYTHONPATH), not installed: nothing is fetched.
# Missing optional packages (xformers, bitsandbytes) make their tests skip, and the log says so.
# Wheels carried in .whl/ (see the device tool's README) are installed to /tmp/site first.
# On a machine without CUDA it runs too: every test skips and the bench writes one `skipped`
# row, which is how this script is checked on CPU.
#
# Time: at most 6 minutes in all. The bench runs first (BENCH_S, 210 s by default) and writes
# each row to bench-gpu.csv as it is measured, so a limit that cuts it keeps what it measured;
# then the gpu tests (PYTEST_S, 120 s). A lent device gives 15 minutes in all, machine start
# included: this leaves room to run the script twice.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-results/gpu-checks}"
PYTHON="${PYTHON:-python3}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
if compgen -G ".whl/*.whl" >/dev/null; then
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

{
    date -u
    nvidia-smi 2>&1 || echo "nvidia-smi: not available"
    "$PYTHON" - <<'EOF'
import importlib
import torch

print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
if torch.cuda.is_available():
    print("device", torch.cuda.get_device_name(0))
for name in ("transformers", "timm", "accelerate", "peft", "xformers", "bitsandbytes"):
    try:
        print(name, importlib.import_module(name).__version__)
    except Exception as e:  # noqa: BLE001 - a missing optional package is a finding
        print(name, "missing:", type(e).__name__, e)
EOF
} >"$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

status=0
timeout "${BENCH_S:-210}" "$PYTHON" -m moe_vision.cli bench --sections gpu \
    --out "$OUT/bench-gpu.csv" 2>&1 | tee "$OUT/bench-gpu.log" || status=1
timeout "${PYTEST_S:-120}" "$PYTHON" -m pytest -m gpu -q -rs -p no:cacheprovider \
    tests/test_gpu.py tests/test_lora.py 2>&1 | tee "$OUT/pytest-gpu.log" || status=1
echo "gpu checks: exit $status; files in $OUT"
exit "$status"
