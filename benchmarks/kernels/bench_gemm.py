"""Benchmark the gather-GEMM and gathered weight-gradient GEMM backends on the model shapes.

For every linear layer of TinyLlama-1.1B, Qwen2.5-1.5B and Phi-1.5 (identical shapes measured once),
with 16384 token rows and keep ratios 1.0/0.8/0.6/0.4 (index = sorted random subset), times in bf16:

* ``triton``: the fused Triton kernel (gather inside the tile loads);
* ``cupy``: raw-kernel gather + cuBLAS gemmEx through CuPy;
* ``index_select+mm``: the torch backend (gather copy, then torch.mm);
* ``cublas_compact``: torch.mm on the pre-gathered compact matrix (the roofline: no gather at all).

Two timings per call, both with CUDA events, warm-up and the median of batches: ``eager`` queues the
calls back to back from Python (host launch cost included: it bounds the narrow shapes), ``graph``
replays them captured in a CUDA graph (device time only: the kernels themselves; not for CuPy).
Also times the embedding-gradient scatter-add. Writes ``<out>/gemm_h200.json`` (after every model)
and ``<out>/gemm_h200.md``; with ``--merge`` the rows of other kept shares already in
``<out>/gemm_h200.json`` are kept (their run's meta is recorded), so ``--keeps 0.6 --merge`` re-times
one share.

Usage: ``python benchmarks/kernels/bench_gemm.py [--out DIR] [--quick] [--keeps 1.0 0.6 ...] [--merge]``
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import sys
import time

import torch
from common import TOKENS, rel_err

import collider_kernels as ck
from collider_kernels.timing import median_ms

KEEPS = (1.0, 0.8, 0.6, 0.4)
# (model, {layer names: (out_features N, in_features K)}); identical shapes are grouped.
MODELS = {
    "TinyLlama-1.1B": {
        "q,o": (2048, 2048), "k,v": (256, 2048), "gate,up": (5632, 2048),
        "down": (2048, 5632), "lm_head": (32000, 2048),
    },
    "Qwen2.5-1.5B": {
        "q,o": (1536, 1536), "k,v": (256, 1536), "gate,up": (8960, 1536),
        "down": (1536, 8960), "lm_head": (151936, 1536),
    },
    "Phi-1.5": {
        "q,k,v,o": (2048, 2048), "fc1": (8192, 2048), "fc2": (2048, 8192), "lm_head": (51200, 2048),
    },
}
VOCAB = {"TinyLlama-1.1B": (32000, 2048), "Qwen2.5-1.5B": (151936, 1536), "Phi-1.5": (51200, 2048)}


def bench_gemms(backends: list[str], log, save) -> list[dict]:
    rows = []
    gen = torch.Generator(device="cuda").manual_seed(0)
    for model, layers in MODELS.items():
        for names, (N, K) in layers.items():
            x = torch.randn(TOKENS, K, device="cuda", dtype=torch.bfloat16, generator=gen)
            w = torch.randn(N, K, device="cuda", dtype=torch.bfloat16, generator=gen) * K**-0.5
            for keep in KEEPS:
                n = int(round(keep * TOKENS))
                idx = torch.randperm(TOKENS, device="cuda", generator=gen)[:n].sort().values
                xc = x.index_select(0, idx)  # (n, K) the compact matrix
                g = torch.randn(n, N, device="cuda", dtype=torch.bfloat16, generator=gen)
                flops = 2.0 * n * N * K
                for op in ("gather_matmul", "weight_grad"):
                    if op == "gather_matmul":
                        fns = {
                            "cublas_compact": lambda: torch.mm(xc, w.t()),
                            "index_select+mm": lambda: ck.gather_matmul(x, idx, w, backend="torch", validate=False),
                        }
                        for b in backends:
                            fns[b] = (lambda b=b: ck.gather_matmul(x, idx, w, backend=b, validate=False))
                    else:
                        fns = {
                            "cublas_compact": lambda: torch.mm(g.t(), xc),
                            "index_select+mm": lambda: ck.gathered_weight_grad(
                                g, x, idx, backend="torch", validate=False
                            ),
                        }
                        for b in backends:
                            fns[b] = (lambda b=b: ck.gathered_weight_grad(g, x, idx, backend=b, validate=False))
                    truth = fns["cublas_compact"]()
                    row = {"model": model, "layers": names, "N": N, "K": K, "keep": keep, "n": n, "op": op}
                    for name, fn in fns.items():
                        try:
                            out = fn()
                            err = rel_err(out, truth)
                            del out
                            ms = median_ms(fn)
                            row[name] = {"ms": ms, "tflops": flops / ms / 1e9, "rel_err_vs_cublas": err}
                        except Exception as e:  # a failing backend is reported, not fatal
                            row[name] = {"error": f"{type(e).__name__}: {e}"[:300]}
                            continue
                        if name == "cupy":  # CuPy's own cuBLAS handle is not captured here
                            continue
                        try:
                            gms = median_ms(fn, graph=True)
                            row[name].update(graph_ms=gms, graph_tflops=flops / gms / 1e9)
                        except Exception as e:
                            row[name]["graph_error"] = f"{type(e).__name__}: {e}"[:300]
                    del truth
                    rows.append(row)
                    log(_fmt_row(row, backends))
            torch.cuda.empty_cache()
        save(rows)
    return rows


def _fmt_row(row, backends) -> str:
    cells = []
    for name in ("cublas_compact", "index_select+mm", *backends):
        r = row.get(name, {})
        cells.append(f"{name}={r['tflops']:.0f}/{r.get('graph_tflops', float('nan')):.0f}"
                     if "tflops" in r else f"{name}=ERR")
    return f"{row['model']:15s} {row['layers']:8s} {row['op']:13s} keep={row['keep']:.1f} " + " ".join(cells)


def check_accumulate_tuned(log) -> dict:
    """The autotuned weight-gradient kernel adds into ``out`` exactly once (trials restore it)."""
    res = {}
    for N, K, n in ((256, 1536, 9830), (2048, 2048, 9830)):
        x = torch.randn(TOKENS, K, device="cuda", dtype=torch.bfloat16)
        idx = torch.randperm(TOKENS, device="cuda")[:n].sort().values
        g = torch.randn(n, N, device="cuda", dtype=torch.bfloat16)
        init = torch.randn(N, K, device="cuda")
        buf = init.clone()
        ck.gathered_weight_grad(g, x, idx, out=buf, backend="triton")
        ref = init + g.float().t() @ x[idx].float()
        err = rel_err(buf, ref)
        res[f"{N}x{K}x{n}"] = err
        log(f"accumulate-into-out check (tuned) N={N} K={K} n={n}: rel err {err:.2e}")
    return res


def bench_scatter(backends: list[str], log) -> list[dict]:
    """Embedding gradient: scatter-add kept rows (bf16) into an fp32 (vocab, hidden) buffer."""
    rows = []
    for model, (V, H) in VOCAB.items():
        n = int(0.6 * TOKENS)
        src = torch.randn(n, H, device="cuda", dtype=torch.bfloat16)
        tok = torch.randint(0, V, (n,), device="cuda")
        out = torch.zeros(V, H, device="cuda")
        row = {"model": model, "vocab": V, "hidden": H, "n": n}
        variants = {"torch": ("torch", False), "torch_det": ("torch", True)}
        for b in backends:
            variants[b] = (b, False)
            variants[b + "_det"] = (b, True)
        for name, (b, det) in variants.items():
            try:
                ms = median_ms(lambda b=b, det=det: ck.scatter_add_rows(
                    src, tok, out=out, deterministic=det, backend=b, validate=False))
                row[name] = {"ms": ms}
            except Exception as e:
                row[name] = {"error": f"{type(e).__name__}: {e}"[:300]}
        rows.append(row)
        log(f"scatter {model}: " + " ".join(f"{k}={v.get('ms', float('nan')):.3f}ms" for k, v in row.items()
                                             if isinstance(v, dict)))
    return rows


def geomean(xs):
    xs = [x for x in xs if x and x > 0]
    return math.exp(sum(math.log(x) for x in xs) / len(xs)) if xs else float("nan")


def summarize(rows, backends):
    """Ratios vs cuBLAS-on-compact and vs index_select+mm, and the fastest backend per op."""
    summary = {}
    for op in ("gather_matmul", "weight_grad"):
        for b in backends:
            for keep in sorted({r["keep"] for r in rows}, reverse=True):
                for metric in ("tflops", "graph_tflops"):
                    sel = [r for r in rows if r["op"] == op and r["keep"] == keep and metric in r.get(b, {})
                           and metric in r["cublas_compact"] and metric in r["index_select+mm"]]
                    if not sel:
                        continue
                    vs_cublas = [r[b][metric] / r["cublas_compact"][metric] for r in sel]
                    vs_isel = [r[b][metric] / r["index_select+mm"][metric] for r in sel]
                    summary[f"{op}/{b}/keep{keep}/{'graph' if metric == 'graph_tflops' else 'eager'}"] = {
                        "min_vs_cublas_compact": min(vs_cublas), "geomean_vs_cublas_compact": geomean(vs_cublas),
                        "min_vs_index_select_mm": min(vs_isel), "geomean_vs_index_select_mm": geomean(vs_isel),
                    }
        # Fastest public backend per op (geomean time over all shapes and keeps).
        best = {}
        for b in ("index_select+mm", *backends):
            sel = [r[b]["ms"] for r in rows if r["op"] == op and "ms" in r.get(b, {})]
            if len(sel) == len([r for r in rows if r["op"] == op]):
                best[b] = geomean(sel)
        summary[f"{op}/geomean_ms"] = best
    return summary


def write_md(path, meta, rows, summary, scatter, backends):
    merged = meta.get("merged_from")
    lines = [
        "# Gather-GEMM and weight-gradient GEMM on the model shapes",
        "",
        f"GPU {meta['gpu']}; torch {meta['torch']}, triton {meta['triton']}, cupy {meta['cupy']}; {meta['date']}"
        + (f" (keep {', '.join(map(str, meta['keeps']))}; the other shares from the run of {merged['date']},"
           f" triton {merged['triton']})." if merged else "."),
        f"{TOKENS} token rows, bf16, index = sorted random subset; TFLOP/s = 2·n·N·K / time per call, "
        "median of 5 batches. Each cell is **eager / graph**: eager queues the calls back to back from "
        "Python (host launch cost included), graph replays them from a CUDA graph (device time only).",
        "cuBLAS-compact = torch.mm on the pre-gathered matrix (no gather: the roofline). Triton = the "
        "descriptor (TMA) kernels where rows are 16-byte aligned, else the pointer kernel; kernel family, "
        "tile and reduction split are timed per shape on first use (CUDA-graph replay).",
        "",
        "## keep 0.6 (TFLOP/s, eager / graph; ratios of Triton)",
        "",
        "| model | layers | N×K | op | Triton | CuPy | index_select+mm | cuBLAS-compact "
        "| Triton/cuBLAS-compact | Triton/index_select+mm |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]

    def tf(r, k):
        c = r.get(k, {})
        if "tflops" not in c:
            return "err"
        if "graph_tflops" in c:
            return f"{c['tflops']:.0f} / {c['graph_tflops']:.0f}"
        return f"{c['tflops']:.0f} / " + ("err" if "graph_error" in c else "–")  # CuPy: not captured

    def ratio(r, a, b):
        out = []
        for m in ("tflops", "graph_tflops"):
            x, y = r.get(a, {}).get(m), r.get(b, {}).get(m)
            out.append(f"{x / y:.2f}" if x and y else "–")
        return " / ".join(out)

    for r in rows:
        if r["keep"] != 0.6:
            continue
        lines.append(
            f"| {r['model']} | {r['layers']} | {r['N']}×{r['K']} | {r['op']} | {tf(r, 'triton')} | {tf(r, 'cupy')} "
            f"| {tf(r, 'index_select+mm')} | {tf(r, 'cublas_compact')} | {ratio(r, 'triton', 'cublas_compact')} "
            f"| {ratio(r, 'triton', 'index_select+mm')} |"
        )
    lines += ["", "## Ratios per keep (min / geomean over shapes)", "",
              "| op | backend | keep | timing | vs cuBLAS-compact | vs index_select+mm |", "|---|---|---|---|---|---|"]
    for key, v in summary.items():
        if "/keep" not in key:
            continue
        op, b, keep, timing = key.split("/")
        lines.append(
            f"| {op} | {b} | {keep[4:]} | {timing} | {v['min_vs_cublas_compact']:.2f} / "
            f"{v['geomean_vs_cublas_compact']:.2f} | {v['min_vs_index_select_mm']:.2f} / "
            f"{v['geomean_vs_index_select_mm']:.2f} |"
        )
    lines += ["", "## Geomean eager time per op (ms, all shapes and keeps)", ""]
    for op in ("gather_matmul", "weight_grad"):
        best = summary.get(f"{op}/geomean_ms", {})
        lines.append(f"- {op}: " + ", ".join(f"{k} {v:.3f}" for k, v in sorted(best.items(), key=lambda kv: kv[1])))
    if scatter:
        lines += ["", "## Embedding-gradient scatter-add (keep 0.6, bf16 rows into fp32, ms)", "",
                  "| model | vocab×hidden | " + " | ".join(k for k in scatter[0] if isinstance(scatter[0][k], dict))
                  + " |", "|---|---|" + "---|" * sum(isinstance(v, dict) for v in scatter[0].values())]
        for r in scatter:
            cells = [f"{v['ms']:.3f}" if "ms" in v else "err" for v in r.values() if isinstance(v, dict)]
            lines.append(f"| {r['model']} | {r['vocab']}×{r['hidden']} | " + " | ".join(cells) + " |")
    lines.append("")
    with open(path, "w") as f:
        f.write("\n".join(lines))


def merge_rows(new_rows: list[dict], old_rows: list[dict]) -> list[dict]:
    """``new_rows`` plus the ``old_rows`` of kept shares not in ``new_rows``, in model, layer, keep order."""
    new_keeps = {r["keep"] for r in new_rows}
    rows = new_rows + [r for r in old_rows if r["keep"] not in new_keeps]
    models = list(MODELS)
    layers = {m: list(v) for m, v in MODELS.items()}
    return sorted(rows, key=lambda r: (models.index(r["model"]), layers[r["model"]].index(r["layers"]), -r["keep"],
                                       r["op"] != "gather_matmul"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "results"))
    ap.add_argument("--quick", action="store_true", help="one model, keep 0.6 only (smoke run)")
    ap.add_argument("--keeps", type=float, nargs="+", default=None, help="kept shares to time (default: all)")
    ap.add_argument("--merge", action="store_true", help="keep the other shares' rows of the existing results")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    result_path = os.path.join(args.out, "gemm_h200.json")
    earlier = None
    if args.merge and os.path.exists(result_path):
        with open(result_path) as f:
            earlier = json.load(f)
    log_file = open(os.path.join(args.out, "bench_gemm.log"), "a")

    def log(msg):
        print(msg, flush=True)
        log_file.write(msg + "\n")
        log_file.flush()

    global KEEPS, MODELS
    if args.keeps:
        KEEPS = tuple(args.keeps)
    if args.quick:
        KEEPS = (0.6,)
        MODELS = {"TinyLlama-1.1B": MODELS["TinyLlama-1.1B"]}
    import triton

    try:
        import cupy

        cupy_version = cupy.__version__
    except ImportError:
        cupy_version = "not installed"
    backends = [b for b in ("triton", "cupy") if b in ck.available_backends("gather_matmul", "cuda")]
    meta = {
        "gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
        "cupy": cupy_version, "date": datetime.date.today().isoformat(), "tokens": TOKENS,
        "dtype": "bfloat16", "backends": backends, "python": sys.version.split()[0], "keeps": KEEPS,
    }
    if earlier is not None:
        meta["merged_from"] = earlier["meta"]
    log(json.dumps(meta))
    t0 = time.time()
    acc = check_accumulate_tuned(log) if "triton" in backends else {}

    def save(rows, scatter=()):
        if earlier is not None:
            rows = merge_rows(rows, earlier["gemm"])
        summary = summarize(rows, backends)
        result = {"meta": meta, "accumulate_check_rel_err": acc, "gemm": rows, "scatter": list(scatter),
                  "summary": summary}
        with open(result_path, "w") as f:
            json.dump(result, f, indent=1)
        write_md(os.path.join(args.out, "gemm_h200.md"), meta, rows, summary, list(scatter), backends)
        return summary

    rows = bench_gemms(backends, log, save)
    scatter = bench_scatter(backends, log)
    summary = save(rows, scatter)
    log(f"done in {time.time() - t0:.0f}s")
    for k, v in summary.items():
        log(f"{k}: {json.dumps(v)}")


if __name__ == "__main__":
    main()
