#!/usr/bin/env bash
# On a GPU machine with this checkout: every GPU-marked test of the three packages and the
# cross-package tests, importing the packages from the source tree. Extra arguments go to pytest.
# With pytest-xdist importable (e.g. carried in .whl/), COLLIDER_GPU_TEST_WORKERS processes (default
# 4) share the GPU; 0 runs them in this process.
#   bash benchmarks/gpu_checks.sh -x
set -uo pipefail
cd "$(dirname "$0")/.."
root=$PWD  # absolute paths: pytest workers and importlib-mode test modules resolve them alike
export PYTHONPATH="$root/packages/collider-kernels/src:$root/packages/collider-autograd/src:$root/packages/collider-models/src:$root/packages/collider-kernels/tests:$root/packages/collider-autograd/tests${PYTHONPATH:+:$PYTHONPATH}"
export COLLIDER_TRITON_AUTOTUNE=${COLLIDER_TRITON_AUTOTUNE:-0}
source benchmarks/carried_wheels.sh
workers=()
if [ "${COLLIDER_GPU_TEST_WORKERS:-4}" != 0 ] && python3 -c "import xdist" 2>/dev/null; then
    workers=(-n "${COLLIDER_GPU_TEST_WORKERS:-4}")
fi
python3 -m pytest -q -p no:cacheprovider -m gpu -o addopts="-ra --import-mode=importlib" "${workers[@]}" \
    packages/collider-kernels/tests packages/collider-autograd/tests packages/collider-models/tests tests "$@"
