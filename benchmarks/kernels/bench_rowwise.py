"""Benchmark the fused Triton row-wise backwards against the torch backend.

SwiGLU and RMSNorm at the shapes of TinyLlama-1.1B and Qwen2.5-1.5B; LayerNorm (hidden 2048) and
GELU tanh (``gelu_new``, MLP width 8192) at the shapes of Phi-1.5; the rotary backward on the query
heads of the three models (width = heads × head dim; Phi-1.5 rotates half of each head): 16384 token rows, keep 1.0
(dense gradient, ``index=None``) and 0.6 (sorted random subset, rows gathered by index), bf16 by
default. Times each backend with CUDA events around back-to-back calls after a warm-up (median of
5 batches) and reports the effective bandwidth of the minimal traffic (each input row read once,
each output written once). With ``--sweep`` it also times a few alternative Triton block
configurations at keep 0.6 (stopping at a time budget).

Writes ``<out>.json`` and ``<out>.md``.

Usage: ``python benchmarks/kernels/bench_rowwise.py [--out STEM] [--dtype bf16|fp16|fp32] [--sweep]``
"""

from __future__ import annotations

import json
import time

import torch
from common import DTYPES, environment, max_rel_diff, row_bench_parser, save_results, sweep_lines, time_configs

import collider_kernels as ck
from collider_kernels.timing import median_ms

DEVICE = "cuda"
ROWS = 16384
KEEPS = (1.0, 0.6)
# (op, model(s), width, eps)
CASES = [
    ("rms_norm", "TinyLlama-1.1B / Phi-1.5 width", 2048, 1e-5),
    ("rms_norm", "Qwen2.5-1.5B", 1536, 1e-6),
    ("swiglu", "TinyLlama-1.1B", 5632, None),
    ("swiglu", "Qwen2.5-1.5B", 8960, None),
    ("layer_norm", "Phi-1.5", 2048, 1e-5),
    ("gelu_new", "Phi-1.5", 8192, None),
    ("rotary", "TinyLlama-1.1B q", 32 * 64, None),
    ("rotary", "Qwen2.5-1.5B q", 12 * 128, None),
    ("rotary", "Phi-1.5 q", 32 * 64, None),
]
# Rotary shapes: (heads, head dim, rotated dims) per case model; tables cover T=2048 positions.
ROTARY = {"TinyLlama-1.1B q": (32, 64, 64), "Qwen2.5-1.5B q": (12, 128, 128), "Phi-1.5 q": (32, 64, 32)}
SEQ = 2048
# Public op of each benchmarked name (the keys of ``meta["auto_backends"]``).
OPS = {"rms_norm": "rms_norm_backward", "swiglu": "swiglu_backward", "layer_norm": "layer_norm_backward",
       "gelu_new": "gelu_new_backward", "rotary": "rotary_backward"}
RMS_SWEEP = [
    {"block_r": r, "num_warps": w, "programs_per_sm": p} for r in (1, 2, 4) for w in (4, 8) for p in (4, 16)
]
SWIGLU_SWEEP = [
    {"block_r": r, "block_i": i, "num_warps": w}
    for r, i, w in ((1, 1024, 4), (2, 1024, 4), (4, 1024, 8), (8, 512, 4), (8, 1024, 8), (16, 256, 4))
]


def make_inputs(op, width, keep, dtype, gen, model=None):
    n = int(round(keep * ROWS))
    idx = None if keep == 1.0 else torch.randperm(ROWS, device=DEVICE, generator=gen)[:n].sort().values
    if op == "rotary":
        H, D, R = ROTARY[model]
        grad = torch.randn(n, H, D, device=DEVICE, generator=gen).to(dtype)  # (n, H, D)
        angles = torch.rand(SEQ, R // 2, device=DEVICE, generator=gen) * 6.0
        emb = torch.cat([angles, angles], dim=-1)  # (T, R)
        rows = torch.arange(ROWS, device=DEVICE) if idx is None else idx
        return n, idx, (grad, emb.cos().to(dtype), emb.sin().to(dtype), rows % SEQ)
    x = torch.randn(ROWS, width, device=DEVICE, generator=gen).to(dtype)  # (M, W): x or gate
    grad = torch.randn(n, width, device=DEVICE, generator=gen).to(dtype)  # (n, W)
    if op == "swiglu":
        up = torch.randn(ROWS, width, device=DEVICE, generator=gen).to(dtype)
        return n, idx, (grad, x, up)
    if op == "gelu_new":
        return n, idx, (grad, x)
    w = (1 + 0.1 * torch.randn(width, device=DEVICE, generator=gen)).to(dtype)
    return n, idx, (grad, x, w)


def call(op, backend, args, eps, idx):
    if op == "rotary":  # rows are selected through the positions in args
        return (ck.rotary_backward(*args, backend=backend, validate=False),)
    if op == "swiglu":
        return ck.swiglu_backward(*args, idx, backend=backend, validate=False)
    if op == "gelu_new":
        return (ck.gelu_new_backward(*args, idx, backend=backend, validate=False),)
    if op == "layer_norm":
        return ck.layer_norm_backward(*args, eps, idx, backend=backend, validate=False)
    return ck.rms_norm_backward(*args, eps, idx, backend=backend, validate=False)


def traffic_bytes(op, n, width, dtype) -> int:
    size = torch.empty((), dtype=dtype).element_size()
    # swiglu: grad, gate, up in; dgate, dup out. rotary: grad in, dx out. Others: grad, x in; dx out
    # (+ weight in, fp32 sums out).
    tensors = {"swiglu": 5, "rotary": 2}.get(op, 3)
    params = {"rms_norm": width * (size + 4), "layer_norm": width * (size + 8)}.get(op, 0)
    return tensors * n * width * size + params


def bench(dtype, sweep: bool, deadline: float, log) -> list[dict]:
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    rows = []
    for op, model, width, eps in CASES:
        for keep in KEEPS:
            n, idx, args = make_inputs(op, width, keep, dtype, gen, model)
            gbytes = traffic_bytes(op, n, width, dtype) / 1e9
            row = {"op": op, "model": model, "width": width, "keep": keep, "n": n}
            ref = call(op, "torch", args, eps, idx)
            for backend in ("torch", "triton"):
                out = call(op, backend, args, eps, idx)
                ms = median_ms(lambda b=backend: call(op, b, args, eps, idx))
                diff = max(max_rel_diff(o, r) for o, r in zip(out, ref, strict=True))
                row[backend] = {"ms": ms, "gb_per_s": gbytes / ms * 1e3, "max_rel_diff_vs_torch": diff}
                del out
            row["speedup"] = row["torch"]["ms"] / row["triton"]["ms"]
            row["triton_default_config"] = default_config(op, width, model)
            log(f"{op:10s} {model:31s} W={width:5d} keep={keep:.1f}  torch {row['torch']['ms']:.3f} ms  "
                f"triton {row['triton']['ms']:.3f} ms ({row['triton']['gb_per_s']:.0f} GB/s)  "
                f"x{row['speedup']:.2f}  diff {row['triton']['max_rel_diff_vs_torch']:.1e}")
            if sweep and keep != 1.0 and op != "rotary":
                row["sweep"] = sweep_configs(op, args, eps, idx, deadline, log)
            rows.append(row)
            del ref
            torch.cuda.empty_cache()
    return rows


def default_config(op, width, model=None) -> dict:
    from collider_kernels.triton import rotary, row_norms, rows

    if op == "rotary":
        return rotary.rotary_config(*ROTARY[model][:2])
    if op in ("rms_norm", "layer_norm"):
        return row_norms.norm_config(width)
    return rows.elementwise_config(width)


def sweep_configs(op, args, eps, idx, deadline, log) -> list[dict]:
    from collider_kernels.triton import gelu_new_backward, layer_norm_backward, rms_norm_backward, swiglu_backward

    def make_fn(cfg):
        if op == "rms_norm":
            return lambda: rms_norm_backward.launch_rms_norm_backward(*args, eps, idx, cfg)
        if op == "layer_norm":
            return lambda: layer_norm_backward.launch_layer_norm_backward(*args, eps, idx, cfg)
        if op == "gelu_new":
            return lambda: gelu_new_backward.launch_gelu_new_backward(*args, idx, cfg=cfg)
        return lambda: swiglu_backward.launch_swiglu_backward(*args, idx, cfg=cfg)

    configs = RMS_SWEEP if op in ("rms_norm", "layer_norm") else SWIGLU_SWEEP
    return time_configs(configs, make_fn, deadline, log, repeats=3, budget_ms=10.0)


def write_md(path, meta, rows):
    lines = [
        "# Row-wise backwards: fused Triton vs torch backend",
        "",
        f"GPU {meta['gpu']}; torch {meta['torch']}, triton {meta['triton']}; {meta['date']}; {meta['dtype']}.",
        f"{ROWS} token rows; keep 1.0 = dense gradient (no index), keep 0.6 = sorted random subset gathered "
        "by index. Median ms per call (CUDA events, back-to-back calls, 5 batches); GB/s = minimal traffic "
        "(inputs read once, outputs written once) / time.",
        "",
        "| op | model | width | keep | torch ms | triton ms | speedup | triton GB/s | max rel diff |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['op']} | {r['model']} | {r['width']} | {r['keep']:.1f} | {r['torch']['ms']:.3f} "
            f"| {r['triton']['ms']:.3f} | {r['speedup']:.2f} | {r['triton']['gb_per_s']:.0f} "
            f"| {r['triton']['max_rel_diff_vs_torch']:.1e} |"
        )
    lines += sweep_lines(rows, "Triton configurations at keep 0.6 (ms)",
                         [("op", lambda r: r["op"]), ("width", lambda r: str(r["width"]))], lambda r: r["triton"]["ms"])
    lines.append("")
    with open(path, "w") as f:
        f.write("\n".join(lines))


def main() -> None:
    ap = row_bench_parser(__doc__.splitlines()[0], "rowwise_h200", budget_s=50.0)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_rowwise.py needs a CUDA GPU")
    t0 = time.time()
    meta = environment(args.dtype, ROWS, OPS.values())
    print(json.dumps(meta), flush=True)
    rows = bench(DTYPES[args.dtype], args.sweep, t0 + args.budget_s, lambda m: print(m, flush=True))
    save_results(args.out, meta, rows, write_md)
    print(f"wrote {args.out}.json and {args.out}.md in {time.time() - t0:.0f}s", flush=True)


if __name__ == "__main__":
    main()
