#!/usr/bin/env bash
# On a GPU machine with this checkout: every GPU-marked test of the three packages and the
# cross-package tests, importing the packages from the source tree. Extra arguments go to pytest.
#   bash benchmarks/gpu_checks.sh -x
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="packages/collider-kernels/src:packages/collider-autograd/src:packages/collider-models/src:packages/collider-kernels/tests:packages/collider-autograd/tests${PYTHONPATH:+:$PYTHONPATH}"
export COLLIDER_TRITON_AUTOTUNE=${COLLIDER_TRITON_AUTOTUNE:-0}
python3 -m pytest -q -p no:cacheprovider -m gpu -o addopts="-ra --import-mode=importlib" \
    packages/collider-kernels/tests packages/collider-autograd/tests packages/collider-models/tests tests "$@"
