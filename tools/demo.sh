#!/usr/bin/env bash
# Set up (if needed) and run the main job on its embedded default: a small Llama-architecture
# model trained from scratch on Shakespeare with corrupted lines mixed in, keeping 60% of the
# tokens by excess loss over a reference model trained first on clean works. Then load the
# result with transformers' tokenizer and continue a prompt with collider_models.generate.
# Options are collider-train's (bash tools/demo.sh --help).
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup.sh
export COLLIDER_CACHE="$PWD/.cache/collider"
# The default model is tiny: on a busy 2-core machine two threads stall each other (several
# times slower than one, measured), so one thread is the default. Set OMP_NUM_THREADS to override.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
OUT="runs/demo-$(date +%Y%m%d-%H%M%S)"
prev=""
for arg in "$@"; do  # an --out of the caller's wins
    if [ "$prev" = "--out" ]; then OUT="$arg"; fi
    case "$arg" in --out=*) OUT="${arg#--out=}" ;; esac
    prev="$arg"
done
.venv/bin/collider-train --out "$OUT" "$@"
for arg in "$@"; do
    case "$arg" in -h|--help) exit 0 ;; esac
done
.venv/bin/python - "$OUT/final" <<'PY'
import sys

import torch
from transformers import AutoTokenizer

import collider_models

folder = sys.argv[1]
tok = AutoTokenizer.from_pretrained(folder)
model = collider_models.from_pretrained(folder).eval()
prompt = "ROMEO.\n"
ids = torch.tensor([tok(prompt)["input_ids"]])
torch.manual_seed(0)
out = collider_models.generate(model, ids, 60, do_sample=True, top_p=0.9, temperature=0.8)
print(f"\nsample from {folder} (transformers tokenizer, collider_models.generate):\n---\n{tok.decode(out[0])}\n---")
PY
