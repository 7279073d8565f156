#!/usr/bin/env bash
# Set up (if needed), lint, run every test, then build the docs with warnings as errors.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup.sh
.venv/bin/ruff check .
.venv/bin/python -m pytest "$@"
.venv/bin/python -m sphinx -W --keep-going -q -b html docs docs/_build/html
echo "docs built: docs/_build/html/index.html"
