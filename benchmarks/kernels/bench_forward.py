"""Benchmark the fused Triton forward kernels against their op-by-op torch versions.

At the shapes of TinyLlama-1.1B, Qwen2.5-1.5B and Phi-1.5 with 16384 token rows (B=8, T=2048), in
bf16 by default:

* ``rms_norm_forward`` at hidden 2048 and 1536 (Phi-1.5 uses LayerNorm);
* ``swiglu_forward`` at intermediate 5632 and 8960, gate and up the column halves of one fused
  (rows, 2I) projection, and ``swiglu_backward(with_output=True)`` (dense, all rows) beside it;
* ``rotary_forward`` on the query and key heads, each a strided head slice of a fused q/k/v
  projection viewed as (rows, heads, head dim); Phi-1.5 rotates 32 of its 64 dims;
* ``cross_entropy_forward`` and ``cross_entropy_backward`` (Triton in place over the logits, as an
  LM head's backward uses it) at vocabularies 32000, 151936 and 51200.

The torch backend of each op is its op-by-op torch version. Each call is timed with
:func:`collider_kernels.timing.median_ms` twice: ``eager`` (calls queued back to back from Python,
host launch cost included) and ``graph`` (CUDA-graph replays: device time only). GB/s is the
minimal traffic (each input read once, each output written once) over the graph time. With
``--sweep`` it also times alternative Triton block configurations of each case (graph time,
stopping at a time budget).

Writes ``<out>.json`` and ``<out>.md``.

Usage: ``python benchmarks/kernels/bench_forward.py [--out STEM] [--dtype bf16|fp16|fp32] [--sweep]``
"""

from __future__ import annotations

import json
import time

import torch
from common import DTYPES, TOKENS, environment, max_rel_diff, row_bench_parser, save_results, sweep_lines, time_configs

import collider_kernels as ck
from collider_kernels.timing import median_ms

DEVICE = "cuda"
SEQ = 2048
# Model shapes: hidden, intermediate, (q heads, kv heads, head dim, rotated dims), vocabulary, eps.
MODELS = {
    "TinyLlama-1.1B": {"hidden": 2048, "inter": 5632, "heads": (32, 4, 64, 64), "vocab": 32000, "eps": 1e-5},
    "Qwen2.5-1.5B": {"hidden": 1536, "inter": 8960, "heads": (12, 2, 128, 128), "vocab": 151936, "eps": 1e-6},
    "Phi-1.5": {"hidden": 2048, "inter": None, "heads": (32, 32, 64, 32), "vocab": 51200, "eps": None},
}
OPS = ("rms_norm_forward", "swiglu_forward", "swiglu_backward", "rotary_forward", "cross_entropy_forward",
       "cross_entropy_backward")
SWEEPS = {
    "rms_norm_forward": [{"block_r": r, "num_warps": w} for r in (1, 2, 4) for w in (4, 8, 16)],
    "swiglu_forward": [{"block_r": r, "block_i": i, "num_warps": w}
                       for r, i, w in ((1, 1024, 4), (2, 1024, 4), (4, 1024, 8), (8, 512, 4), (8, 1024, 8))],
    "rotary_forward": [{"block_r": r, "block_hd": h, "num_warps": w}
                       for r, h, w in ((1, 16, 4), (2, 16, 4), (8, 16, 8), (8, 4, 4), (16, 2, 4), (32, 1, 4))],
    "cross_entropy": [{"block_v": v, "num_warps": w}
                      for v, w in ((1024, 4), (2048, 4), (4096, 4), (8192, 8), (8192, 16), (16384, 16), (32768, 32))],
}


def nbytes(dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def cases(dtype, gen):
    """Yield one case per (op, model, shape): a dict with the op's torch and Triton calls, the
    Triton launcher taking a config (for the sweep), its sweep and its minimal traffic in bytes."""
    from collider_kernels.triton import (
        cross_entropy_backward,
        cross_entropy_forward,
        rms_norm_forward,
        rotary_forward,
        swiglu_forward,
    )

    s, n = nbytes(dtype), TOKENS
    for model, m in MODELS.items():
        if m["eps"] is not None:
            H = m["hidden"]
            x = torch.randn(n, H, device=DEVICE, generator=gen).to(dtype)  # (n, H)
            w = (1 + 0.1 * torch.randn(H, device=DEVICE, generator=gen)).to(dtype)
            yield {"op": "rms_norm_forward", "model": model, "shape": f"{n}x{H}", "traffic": 2 * n * H * s,
                   "call": lambda b, x=x, w=w, eps=m["eps"]: ck.rms_norm_forward(x, w, eps, backend=b),
                   "launch": lambda cfg, x=x, w=w, eps=m["eps"]: rms_norm_forward.launch_rms_norm_forward(
                       x, w, eps, cfg), "sweep": SWEEPS["rms_norm_forward"]}
        if m["inter"] is not None:
            I = m["inter"]
            both = (3 * torch.randn(n, 2 * I, device=DEVICE, generator=gen)).to(dtype)  # (n, 2I) fused gate|up
            gate, up = both[:, :I], both[:, I:]
            yield {"op": "swiglu_forward", "model": model, "shape": f"{n}x{I} (fused gate|up)",
                   "traffic": 3 * n * I * s,
                   "call": lambda b, g=gate, u=up: ck.swiglu_forward(g, u, backend=b),
                   "launch": lambda cfg, g=gate, u=up: swiglu_forward.launch_swiglu_forward(g, u, cfg),
                   "sweep": SWEEPS["swiglu_forward"]}
            grad = torch.randn(n, I, device=DEVICE, generator=gen).to(dtype)
            yield {"op": "swiglu_backward", "model": model, "shape": f"{n}x{I} with_output",
                   "traffic": 6 * n * I * s,
                   "call": lambda b, g=gate, u=up, d=grad: ck.swiglu_backward(
                       d, g, u, with_output=True, backend=b, validate=False),
                   "without_output": lambda g=gate, u=up, d=grad: ck.swiglu_backward(
                       d, g, u, backend="triton", validate=False)}
            del both, grad
        hq, hkv, D, R = m["heads"]
        qkv = torch.randn(n, hq + 2 * hkv, D, device=DEVICE, generator=gen).to(dtype)  # fused projection
        angles = torch.arange(SEQ, device=DEVICE)[:, None] * torch.rand(R // 2, device=DEVICE, generator=gen)
        emb = torch.cat([angles, angles], dim=-1)  # (T, R)
        cos, sin = emb.cos().to(dtype), emb.sin().to(dtype)
        pos = torch.arange(n, device=DEVICE) % SEQ
        for part, sl in (("q", slice(0, hq)), ("k", slice(hq, hq + hkv))):
            x = qkv[:, sl]  # (n, heads, D) strided view
            heads = x.shape[1]
            yield {"op": "rotary_forward", "model": model, "shape": f"{part}: {n}x{heads}x{D}, R={R}",
                   "traffic": 2 * n * heads * D * s,
                   "call": lambda b, x=x, c=cos, si=sin, p=pos: ck.rotary_forward(x, c, si, p, backend=b,
                                                                                 validate=False),
                   "launch": lambda cfg, x=x, c=cos, si=sin, p=pos: rotary_forward.launch_rotary_forward(
                       x, c, si, p, cfg), "sweep": SWEEPS["rotary_forward"]}
        V = m["vocab"]
        logits = (4 * torch.randn(n, V, device=DEVICE, generator=gen)).to(dtype)  # (n, V)
        labels = torch.randint(0, V, (n,), device=DEVICE, generator=gen)
        labels[torch.rand(n, device=DEVICE, generator=gen) < 0.05] = -100
        yield {"op": "cross_entropy_forward", "model": model, "shape": f"{n}x{V}", "traffic": n * V * s + 8 * n,
               "call": lambda b, lg=logits, lb=labels: ck.cross_entropy_forward(lg, lb, backend=b, validate=False),
               "launch": lambda cfg, lg=logits, lb=labels: cross_entropy_forward.launch_cross_entropy_forward(
                   lg, lb, -100, cfg), "sweep": SWEEPS["cross_entropy"], "big": True}
        _, lse = ck.cross_entropy_forward(logits, labels, backend="torch", validate=False)
        scale = torch.full((n,), 1.0 / n, device=DEVICE)
        work = logits.clone()  # the Triton backward overwrites it call after call (in place)

        def ce_bwd(b, lg=logits, w=work, ls=lse, lb=labels, sc=scale):
            if b == "torch":  # op by op, into a new tensor
                return ck.cross_entropy_backward(lg, ls, lb, sc, backend="torch", validate=False)
            return ck.cross_entropy_backward(w, ls, lb, sc, out=w, backend=b, validate=False)

        yield {"op": "cross_entropy_backward", "model": model, "shape": f"{n}x{V} (triton in place)",
               "traffic": 2 * n * V * s, "call": ce_bwd, "fresh": lambda lg=logits, w=work: w.copy_(lg),
               "launch": lambda cfg, w=work, ls=lse, lb=labels, sc=scale:
               cross_entropy_backward.launch_cross_entropy_backward(w, ls, lb, sc, -100, w, cfg=cfg),
               "sweep": SWEEPS["cross_entropy"], "big": True}
        del logits, work, qkv


def time_call(fn, graph: bool, big: bool) -> dict:
    out = {"ms": median_ms(fn)}
    if graph:
        out["graph_ms"] = median_ms(fn, graph=True, calls=3 if big else 20)
    return out


def bench(dtype, graph: bool, sweep: bool, deadline: float, log) -> list[dict]:
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    rows = []
    for case in cases(dtype, gen):
        row = {k: case[k] for k in ("op", "model", "shape")}
        ref = case["call"]("torch")
        if "fresh" in case:
            case["fresh"]()
        got = case["call"]("triton")
        ref, got = (ref if isinstance(ref, tuple) else (ref,)), (got if isinstance(got, tuple) else (got,))
        row["max_rel_diff_vs_torch"] = max(max_rel_diff(a, b) for a, b in zip(got, ref, strict=True))
        row["bit_equal_share"] = min(((a == b).float().mean().item() for a, b in zip(got, ref, strict=True)))
        del ref, got
        torch.cuda.empty_cache()
        for backend in ("torch", "triton"):
            row[backend] = time_call(lambda b=backend: case["call"](b), graph, case.get("big", False))
            torch.cuda.empty_cache()
        if "without_output" in case:
            row["triton_without_output"] = time_call(case["without_output"], graph, False)
        key = "graph_ms" if graph else "ms"
        row["speedup"] = row["torch"][key] / row["triton"][key]
        row["triton_gb_per_s"] = case["traffic"] / 1e9 / row["triton"][key] * 1e3
        log(f"{row['op']:22s} {row['model']:15s} {row['shape']:32s} torch {row['torch'][key]:.3f} ms  "
            f"triton {row['triton'][key]:.3f} ms ({row['triton_gb_per_s']:.0f} GB/s)  x{row['speedup']:.2f}  "
            f"diff {row['max_rel_diff_vs_torch']:.1e}  equal {row['bit_equal_share']:.4f}")
        if sweep and "sweep" in case:
            row["sweep"] = sweep_configs(case, graph, deadline, log)
        rows.append(row)
    return rows


def sweep_configs(case, graph: bool, deadline: float, log) -> list[dict]:
    return time_configs(case["sweep"], lambda cfg: lambda: case["launch"](cfg), deadline, log, graph=graph,
                        calls=3 if case.get("big") else 20, repeats=3)


def write_md(path, meta, rows):
    key = "graph_ms" if meta["graph"] else "ms"
    lines = [
        "# Fused forward kernels: Triton vs op-by-op torch",
        "",
        f"GPU {meta['gpu']}; torch {meta['torch']}, triton {meta['triton']}; {meta['date']}; {meta['dtype']}; "
        f"{meta['rows']} token rows.",
        "Median ms per call over batches (collider_kernels.timing.median_ms): eager = calls queued back to back "
        "(host launch cost included), graph = CUDA-graph replays (device time). Speedup and GB/s (minimal traffic: "
        f"inputs read once, outputs written once) use the {'graph' if meta['graph'] else 'eager'} time. "
        "Equal = share of output elements bit-equal to the torch version.",
        "",
        "| op | model | shape | torch eager | triton eager | torch graph | triton graph | speedup | triton GB/s "
        "| max rel diff | equal |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]

    def fmt(t, k):
        return f"{t[k]:.3f}" if k in t else "-"

    for r in rows:
        lines.append(
            f"| {r['op']} | {r['model']} | {r['shape']} | {fmt(r['torch'], 'ms')} | {fmt(r['triton'], 'ms')} "
            f"| {fmt(r['torch'], 'graph_ms')} | {fmt(r['triton'], 'graph_ms')} | {r['speedup']:.2f} "
            f"| {r['triton_gb_per_s']:.0f} | {r['max_rel_diff_vs_torch']:.1e} | {r['bit_equal_share']:.4f} |")
    extra = [r for r in rows if "triton_without_output" in r]
    if extra:
        lines += ["", f"swiglu_backward: Triton with_output=True vs without ({key}):", ""]
        lines += [f"- {r['model']}: {r['triton'][key]:.3f} ms vs {r['triton_without_output'][key]:.3f} ms"
                  for r in extra]
    labels = [("op", lambda r: r["op"]), ("model", lambda r: r["model"]), ("shape", lambda r: str(r["shape"]))]
    lines += sweep_lines(rows, f"Triton configurations ({key})", labels, lambda r: r["triton"][key])
    lines.append("")
    with open(path, "w") as f:
        f.write("\n".join(lines))


def main() -> None:
    ap = row_bench_parser(__doc__.splitlines()[0], "forward_h200", budget_s=120.0)
    ap.add_argument("--no-graph", action="store_true", help="eager timing only (no CUDA-graph device time)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_forward.py needs a CUDA GPU")
    t0 = time.time()
    meta = {**environment(args.dtype, TOKENS, OPS), "graph": not args.no_graph}
    print(json.dumps(meta), flush=True)
    rows = bench(DTYPES[args.dtype], not args.no_graph, args.sweep, t0 + args.budget_s,
                 lambda msg: print(msg, flush=True))
    save_results(args.out, meta, rows, write_md)
    print(f"wrote {args.out}.json and {args.out}.md in {time.time() - t0:.0f}s", flush=True)


if __name__ == "__main__":
    main()
