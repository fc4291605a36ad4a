#!/usr/bin/env bash
# The GPU checks as one prepared command (issue 14): the tests marked `gpu` and the `gpu` bench
# section, for a machine with a CUDA device and PyTorch, transformers, timm, accelerate and peft
# already installed but no network (the `device` tool's H200 image is such a machine).
#
#   OUT=/some/folder bash scripts/gpu_checks.sh      # defaults to results/gpu-checks
#
# It writes, under $OUT:
#   env.txt          nvidia-smi and the versions of the libraries the checks use
#   pytest-gpu.log   `pytest -m gpu` (tests/test_gpu.py, tests/test_lora.py)
#   bench-gpu.csv    `moe-vision bench --sections gpu` (commit it as results/bench-gpu.csv)
#   bench-gpu.log    the bench's console
# The project is used from this checkout (PYTHONPATH), not installed: nothing is fetched.
# Missing optional packages (xformers, bitsandbytes) make their tests skip, and the log says so.
# Wheels carried in .whl/ (see the device tool's README) are installed to /tmp/site first.
# On a machine without CUDA it runs too: every test skips and the bench writes one `skipped`
# row, which is how this script is checked on CPU.
#
# Time: each step has its own limit (PYTEST_S, BENCH_S; 300 + 240 s by default) so that the
# whole run fits one 10-minute device call with room for the machine's start.
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
timeout "${PYTEST_S:-300}" "$PYTHON" -m pytest -m gpu -q -rs -p no:cacheprovider \
    tests/test_gpu.py tests/test_lora.py 2>&1 | tee "$OUT/pytest-gpu.log" || status=1
timeout "${BENCH_S:-240}" "$PYTHON" -m moe_vision.cli bench --sections gpu \
    --out "$OUT/bench-gpu.csv" 2>&1 | tee "$OUT/bench-gpu.log" || status=1
echo "gpu checks: exit $status; files in $OUT"
exit "$status"
