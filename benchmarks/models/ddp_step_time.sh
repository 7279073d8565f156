#!/usr/bin/env bash
# On a machine with 2 GPUs: Collider against the masked-loss baseline, TinyLlama-1.1B from scratch,
# bf16, 40% filtered by the model's own loss, under DDP and under FSDP2 (collider-train under
# torchrun). Writes each run's metrics.jsonl and summary.json under OUT_DIR/<engine>-<mode>/;
# compare the median tokens_per_s of steps 6-30. Carry .cache/collider (the default corpus).
#   bash benchmarks/models/ddp_step_time.sh OUT_DIR
set -euo pipefail
cd "$(dirname "$0")/../.."
out=${1:?usage: ddp_step_time.sh OUT_DIR}
export PYTHONPATH="packages/collider-kernels/src:packages/collider-autograd/src:packages/collider-models/src${PYTHONPATH:+:$PYTHONPATH}"
export COLLIDER_CACHE=${COLLIDER_CACHE:-$PWD/.cache/collider}
for engine in ddp fsdp; do
    for mode in collider masked; do
        extra=()
        [ "$engine" = fsdp ] && extra+=(--fsdp)
        [ "$mode" = masked ] && extra+=(--masked-loss)
        run="/tmp/ddp-step-time-$engine-$mode"
        rm -rf "$run"
        torchrun --standalone --nproc-per-node 2 -m collider_models.cli.train --model tinyllama-1.1b \
            --vocab-size 32000 --selection loss --reference none --keep 0.6 --steps 30 --warmup 0 \
            --batch-size 4 --seq-len 2048 --precision bf16 --device cuda --eval-every 0 --save-every 0 \
            "${extra[@]}" --out "$run"
        mkdir -p "$out/$engine-$mode"
        cp "$run/metrics.jsonl" "$run/summary.json" "$out/$engine-$mode/"
    done
done
python3 - "$out" <<'PY'
import json, statistics, sys
from pathlib import Path
for engine in ("ddp", "fsdp"):
    tps = {}
    for mode in ("collider", "masked"):
        rows = [json.loads(l) for l in (Path(sys.argv[1]) / f"{engine}-{mode}" / "metrics.jsonl").read_text().splitlines()]
        tps[mode] = statistics.median(r["tokens_per_s"] for r in rows if "tokens_per_s" in r and r["step"] >= 6)
    print(f"{engine}: Collider {tps['collider']:,.0f} tokens/s, masked {tps['masked']:,.0f}: "
          f"step time ratio {tps['masked'] / tps['collider']:.3f}")
PY
