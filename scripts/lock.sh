#!/usr/bin/env bash
# Regenerate requirements/lock.txt, the versions the test suite last passed with.
#
#   scripts/lock.sh                 # fresh venv, newest releases pyproject.toml allows, ruff,
#                                   # the whole suite; writes requirements/lock.txt only if all pass
#   scripts/lock.sh tests/test_x.py # a partial run: the lock is written beside the venv instead
#
# The lock is `pip freeze --exclude-editable` of that venv (every transitive version, pip's own
# resolution on this platform), used as a constraints file:
#   pip install -c requirements/lock.txt -e ".[dev]"
# pip-compile is not used: it ignores pip's configuration files, so on a machine whose pip.conf
# caps a package (e.g. torch) it locks a release that pip will not install there.
# LOCK_VENV chooses the venv (default /tmp/moe-vision-lock); PYTHON the interpreter (python3).
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
VENV="${LOCK_VENV:-/tmp/moe-vision-lock}"
rm -rf "$VENV"
"${PYTHON:-python3}" -m venv "$VENV"
# shellcheck disable=SC1091
source "$VENV/bin/activate"
python -m pip install -q --upgrade pip
python -m pip install -q -e ".[dev]"
ruff check .
python -m pytest -q "$@"  # set -e: a failing suite stops here and the lock is left as it was

target="requirements/lock.txt"
if [ "$#" -gt 0 ]; then
    target="$VENV/lock.txt"  # a partial run never replaces the committed lock
fi
{
    echo "# The versions the test suite passed with: a constraints file, written by scripts/lock.sh"
    echo "# (Python $(python -c 'import platform; print(platform.python_version(), platform.system(), platform.machine())'))."
    echo "# Install: pip install -c requirements/lock.txt -e \".[dev]\""
    python -m pip freeze --exclude-editable | grep -v '^#'
} > "$target.tmp"
mv "$target.tmp" "$target"
echo "lock: suite passed; wrote $target ($(grep -vc '^#' "$target") packages)"
