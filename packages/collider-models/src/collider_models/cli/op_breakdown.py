"""Per-op-kind GPU time of a forward and a backward, from ``torch.profiler``.

Every CUDA kernel a phase launches is put in one kind by its name (:data:`KINDS`, first match
wins), and the kinds' kernel times are summed. The forward and the backward are profiled
separately, each from a synchronised start to a synchronised end.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable

import torch

# (kind, pattern over the lower-cased kernel name); the first matching kind takes the kernel.
KINDS: tuple[tuple[str, str], ...] = (
    ("optimizer", r"adam|multi_tensor|foreach"),
    ("attention", r"flash|fmha|attn|attention|sdpa|dot_do_o"),
    ("lm head + loss", r"cross_entropy|_ce_|logsumexp|log_softmax|softmax|nll_loss|fused_linear"),
    ("norm", r"norm|rms"),
    ("rotary", r"rotary|rope"),
    ("activation", r"silu|gelu|swiglu|glu|tanh|sigmoid|act_and_mul"),
    ("gemm", r"gemm|cutlass|nvjet|xmma|matmul|wgrad|cublas|sm90_|sm80_|splitk|mma"),
    ("gather / scatter / index", r"index|gather|scatter|embedding|nonzero|sort|unique|searchsorted|topk"),
    ("copy / cast / fill", r"copy|cast|fill|cat|arange|zero"),
    ("elementwise / reduce", r"elementwise|vectorized|reduce|unrolled|pointwise|triton_"),
)
KIND_NAMES = tuple(k for k, _ in KINDS) + ("other",)


def kind_of(kernel_name: str) -> str:
    """The op kind a kernel belongs to (see :data:`KINDS`)."""
    name = kernel_name.lower()
    for kind, pattern in KINDS:
        if re.search(pattern, name):
            return kind
    return "other"


def _kernel_ms(prof) -> dict[str, float]:
    """kernel name -> total device ms, from a finished profiler."""
    out: Counter = Counter()
    for avg in prof.key_averages():
        if getattr(avg, "device_type", None) != torch.autograd.DeviceType.CUDA:
            continue
        us = getattr(avg, "self_device_time_total", None)
        if us is None:
            us = avg.self_cuda_time_total
        out[avg.key] += us / 1e3
    return dict(out)


def profile_phases(forward: Callable[[], torch.Tensor], top: int = 8) -> dict:
    """Profile ``loss = forward()`` and then ``loss.backward()`` (CUDA only).

    Returns ``{"forward": {...}, "backward": {...}}``, each with ``kinds`` (kind -> ms),
    ``total_ms``, ``top`` (the ``top`` most expensive kernels, name -> ms) and ``kernels``
    (every kernel, name -> ms, so the split can be redone).
    """
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    result = {}
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=activities) as prof:
        loss = forward()
        torch.cuda.synchronize()
    result["forward"] = _summary(_kernel_ms(prof), top)
    with torch.profiler.profile(activities=activities) as prof:
        loss.backward()
        torch.cuda.synchronize()
    result["backward"] = _summary(_kernel_ms(prof), top)
    return result


def _summary(kernels: dict[str, float], top: int) -> dict:
    kinds = dict.fromkeys(KIND_NAMES, 0.0)
    for name, ms in kernels.items():
        kinds[kind_of(name)] += ms
    ranked = sorted(kernels.items(), key=lambda kv: -kv[1])[:top]
    return {"kinds": kinds, "total_ms": sum(kernels.values()), "top": dict(ranked), "kernels": kernels}


def markdown(rows: list[dict]) -> str:
    """A table per phase: one row per (model, mode), one column per op kind (ms)."""
    lines = []
    for phase in ("forward", "backward"):
        used = [k for k in KIND_NAMES if any(r["profile"][phase]["kinds"][k] >= 0.05 for r in rows)]
        lines += [f"### {phase}: GPU kernel time by op kind (ms, one profiled step)", "",
                  "| model | mode | total | " + " | ".join(used) + " |",
                  "|---|---|---|" + "---|" * len(used)]
        for r in rows:
            p = r["profile"][phase]
            cells = " | ".join(f"{p['kinds'][k]:.1f}" for k in used)
            lines.append(f"| {r['preset']} | {r['mode']} | {p['total_ms']:.1f} | {cells} |")
        lines.append("")
    return "\n".join(lines)
