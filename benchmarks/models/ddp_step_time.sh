#!/usr/bin/env bash
# On a machine with 2 GPUs: ddp_step_time.py on one GPU, then under DDP and FSDP2 on two, at 4 and 8
# sequences per GPU; writes OUT_DIR/<engine>_b<B>.json and prints the markdown table.
#   bash benchmarks/models/ddp_step_time.sh OUT_DIR [extra ddp_step_time.py options]
set -euo pipefail
cd "$(dirname "$0")/../.."
out=${1:?usage: ddp_step_time.sh OUT_DIR [options]}
shift
mkdir -p "$out"
export PYTHONPATH="packages/collider-kernels/src:packages/collider-autograd/src:packages/collider-models/src${PYTHONPATH:+:$PYTHONPATH}"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
script=benchmarks/models/ddp_step_time.py
for b in 4 8; do
    python3 "$script" --engine single --batch-size "$b" --json "$out/single_b$b.json" "$@"
    for engine in ddp fsdp; do
        torchrun --standalone --nproc-per-node 2 "$script" --engine "$engine" --batch-size "$b" \
            --json "$out/${engine}_b$b.json" "$@"
    done
done
python3 "$script" --tabulate "$out"/single_b*.json "$out"/ddp_b*.json "$out"/fsdp_b*.json
