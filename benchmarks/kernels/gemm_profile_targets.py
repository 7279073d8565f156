"""The GEMM calls to read hardware counters of (run under ``ncu --profile-from-start off``).

Tunes the Triton weight gradient of Qwen2.5 q,o (1536×1536) and k,v (256×1536) at keep 0.6
(16384 token rows, bf16) outside the profiled range, prints the chosen configurations, then
runs one cuBLAS-compact and one Triton call of each inside ``torch.cuda.profiler`` start/stop.

Usage: ``ncu --profile-from-start off --clock-control none python benchmarks/kernels/gemm_profile_targets.py``
"""

import torch

import collider_kernels as ck
from collider_kernels.triton import gemm

TOKENS = 16384


def main() -> None:
    gen = torch.Generator(device="cuda").manual_seed(0)
    calls = []
    for N, K in ((1536, 1536), (256, 1536)):
        x = torch.randn(TOKENS, K, device="cuda", dtype=torch.bfloat16, generator=gen)
        n = int(0.6 * TOKENS)
        idx = torch.randperm(TOKENS, device="cuda", generator=gen)[:n].sort().values
        xc = x.index_select(0, idx)
        g = torch.randn(n, N, device="cuda", dtype=torch.bfloat16, generator=gen)
        ck.gathered_weight_grad(g, x, idx, backend="triton", validate=False)  # tunes
        choice = [c for k, c in gemm._CHOICE.items() if k[0] == "wgrad" and k[2] == N and k[3] == K]
        print(f"wgrad N={N} K={K} n={n}: choice {choice}", flush=True)
        calls.append(lambda g=g, xc=xc: torch.mm(g.t(), xc))
        calls.append(lambda g=g, x=x, idx=idx: ck.gathered_weight_grad(g, x, idx, backend="triton", validate=False))
    torch.cuda.synchronize()
    torch.cuda.profiler.start()
    for fn in calls:
        fn()
    torch.cuda.synchronize()
    torch.cuda.profiler.stop()


if __name__ == "__main__":
    main()
