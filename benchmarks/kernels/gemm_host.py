"""Where the host time of one gather-GEMM / weight-gradient call goes (device script, one call).

For the narrow k,v shape (256×2048) and q,o (2048×2048) at keep 0.6 (16384 token rows, bf16): host
time per call (issue time of 200 calls, no sync inside), for the public ops (torch and triton
backends), torch.mm, and the Triton layers underneath: the wrapper with a fixed config, Triton's
plain ``kernel[grid](...)`` launch and the cached launcher (``collider_kernels.triton.launch``).
Then the top of a cProfile of the public triton call. Prints everything; nothing is written.

Usage: ``python benchmarks/kernels/gemm_host.py``
"""

from __future__ import annotations

import cProfile
import io
import pstats
import time

import torch
from common import TOKENS

import collider_kernels as ck
from collider_kernels import tuning
from collider_kernels.timing import median_ms
from collider_kernels.triton import gather_matmul as tgm
from collider_kernels.triton import gathered_weight_grad as twg
from collider_kernels.triton import gemm


def host_us(fn, calls: int = 200) -> float:
    """Host microseconds per call to issue ``calls`` calls (GPU work overlaps; synced around)."""
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    t1 = time.perf_counter()
    torch.cuda.synchronize()
    return (t1 - t0) / calls * 1e6


def profile_top(fn, calls: int = 300, top: int = 22) -> str:
    fn()
    torch.cuda.synchronize()
    pr = cProfile.Profile()
    pr.enable()
    for _ in range(calls):
        fn()
    pr.disable()
    torch.cuda.synchronize()
    s = io.StringIO()
    pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(top)
    return s.getvalue()


def main() -> None:
    gen = torch.Generator(device="cuda").manual_seed(0)
    for N, K in ((256, 2048), (2048, 2048)):
        x = torch.randn(TOKENS, K, device="cuda", dtype=torch.bfloat16, generator=gen)
        w = torch.randn(N, K, device="cuda", dtype=torch.bfloat16, generator=gen) * K**-0.5
        n = int(0.6 * TOKENS)
        idx = torch.randperm(TOKENS, device="cuda", generator=gen)[:n].sort().values
        xc = x.index_select(0, idx)
        g = torch.randn(n, N, device="cuda", dtype=torch.bfloat16, generator=gen)
        y = torch.empty(n, N, device="cuda", dtype=torch.bfloat16)
        dw = torch.empty(N, K, device="cuda", dtype=torch.bfloat16)
        fns = {
            "fwd torch.mm compact": lambda: torch.mm(xc, w.t()),
            "fwd public torch": lambda: ck.gather_matmul(x, idx, w, backend="torch", validate=False),
            "fwd public triton": lambda: ck.gather_matmul(x, idx, w, backend="triton", validate=False),
            "wgrad torch.mm compact": lambda: torch.mm(g.t(), xc),
            "wgrad public torch": lambda: ck.gathered_weight_grad(g, x, idx, backend="torch", validate=False),
            "wgrad public triton": lambda: ck.gathered_weight_grad(g, x, idx, backend="triton", validate=False),
        }
        for fn in list(fns.values()):
            fn()  # tunes the triton choice
        # Tuning keys start (path, N, K, ...).
        fwd_cfg = next(c for k, c in tuning.cache("gather_matmul").items() if k[1] == N and k[2] == K)
        wg_cfg = next(c for k, c in tuning.cache("gathered_weight_grad").items() if k[1] == N and k[2] == K)
        fns["fwd into, fixed cfg"] = lambda: tgm.gather_matmul_into(x, idx, w, None, y, cfg=fwd_cfg)
        fns["wgrad into, fixed cfg"] = lambda: twg.gathered_weight_grad_into(g, x, idx, dw, False, cfg=wg_cfg)
        if fwd_cfg["DESC"]:
            fns["fwd desc launch only"] = lambda: tgm.launch_desc(x, idx, w, None, y, fwd_cfg)
        print(f"== N={N} K={K} n={n}: fwd cfg {fwd_cfg}; wgrad cfg {wg_cfg}", flush=True)
        for name, fn in fns.items():
            print(f"{name:28s} host {host_us(fn):7.1f} us/call   gpu {median_ms(fn) * 1e3:7.1f} us/call", flush=True)
        # The launch alone: Triton's plain JIT dispatch against the cached launcher, same arguments.
        if fwd_cfg["DESC"]:
            bm, bn, bk = fwd_cfg["BLOCK_M"], fwd_cfg["BLOCK_N"], fwd_cfg["BLOCK_K"]
            desc = gemm.tensor_desc(w, [bn, bk])
            grid = (gemm.grid_size(-(-n // bm) * -(-N // bn), fwd_cfg, x.device),)
            args = (x, idx, desc, y, y, n, N, K, x.stride(0), x.stride(1), y.stride(0), y.stride(1))
            meta = dict(HAS_INDEX=True, HAS_BIAS=False, UPCAST=False, EVEN_K=K % bk == 0,
                        FLATTEN=fwd_cfg["PERSIST"], BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=fwd_cfg["GROUP_M"],
                        num_warps=fwd_cfg["num_warps"], num_stages=fwd_cfg["num_stages"])
            launcher = tgm.gather_mm_desc_kernel
            floors = {
                "plain kernel[grid](...)": lambda: launcher.kernel[grid](*args, **meta),
                "cached Launcher[grid](...)": lambda: launcher[grid](*args, **meta),
                "TensorDescriptor(...)": lambda: gemm.tensor_desc(w, [bn, bk]),
                "torch.empty(n, N)": lambda: torch.empty(n, N, device="cuda", dtype=torch.bfloat16),
            }
            for name, fn in floors.items():
                print(f"{name:28s} host {host_us(fn):7.1f} us/call", flush=True)
        for name in ("fwd public triton", "wgrad public triton"):
            print(f"-- cProfile {name} N={N}", flush=True)
            print(profile_top(fns[name]), flush=True)


if __name__ == "__main__":
    main()
