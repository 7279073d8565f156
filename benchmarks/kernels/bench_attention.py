"""Benchmark: Triton masked attention backward vs PyTorch's dense flash-attention backward.

Shapes: the attention layers of TinyLlama-1.1B (Hq=32, Hkv=4, D=64), Qwen2.5-1.5B (12/2/128) and
Phi-1.5 (32/32/64) at B=8, T=2048, bf16; kept fractions 1.0/0.8/0.6/0.4, each sequence keeping a
random subset of exactly round(keep*T) positions.

What is timed (``collider_kernels.timing.median_ms``: calls queued back to back between CUDA
events, median of batches, after a warm-up and tuning):

* baseline: ``torch.ops.aten._scaled_dot_product_flash_attention_backward`` alone (the kernel
  autograd calls for ``F.scaled_dot_product_attention(..., is_causal=True)`` on the flash path),
  on the saved output/logsumexp of ``_scaled_dot_product_flash_attention``, dense over all B*T
  rows. For GQA it first tries K/V with Hkv heads (native GQA); if the op refuses, K/V are
  expanded to Hq heads beforehand (expansion not timed) and the JSON says so.
* ours: ``masked_attention_backward(..., backend="triton", validate=False)`` with precomputed
  offsets: every launch of the op, including the small torch ops of the "atomic" strategy.

q/k/v are strided views of one fused projection output (B, T, (Hq+2Hkv)*D); ``out`` is the
flash forward's output transposed to (B, T, Hq, D), as SDPA returns it.

Usage: ``python benchmarks/kernels/bench_attention.py --out-dir benchmarks/results``. With
``--sweep`` each row also times every block configuration of :data:`SWEEP` for each pass (the
other pass at its tuned choice), to pick the candidates the tuner tries.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import math
import os
import sys
import time

import torch
from common import max_rel_diff, time_configs

MODELS = {
    "TinyLlama-1.1B": (32, 4, 64),
    "Qwen2.5-1.5B": (12, 2, 128),
    "Phi-1.5": (32, 32, 64),
}
KEEPS = (1.0, 0.8, 0.6, 0.4)

# --sweep: (block, block, num_warps, num_stages) of each pass per head-dim class, tried beyond the
# tuned candidates; dK/dV blocks are (BLOCK_N keys, BLOCK_M queries), dQ blocks (BLOCK_M, BLOCK_N).
SWEEP = {
    "dkdv": {
        64: [(bn, bm, w, st) for bn, bm, w in ((128, 32, 4), (128, 32, 8), (128, 64, 8), (64, 64, 4),
                                              (64, 32, 4), (128, 16, 4), (64, 16, 4), (128, 128, 8),
                                              (256, 32, 8), (64, 64, 8), (32, 32, 4))
             for st in (2, 3, 4)],
        128: [(bn, bm, w, st) for bn, bm, w in ((128, 32, 8), (64, 64, 4), (64, 32, 4), (128, 64, 8),
                                               (64, 16, 4), (32, 32, 4), (128, 16, 8), (64, 64, 8))
              for st in (2, 3, 4)],
    },
    "dq": {
        64: [(bm, bn, w, st) for bm, bn, w in ((128, 32, 4), (128, 64, 8), (64, 64, 4), (128, 64, 4),
                                              (128, 128, 8), (64, 32, 4))
             for st in (2, 3, 4)],
        128: [(bm, bn, w, st) for bm, bn, w in ((128, 32, 8), (64, 64, 4), (128, 64, 8), (64, 32, 4),
                                               (128, 32, 4))
              for st in (2, 3, 4)],
    },
}


def _make_inputs(B, T, Hq, Hkv, D, dtype, device, gen):
    qkv = torch.randn(B, T, (Hq + 2 * Hkv) * D, dtype=dtype, device=device, generator=gen)
    q = qkv[..., : Hq * D].view(B, T, Hq, D)
    k = qkv[..., Hq * D: (Hq + Hkv) * D].view(B, T, Hkv, D)
    v = qkv[..., (Hq + Hkv) * D:].view(B, T, Hkv, D)
    return q, k, v


def _kept_index(B, T, keep, device, gen):
    m = max(0, min(T, round(keep * T)))
    order = torch.rand(B, T, device=device, generator=gen).argsort(dim=1)[:, :m]  # (B, m)
    pos = order.sort(dim=1).values
    index = (pos + torch.arange(B, device=device)[:, None] * T).reshape(-1)
    return index


class DenseFlash:
    """PyTorch's dense flash-attention forward (once) and backward (timed)."""

    def __init__(self, q, k, v, scale):
        self.scale = scale
        self.gqa = "native"
        qh, kh, vh = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, T, D)
        self.cuda = q.is_cuda
        try:
            self._forward(qh, kh, vh)
        except RuntimeError:
            if kh.shape[1] == qh.shape[1]:
                raise
            g = qh.shape[1] // kh.shape[1]
            kh = kh.repeat_interleave(g, 1)
            vh = vh.repeat_interleave(g, 1)
            self.gqa = "expanded K/V to Hq heads (not timed)"
            self._forward(qh, kh, vh)
        self.qh, self.kh, self.vh = qh, kh, vh
        self.grad = torch.randn_like(self.out)

    def _forward(self, qh, kh, vh):
        if self.cuda:
            r = torch.ops.aten._scaled_dot_product_flash_attention(qh, kh, vh, 0.0, True, False, scale=self.scale)
            self.out, self.lse = r[0], r[1]
            self.rest = r[2:8]
        else:
            self.out, self.lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
                qh, kh, vh, 0.0, True, scale=self.scale)

    def backward(self):
        if self.cuda:
            cq, ck, mq, mk, seed, offset = self.rest
            return torch.ops.aten._scaled_dot_product_flash_attention_backward(
                self.grad, self.qh, self.kh, self.vh, self.out, self.lse, cq, ck, mq, mk, 0.0, True,
                seed, offset, scale=self.scale)
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            self.grad, self.qh, self.kh, self.vh, self.out, self.lse, 0.0, True, scale=self.scale)


def _kernel_breakdown(fn):
    """Mean CUDA time (ms) per kernel name over 5 calls, from the torch profiler."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            fn()
        torch.cuda.synchronize()
    out = {}
    for ev in prof.key_averages():
        t = getattr(ev, "device_time_total", None) or getattr(ev, "cuda_time_total", 0)
        if t:
            out[ev.key[:60]] = round(t / 5 / 1e3, 4)
    return dict(sorted(out.items(), key=lambda kv: -kv[1])[:8])


def _sweep(run, D: int, deadline: float) -> dict:
    """Time ``run(blocks={pass: config})`` over :data:`SWEEP`'s configurations of each pass."""
    return {
        which: time_configs(SWEEP[which][64 if D <= 64 else 128],
                            lambda cfg, which=which: functools.partial(run, blocks={which: cfg}),
                            deadline, lambda m: print(m, flush=True))
        for which in ("dkdv", "dq")
    }


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out-dir", default="benchmarks/results")
    ap.add_argument("--B", type=int, default=None, help="sequences (default 8; 1 with --smoke)")
    ap.add_argument("--T", type=int, default=None, help="tokens per sequence (default 2048; 48 with --smoke)")
    ap.add_argument("--models", nargs="*", default=list(MODELS))
    ap.add_argument("--keeps", nargs="*", type=float, default=list(KEEPS))
    ap.add_argument("--strategies", nargs="*", default=["separate"])
    ap.add_argument("--variants", nargs="*", default=["auto:default"],
                    help="dK/dV head split and compact-Q setting, SPLIT:COMPACT with SPLIT an integer "
                         "or 'auto' and COMPACT 0, 1 or 'default' (e.g. 1:0 2:1 auto:default)")
    ap.add_argument("--check", action="store_true", help="compare with the torch backend (fp32 math)")
    ap.add_argument("--profile", action="store_true", help="per-kernel times from the torch profiler")
    ap.add_argument("--smoke", action="store_true", help="tiny CPU run of the script's logic")
    ap.add_argument("--sweep", action="store_true",
                    help="also time each pass over the configurations of SWEEP (the other pass tuned)")
    ap.add_argument("--budget-s", type=float, default=1200.0, help="stop sweeping after this many seconds")
    args = ap.parse_args(argv)

    from collider_kernels import masked_attention_backward, sequence_offsets, tuning
    from collider_kernels.timing import median_ms
    from collider_kernels.triton import masked_attention_backward as tab
    from collider_kernels.triton import settings

    device = "cpu" if args.smoke else "cuda"
    dtype = torch.float32 if args.smoke else torch.bfloat16
    B = args.B or (1 if args.smoke else 8)
    T = args.T or (48 if args.smoke else 2048)
    gen = torch.Generator(device=device).manual_seed(0)
    rows, meta = [], {}
    default_strategy = tab.DQ_STRATEGY
    deadline = time.time() + args.budget_s
    for model in args.models:
        Hq, Hkv, D = MODELS[model]
        scale = 1.0 / math.sqrt(D)
        q, k, v = _make_inputs(B, T, Hq, Hkv, D, dtype, device, gen)
        dense = DenseFlash(q, k, v, scale)
        base_ms = median_ms(dense.backward, device=device)
        out = dense.out.transpose(1, 2)  # (B, T, Hq, D) view, as SDPA returns it
        lse = dense.lse  # (B, Hq, T) fp32
        print(f"{model}: dense flash backward {base_ms:.3f} ms (GQA: {dense.gqa})", flush=True)
        meta[model] = {"Hq": Hq, "Hkv": Hkv, "D": D, "dense_flash_bwd_ms": base_ms, "baseline_gqa": dense.gqa}
        for keep in args.keeps:
            index = _kept_index(B, T, keep, device, gen)
            offsets = sequence_offsets(index, B, T)
            n = index.numel()
            grad = torch.randn(n, Hq, D, dtype=dtype, device=device, generator=gen)
            ref = None
            if args.check:
                ref = masked_attention_backward(q, k, v, out, lse, grad, index, offsets=offsets, scale=scale,
                                                backend="torch", validate=False)
            for strat, variant in ((s, v) for s in args.strategies for v in args.variants):
                split_s, compact_s = variant.split(":")
                split = None if split_s == "auto" else int(split_s)
                if split is not None and (Hq // Hkv) % split:
                    continue
                compact = None if compact_s == "default" else compact_s == "1"
                if split is None and compact is None:  # the public op with its defaults
                    tab.DQ_STRATEGY = strat
                    ours = functools.partial(masked_attention_backward, q, k, v, out, lse, grad, index,
                                             offsets=offsets, scale=scale, backend="triton", validate=False)
                else:
                    ours = functools.partial(tab.masked_attention_backward_triton, q, k, v, out, lse, grad,
                                             index, offsets, scale, dq_strategy=strat, dkdv_split=split,
                                             compact_q=compact)

                res = ours()  # autotunes on first use of a shape class
                if device == "cuda":
                    torch.cuda.synchronize()
                sms = settings.num_sms(q.device)
                used_split = tab.dkdv_split_for(B, Hkv, Hq // Hkv, n, D, sms) if split is None else split
                used_compact = tab.COMPACT_Q if compact is None else compact
                row = {"model": model, "keep": keep, "strategy": strat, "variant": variant, "n": n,
                       "dkdv_split": used_split, "compact_q": used_compact}
                if ref is not None:
                    errs = (float(f"{max_rel_diff(a, r):.3e}") for a, r in zip(res, ref, strict=True))
                    row["max_rel_err_vs_torch_backend"] = dict(zip(("dq", "dk", "dv"), errs, strict=True))
                ms = median_ms(ours, device=device)
                row.update(ms=ms, dense_ms=base_ms, ratio=ms / base_ms)
                for name in ("dkdv", "dq"):  # the tuned launch configurations so far
                    chosen = tuning.cache(f"masked_attention_backward.{name}")
                    if chosen:
                        row.setdefault("configs", {})[name] = str(chosen)  # shape class -> configuration
                if args.profile and device == "cuda":
                    row["kernels_ms"] = _kernel_breakdown(ours)
                if args.sweep and device == "cuda":
                    run = functools.partial(tab.masked_attention_backward_triton, q, k, v, out, lse, grad, index,
                                            offsets, scale, dq_strategy=strat, dkdv_split=split, compact_q=compact)
                    row["sweep"] = _sweep(run, D, deadline)
                rows.append(row)
                print(f"  keep {keep:.1f} {strat:9s} split {used_split} compact {int(used_compact)} "
                      f"{ms:8.3f} ms  x{ms / base_ms:.3f}  "
                      f"{row.get('max_rel_err_vs_torch_backend', '')} {row.get('kernels_ms', '')}",
                      flush=True)
            del ref
        tab.DQ_STRATEGY = default_strategy
        del dense, q, k, v
        if device == "cuda":
            torch.cuda.empty_cache()

    import triton

    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "gpu": torch.cuda.get_device_name() if device == "cuda" else "cpu (smoke)",
        "torch": torch.__version__,
        "triton": triton.__version__,
        "shape": {"B": B, "T": T, "dtype": str(dtype).replace("torch.", "")},
        "timing": "collider_kernels.timing.median_ms (CUDA events around back-to-back calls, median of 5 batches)",
        "baseline": "aten._scaled_dot_product_flash_attention_backward, dense causal, all B*T rows",
        "ours": "masked_attention_backward(backend='triton', validate=False), all launches",
        "default_strategy": default_strategy,
        "autotune": tuning.ENABLED,
    }
    result = {"info": info, "models": meta, "rows": rows}
    os.makedirs(args.out_dir, exist_ok=True)
    stem = "attention_smoke" if args.smoke else "attention_h200"
    with open(os.path.join(args.out_dir, f"{stem}.json"), "w") as f:
        json.dump(result, f, indent=1)
    with open(os.path.join(args.out_dir, f"{stem}.md"), "w") as f:
        f.write(_markdown(result))
    print(_markdown(result))


def _markdown(result) -> str:
    info, meta, rows = result["info"], result["models"], result["rows"]
    lines = [
        "# Masked attention backward (Triton) vs PyTorch dense flash backward",
        "",
        f"{info['gpu']}, torch {info['torch']}, triton {info['triton']}, {info['date']}. "
        f"B={info['shape']['B']}, T={info['shape']['T']}, {info['shape']['dtype']}, random kept sets.",
        f"Timing: {info['timing']}. Baseline: {info['baseline']}. Ours: {info['ours']}.",
        "",
        "| model | Hq/Hkv/D | dense bwd ms | keep | strategy | dK/dV split | compact Q | ours ms | ratio |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        m = meta[r["model"]]
        lines.append(f"| {r['model']} | {m['Hq']}/{m['Hkv']}/{m['D']} | {m['dense_flash_bwd_ms']:.3f} | "
                     f"{r['keep']:.1f} | {r['strategy']} | {r.get('dkdv_split', 1)} | "
                     f"{'yes' if r.get('compact_q') else 'no'} | {r['ms']:.3f} | {r['ratio']:.3f} |")
    gqa = {k: m["baseline_gqa"] for k, m in meta.items()}
    lines += ["", f"Baseline GQA handling: {gqa}.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
