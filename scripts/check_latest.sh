#!/usr/bin/env bash
# Watch upstream: install the newest releases of every dependency (no lock) in a fresh venv and
# run ruff and the test suite; print one summary line with the key versions and what moved
# against requirements/lock.txt. Exit status: the suite's. Run it in each working session; when
# it passes, scripts/lock.sh moves the lock forward; when it fails, fix the code (not the lock).
#
#   scripts/check_latest.sh                   # the whole suite
#   scripts/check_latest.sh tests/test_lora.py  # arguments go to pytest
#
# LATEST_VENV chooses the venv (default /tmp/moe-vision-latest); PYTHON the interpreter. Caps in
# this machine's pip configuration (pip config list) still apply.
set -uo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
VENV="${LATEST_VENV:-/tmp/moe-vision-latest}"
LOG="$VENV.log"
rm -rf "$VENV"
"${PYTHON:-python3}" -m venv "$VENV" || exit 2
# shellcheck disable=SC1091
source "$VENV/bin/activate"
python -m pip install -q --upgrade pip || exit 2
python -m pip install -q --upgrade --upgrade-strategy eager -e ".[dev]" || {
    echo "latest: INSTALL FAILED (pip install -e \".[dev]\" with the newest releases)"
    exit 2
}
ruff check . > "$LOG" 2>&1
lint=$?
python -m pytest -q "$@" 2>&1 | tee -a "$LOG"
status=${PIPESTATUS[0]}
[ "$lint" -ne 0 ] && status=1
result=$(grep -E '[0-9]+ (passed|failed|error)' "$LOG" | tail -n 1 | tr -d '=' | xargs)
versions=$(python - <<'PY'
from importlib.metadata import version
names = ["torch", "transformers", "peft", "timm", "accelerate", "open_clip_torch"]
print(", ".join(f"{n} {version(n)}" for n in names))
PY
)
moved=$(python - <<'PY'
from pathlib import Path
from importlib.metadata import distributions
lock = Path("requirements/lock.txt")
pins = {}
if lock.exists():
    for line in lock.read_text().splitlines():
        if "==" in line and not line.startswith("#"):
            name, ver = line.split("==", 1)
            pins[name.lower().replace("_", "-")] = ver.strip()
moved = []
for d in distributions():
    name = d.metadata["Name"].lower().replace("_", "-")
    if name in pins and pins[name] != d.version:
        moved.append(f"{name} {pins[name]}->{d.version}")
print(", ".join(sorted(moved)) or "none")
PY
)
verdict=$([ "$status" -eq 0 ] && echo PASS || echo FAIL)
[ "$lint" -ne 0 ] && verdict="$verdict (ruff failed: $LOG)"
echo "latest: $verdict: ${result:-no pytest summary} | $versions | moved vs lock: $moved"
exit "$status"
