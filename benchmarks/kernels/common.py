"""Problem size and error measure shared by the kernel benchmarks (run them as scripts: this folder
is on sys.path). Timing is :mod:`collider_kernels.timing`."""

import torch

TOKENS = 16384  # token rows of the GEMM benchmarks (B=8, T=2048)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """‖a − b‖ / ‖b‖ in fp32."""
    a, b = a.float(), b.float()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def max_rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """max|a − b| / max|b| in fp32."""
    a, b = a.float(), b.float()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()
