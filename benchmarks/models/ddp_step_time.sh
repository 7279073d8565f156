#!/usr/bin/env bash
# On a machine with 2 GPUs: ddp_step_time.py on one GPU, then under DDP and FSDP2 on two, each
# with rank 0's kernel profile. Writes OUT_DIR/{single,ddp,fsdp}.json and .profile.txt.
#   bash benchmarks/models/ddp_step_time.sh OUT_DIR
set -euo pipefail
cd "$(dirname "$0")/../.."
out=${1:?usage: ddp_step_time.sh OUT_DIR}
mkdir -p "$out"
export PYTHONPATH="packages/collider-kernels/src:packages/collider-autograd/src:packages/collider-models/src${PYTHONPATH:+:$PYTHONPATH}"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
script=benchmarks/models/ddp_step_time.py
python3 "$script" --engine single --json "$out/single.json" --profile "$out/single.profile.txt"
for engine in ddp fsdp; do
    torchrun --standalone --nproc-per-node 2 "$script" --engine "$engine" --json "$out/$engine.json" \
        --profile "$out/$engine.profile.txt"
done
