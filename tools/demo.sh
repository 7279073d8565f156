#!/usr/bin/env bash
# Set up (if needed) and run the main job on its embedded default: a short token-filtered
# training run of a small TinyLlama-architecture model on CPU, with dense vs Collider timing.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup.sh
.venv/bin/collider-train "$@"
