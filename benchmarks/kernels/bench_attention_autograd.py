"""Benchmark: attention backward through autograd, Collider's kept-rows layer vs PyTorch's dense SDPA.

``bench_attention.py`` times the kernels alone. This script times what a user's backward runs:

* dense: ``torch.autograd.grad`` of ``F.scaled_dot_product_attention(..., is_causal=True)`` (GQA
  native) for a dense output gradient over all B*T rows, twice: with PyTorch's own backend choice
  (cuDNN on an H200 with torch 2.11) and with the flash backend forced (``sdpa_kernel``);
* ours: ``torch.autograd.grad`` of :func:`collider_autograd.causal_attention` for a
  :class:`~collider_autograd.TokenSparseTensor` output gradient keeping ``round(keep*T)`` random
  positions of each sequence: every host step of the layer's backward and every launch.

q/k/v are (B, T, H, D) views of one fused projection output, as the models make them. Both are
timed by ``collider_kernels.timing.median_ms`` (calls back to back between CUDA events, median of
batches, after a warm-up), in one process, alternating.

    python benchmarks/kernels/bench_attention_autograd.py --out benchmarks/results/attention_autograd_h200
"""

from __future__ import annotations

import argparse
import datetime
import json

import torch
import torch.nn.functional as F
from bench_attention import MODELS, _kept_index, _make_inputs
from torch.nn.attention import SDPBackend, sdpa_kernel

from collider_autograd import TokenSparseTensor, causal_attention
from collider_kernels.timing import median_ms


def bench_model(name, B, T, keeps, gen) -> list[dict]:
    Hq, Hkv, D = MODELS[name]
    q, k, v = (t.detach().requires_grad_() for t in _make_inputs(B, T, Hq, Hkv, D, torch.bfloat16, "cuda", gen))

    def sdpa():
        return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                              is_causal=True, enable_gqa=Hq != Hkv).transpose(1, 2)

    out_dense = sdpa()
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        out_flash = sdpa()
    grad_dense = torch.randn_like(out_dense)
    dense_ms = median_ms(lambda: torch.autograd.grad(out_dense, (q, k, v), grad_dense, retain_graph=True))
    flash_ms = median_ms(lambda: torch.autograd.grad(out_flash, (q, k, v), grad_dense, retain_graph=True))
    out_ours = causal_attention(q, k, v)
    rows = []
    for keep in keeps:
        index = _kept_index(B, T, keep, "cuda", gen)
        values = torch.randn(index.numel(), Hq, D, dtype=torch.bfloat16, device="cuda", generator=gen)
        grad = TokenSparseTensor(values, index, (B, T))
        ours_ms = median_ms(lambda g=grad: torch.autograd.grad(out_ours, (q, k, v), g, retain_graph=True))
        rows.append({"model": name, "heads": [Hq, Hkv, D], "keep": keep, "dense_ms": dense_ms,
                     "flash_ms": flash_ms, "ours_ms": ours_ms, "ratio": ours_ms / dense_ms,
                     "ratio_vs_flash": ours_ms / flash_ms})
        print(f"{name:15s} keep {keep:.1f}: SDPA {dense_ms:.3f} ms, flash {flash_ms:.3f} ms, ours {ours_ms:.3f} ms, "
              f"ratios {ours_ms / dense_ms:.3f} / {ours_ms / flash_ms:.3f}", flush=True)
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="output stem: writes STEM.json and STEM.md")
    ap.add_argument("--B", type=int, default=8)
    ap.add_argument("--T", type=int, default=2048)
    ap.add_argument("--models", nargs="*", default=list(MODELS))
    ap.add_argument("--keeps", nargs="*", type=float, default=[1.0, 0.6, 0.4])
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench_attention_autograd.py needs a CUDA GPU")
    gen = torch.Generator(device="cuda").manual_seed(0)
    rows = [r for name in args.models for r in bench_model(name, args.B, args.T, args.keeps, gen)]
    import triton

    meta = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "B": args.B, "T": args.T, "dtype": "bfloat16"}
    with open(args.out + ".json", "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    lines = ["# Attention backward through autograd: kept rows vs dense SDPA", "",
             f"{meta['gpu']}, torch {meta['torch']}, triton {meta['triton']}, {meta['date']}. B={args.B}, "
             f"T={args.T}, bf16. `torch.autograd.grad` of causal SDPA for a dense gradient (PyTorch's own "
             "backend choice, and the flash backend forced) vs of `causal_attention` for a TokenSparseTensor "
             "gradient; median ms (CUDA events, calls back to back).",
             "", "| model | Hq/Hkv/D | keep | SDPA ms | flash ms | ours ms | ours / SDPA | ours / flash |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {'/'.join(map(str, r['heads']))} | {r['keep']:.1f} | {r['dense_ms']:.3f} "
                     f"| {r['flash_ms']:.3f} | {r['ours_ms']:.3f} | {r['ratio']:.3f} | {r['ratio_vs_flash']:.3f} |")
    with open(args.out + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
