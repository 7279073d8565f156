#!/usr/bin/env bash
# On a GPU machine with this checkout: put carried wheels (.whl/, e.g. liger-kernel) on the path,
# import the three packages from the source tree, and run collider-bench with the given arguments.
#   bash benchmarks/models/gpu_bench.sh --hf --liger --full-step --profile --out results/e2e
set -euo pipefail
cd "$(dirname "$0")/../.."
source benchmarks/carried_wheels.sh
export PYTHONPATH="packages/collider-kernels/src:packages/collider-autograd/src:packages/collider-models/src${PYTHONPATH:+:$PYTHONPATH}"
export COLLIDER_BENCH_COMMIT=${COLLIDER_BENCH_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}
exec python3 -m collider_models.cli.bench "$@"
