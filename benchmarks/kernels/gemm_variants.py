"""Compare the Triton GEMM kernel families on key model shapes (device script, one call).

For each shape, keep 0.6 and 1.0 (16384 token rows, sorted random index; at keep 1.0 the identity
index), both ops, bf16: cuBLAS on the compact matrix, index_select+mm, the pointer-load kernel
(tuned) and the descriptor kernel (tuned; at keep 0.6 also every candidate). Checks each result
against cuBLAS-compact before timing. Writes ``<out>/gemm_variants.json``; prints a table last.

Other modes: ``--profile`` (kernel and host time of the weight gradient), ``--candidates`` (every
candidate of both ops on the narrow shapes, CUDA-graph replay) and ``--ncu-targets`` (one
cuBLAS-compact and one tuned Triton weight gradient per narrow shape inside
``torch.cuda.profiler`` start/stop, for ``ncu --profile-from-start off --clock-control none``).

Usage: ``python benchmarks/kernels/gemm_variants.py [--out DIR] [--profile | --candidates | --ncu-targets]``
"""

from __future__ import annotations

import argparse
import json
import os

import torch
from common import TOKENS, rel_err

import collider_kernels as ck
from collider_kernels import tuning
from collider_kernels.timing import median_ms
from collider_kernels.triton import gather_matmul as tgm
from collider_kernels.triton import gathered_weight_grad as twg
from collider_kernels.triton import gemm, settings

SHAPES = {  # name: (N out, K in)
    "TL q,o": (2048, 2048), "TL k,v": (256, 2048), "TL gate,up": (5632, 2048), "TL down": (2048, 5632),
    "Qw q,o": (1536, 1536), "Qw k,v": (256, 1536), "TL lm_head": (32000, 2048),
}


def cfg_name(c):
    s = f"{c['BLOCK_M']}x{c['BLOCK_N']}x{c['BLOCK_K']}s{c['num_stages']}w{c['num_warps']}"
    if c.get("PERSIST"):
        s += "p"
    if c.get("SPLIT_K", 1) > 1:
        s += f"k{c['SPLIT_K']}" + ("a" if c.get("SPLIT_MODE") == "atomic" else "")
    if c.get("STREAM_K"):
        s += "sk"
    return s


def problem(N: int, K: int, keep: float = 0.6, gen=None):
    """bf16 ``(x (TOKENS, K), w (N, K), idx (n,) sorted, xc = x[idx], g (n, N))`` of one layer shape."""
    x = torch.randn(TOKENS, K, device="cuda", dtype=torch.bfloat16, generator=gen)
    w = torch.randn(N, K, device="cuda", dtype=torch.bfloat16, generator=gen) * K**-0.5
    n = int(round(keep * TOKENS))
    idx = torch.randperm(TOKENS, device="cuda", generator=gen)[:n].sort().values
    g = torch.randn(n, N, device="cuda", dtype=torch.bfloat16, generator=gen)
    return x, w, idx, x.index_select(0, idx), g


def ncu_targets():
    """One cuBLAS-compact and fixed Triton weight-gradient configs per narrow shape between
    ``torch.cuda.profiler.start()`` and ``stop()`` (fixed, since tuning under ncu is distorted)."""
    configs = {  # (N, K): Triton configs (the best of ``--candidates`` on the H200, and the unsplit tile)
        (1536, 1536): [gemm.tile_config(256, 128, 64, 4, 8, PERSIST=True, SPLIT_K=1, STREAM_K=True),
                       gemm.tile_config(256, 128, 64, 4, 8, PERSIST=True, SPLIT_K=1)],
        (256, 1536): [gemm.tile_config(128, 128, 64, 4, 8, PERSIST=True, SPLIT_K=5, SPLIT_MODE="partial")],
    }
    calls = []
    for (N, K), cfgs in configs.items():
        x, _, idx, xc, g = problem(N, K)
        dw = torch.empty(N, K, device="cuda", dtype=torch.bfloat16)
        calls.append(lambda g=g, xc=xc: torch.mm(g.t(), xc))
        for c in cfgs:
            print(f"ncu target: wgrad N={N} K={K} n={idx.shape[0]} {cfg_name(c)}", flush=True)
            calls.append(lambda g=g, x=x, idx=idx, dw=dw, c=c: twg.gathered_weight_grad_into(
                g, x, idx, dw, False, cfg={**c, "DESC": True}))
    for fn in calls:  # compile outside the profiled range
        fn()
    torch.cuda.synchronize()
    torch.cuda.profiler.start()
    for fn in calls:
        fn()
    torch.cuda.synchronize()
    torch.cuda.profiler.stop()


def profile_wgrad():
    """Per-kernel device time and host time per call of the weight gradient on three shapes."""
    import time

    from torch.profiler import ProfilerActivity, profile

    for N, K in ((256, 2048), (2048, 2048), (2048, 5632)):
        x, _, idx, _, g = problem(N, K)
        n = idx.shape[0]
        for path in ("desc", "pointer"):
            tuning.clear("gathered_weight_grad")
            twg.gathered_weight_grad_into(g, x, idx, torch.empty(N, K, device="cuda", dtype=torch.bfloat16),
                                           False, path=path)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(20):
                twg.gathered_weight_grad_into(g, x, idx, torch.empty(N, K, device="cuda", dtype=torch.bfloat16),
                                               False, path=path)
            host = (time.perf_counter() - t0) / 20 * 1e3
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                for _ in range(5):
                    twg.gathered_weight_grad_into(g, x, idx, torch.empty(N, K, device="cuda", dtype=torch.bfloat16),
                                                   False, path=path)
                torch.cuda.synchronize()
            cfg = [c for k, c in tuning.cache("gathered_weight_grad").items() if k[0] == path]  # key: path first
            print(f"profile wgrad N={N} K={K} n={n} {path} cfg={cfg_name(cfg[0]) if cfg else '?'} "
                  f"host {host:.3f} ms/call", flush=True)
            for ev in prof.key_averages():
                if ev.device_time_total > 0:
                    print(f"   {ev.key[:60]:60s} n={ev.count} avg {ev.device_time_total / ev.count:.1f} us")


def candidates_graph():
    """Device time (CUDA-graph replay) of every candidate of both ops on the narrow shapes."""
    for N, K in ((1536, 1536), (256, 1536), (256, 2048)):
        x, w, idx, xc, g = problem(N, K)
        n = idx.shape[0]
        y = torch.empty(n, N, device="cuda", dtype=torch.bfloat16)
        dw = torch.empty(N, K, device="cuda", dtype=torch.bfloat16)
        flops = 2.0 * n * N * K
        sms = settings.num_sms(x.device)
        ops = {
            "fwd": (lambda: torch.mm(xc, w.t()),
                    tuning.candidates("gather_matmul", N),
                    lambda c: tgm.gather_matmul_into(x, idx, w, None, y, cfg=c)),
            "wgrad": (lambda: torch.mm(g.t(), xc),
                      tuning.candidates("gathered_weight_grad", N, K, n, sms, pointer=False, deterministic=False),
                      lambda c: twg.gathered_weight_grad_into(g, x, idx, dw, False, cfg=c)),
        }
        for op, (cublas, cands, run) in ops.items():
            ms = median_ms(cublas, graph=True)
            print(f"{op} N={N} K={K} n={n}: cuBLAS-compact {ms * 1e3:.1f} us ({flops / ms / 1e9:.0f} TFLOP/s)")
            res = []
            for c in cands:
                try:
                    ms = median_ms(lambda c=c: run(c), graph=True)
                    res.append((ms, ("desc " if c["DESC"] else "ptr ") + cfg_name(c)))
                except Exception as e:
                    res.append((float("inf"), f"{cfg_name(c)} {type(e).__name__}"))
            for ms, name in sorted(res):
                print(f"   {name:26s} {ms * 1e3:7.1f} us {flops / ms / 1e9:5.0f} TFLOP/s", flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=".")
    ap.add_argument("--profile", action="store_true", help="only profile the weight gradient")
    ap.add_argument("--candidates", action="store_true",
                    help="only time every candidate of both ops on the narrow shapes (graph replay)")
    ap.add_argument("--ncu-targets", action="store_true",
                    help="only run the narrow weight gradients inside profiler start/stop (for ncu)")
    args = ap.parse_args()
    if args.ncu_targets:
        ncu_targets()
        return
    if args.profile:
        profile_wgrad()
        return
    if args.candidates:
        candidates_graph()
        return
    gen = torch.Generator(device="cuda").manual_seed(0)
    rows, table = [], []
    for name, (N, K) in SHAPES.items():
        for keep in (0.6, 1.0):
            x, w, idx, xc, g = problem(N, K, keep, gen)
            n = idx.shape[0]
            flops = 2.0 * n * N * K
            for op in ("fwd", "wgrad"):
                if op == "fwd":
                    truth = torch.mm(xc, w.t())
                    base = {"cublas": lambda: torch.mm(xc, w.t()),
                            "isel": lambda: ck.gather_matmul(x, idx, w, backend="torch", validate=False)}

                    def mk(path, cfg=None):
                        return lambda: tgm.gather_matmul_into(
                            x, idx, w, None, torch.empty(n, N, device="cuda", dtype=torch.bfloat16),
                            path=path, cfg=cfg)
                    cands = tuning.candidates("gather_matmul", N, pointer=False)
                else:
                    truth = torch.mm(g.t(), xc)
                    base = {"cublas": lambda: torch.mm(g.t(), xc),
                            "isel": lambda: ck.gathered_weight_grad(g, x, idx, backend="torch", validate=False)}

                    def mk(path, cfg=None):
                        return lambda: twg.gathered_weight_grad_into(
                            g, x, idx, torch.empty(N, K, device="cuda", dtype=torch.bfloat16), False,
                            path=path, cfg=cfg)
                    cands = tuning.candidates("gathered_weight_grad", N, K, n, settings.num_sms(x.device),
                                              pointer=False)
                fns = {**base, "pointer": mk("pointer"), "desc": mk("desc"),
                       "public": (lambda: ck.gather_matmul(x, idx, w, backend="triton", validate=False))
                       if op == "fwd" else (lambda: ck.gathered_weight_grad(g, x, idx, backend="triton",
                                                                             validate=False))}
                row = {"shape": name, "N": N, "K": K, "keep": keep, "op": op}
                for k, fn in fns.items():
                    try:
                        err = rel_err(fn(), truth)
                        ms = median_ms(fn)
                        row[k] = {"ms": ms, "tflops": flops / ms / 1e9, "err": err}
                    except Exception as e:
                        row[k] = {"error": f"{type(e).__name__}: {e}"[:200]}
                kernel = "gather_matmul" if op == "fwd" else "gathered_weight_grad"
                key_desc = [c for kk, c in tuning.cache(kernel).items()  # key: (path, N, K, rows bucket, ...)
                            if kk[1] == N and kk[2] == K and kk[3] == n.bit_length()]
                row["desc_choice"] = cfg_name(key_desc[0]) if key_desc else "?"
                if keep == 0.6:
                    cand_times = []
                    for c in cands:
                        try:
                            fn = mk("desc", c)
                            err = rel_err(fn(), truth)
                            ms = median_ms(fn, budget_ms=8.0)
                            cand_times.append((ms, cfg_name(c), err))
                        except Exception as e:
                            cand_times.append((float("inf"), cfg_name(c) + f" {type(e).__name__}", float("nan")))
                    cand_times.sort()
                    row["candidates"] = cand_times
                rows.append(row)

                def tf(k, row=row):
                    return row[k].get("tflops", float("nan"))
                errs = max(row[k].get("err", float("nan")) for k in ("pointer", "desc", "public"))
                best = row.get("candidates", [(float("nan"), "-", 0)])[0]
                line = (f"{name:11s} {op:5s} {keep:.1f} cub {tf('cublas'):4.0f} isel {tf('isel'):4.0f} "
                        f"ptr {tf('pointer'):4.0f} desc {tf('desc'):4.0f} pub {tf('public'):4.0f} "
                        f"d/cub {tf('desc') / tf('cublas'):.2f} d/isel {tf('desc') / tf('isel'):.2f} "
                        f"err {errs:.1e} pick {row['desc_choice']} best {best[1]} {flops / best[0] / 1e9:.0f}")
                print(line, flush=True)
                for k in fns:
                    if "error" in row[k]:
                        print("  ", k, row[k]["error"], flush=True)
                table.append(line)
        torch.cuda.empty_cache()
    with open(os.path.join(args.out, "gemm_variants.json"), "w") as f:
        json.dump(rows, f, indent=1)
    print("\n== summary (TFLOP/s) ==")
    print("\n".join(table))


if __name__ == "__main__":
    main()
