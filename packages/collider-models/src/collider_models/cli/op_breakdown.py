"""Per-op-kind GPU time of a forward and a backward, from ``torch.profiler``.

Every CUDA kernel a phase launches is put in one kind by its name (:data:`KINDS`, first match
wins), and the kinds' kernel times are summed. The forward and the backward are profiled
separately, each from a synchronised start to a synchronised end. The profiler slows the host
several-fold, enough to leave the GPU waiting between kernels, and a GPU that waits runs its next
kernels at other clocks than one kept busy; so each phase starts behind a spin kernel of
:data:`HEAD_START_MS` that lets the host queue the phase's kernels first, and they then run back
to back, as in an unprofiled step (the spin itself is left out). The kernels' timeline gives the
span from the first kernel's start to the last one's end, the time some kernel ran
(``busy_ms``) and the largest idle gaps between kernels, named by the kernels around them:
behind the head start, gaps are waits the phase itself imposes (a host sync, or host work
longer than the head start).
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

# GPU time queued ahead of each profiled phase (torch.cuda._sleep), and that kernel's name.
HEAD_START_MS = 400.0
_SPIN_KERNEL = "spin_kernel"


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
        if getattr(avg, "device_type", None) != torch.autograd.DeviceType.CUDA or _SPIN_KERNEL in avg.key:
            continue
        us = getattr(avg, "self_device_time_total", None)
        if us is None:
            us = avg.self_cuda_time_total
        out[avg.key] += us / 1e3
    return dict(out)


def _timeline(prof, gaps: int) -> dict:
    """Span, busy time, kernel count and the ``gaps`` largest idle gaps of a finished profiler."""
    spans = sorted((e.time_range.start, e.time_range.end, e.name) for e in prof.events()
                   if getattr(e, "device_type", None) == torch.autograd.DeviceType.CUDA
                   and _SPIN_KERNEL not in e.name)
    if not spans:
        return {"span_ms": 0.0, "busy_ms": 0.0, "kernel_count": 0, "idle_ms": 0.0, "gaps": []}
    busy, idle, reach, previous = 0.0, [], spans[0][0], spans[0][2]
    for start, end, name in spans:  # union of the kernels' intervals (µs)
        if start > reach:
            idle.append((start - reach, previous, name))
        busy += max(0.0, end - max(start, reach))
        if end > reach:
            reach, previous = end, name
    idle.sort(key=lambda g: -g[0])
    return {"span_ms": (reach - spans[0][0]) / 1e3, "busy_ms": busy / 1e3, "kernel_count": len(spans),
            "idle_ms": sum(g[0] for g in idle) / 1e3,
            "gaps": [{"us": round(us, 1), "after": a[:80], "before": b[:80]} for us, a, b in idle[:gaps]]}


def profile_phases(forward: Callable[[], torch.Tensor], top: int = 8) -> dict:
    """Profile ``loss = forward()`` and then ``loss.backward()`` (CUDA only).

    Returns ``{"forward": {...}, "backward": {...}}``, each with ``kinds`` (kind -> ms),
    ``total_ms``, ``top`` (the ``top`` most expensive kernels, name -> ms), ``kernels``
    (every kernel, name -> ms, so the split can be redone) and ``timeline`` (span, busy and
    idle ms, kernel count, the largest idle gaps).
    """
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    result = {}
    spin = round(HEAD_START_MS * _spin_cycles_per_ms())
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=activities) as prof:
        torch.cuda._sleep(spin)
        loss = forward()
        torch.cuda.synchronize()
    result["forward"] = _summary(_kernel_ms(prof), top) | {"timeline": _timeline(prof, top)}
    with torch.profiler.profile(activities=activities) as prof:
        torch.cuda._sleep(spin)
        loss.backward()
        torch.cuda.synchronize()
    result["backward"] = _summary(_kernel_ms(prof), top) | {"timeline": _timeline(prof, top)}
    return result


def _spin_cycles_per_ms() -> float:
    """Cycles of ``torch.cuda._sleep`` per millisecond on the current GPU, timed now (unprofiled:
    the clock it counts varies with the GPU's load)."""
    cycles = 20_000_000
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    torch.cuda._sleep(cycles)
    end.record()
    end.synchronize()
    return cycles / max(start.elapsed_time(end), 1e-3)


def _summary(kernels: dict[str, float], top: int) -> dict:
    kinds = dict.fromkeys(KIND_NAMES, 0.0)
    for name, ms in kernels.items():
        kinds[kind_of(name)] += ms
    ranked = sorted(kernels.items(), key=lambda kv: -kv[1])[:top]
    return {"kinds": kinds, "total_ms": sum(kernels.values()), "top": dict(ranked), "kernels": kernels}


def markdown(rows: list[dict]) -> str:
    """A table per phase: one row per (model, mode): kernel sum, timeline span and idle time, then
    one column per op kind (ms)."""
    lines = []
    for phase in ("forward", "backward"):
        used = [k for k in KIND_NAMES if any(r["profile"][phase]["kinds"][k] >= 0.05 for r in rows)]
        lines += [f"### {phase}: GPU kernel time by op kind (ms, one profiled step)", "",
                  "| model | mode | total | span | idle | " + " | ".join(used) + " |",
                  "|---|---|---|---|---|" + "---|" * len(used)]
        for r in rows:
            p = r["profile"][phase]
            cells = " | ".join(f"{p['kinds'][k]:.1f}" for k in used)
            line = p.get("timeline", {})
            span, idle = (f"{line[k]:.1f}" if k in line else "-" for k in ("span_ms", "idle_ms"))
            lines.append(f"| {r['preset']} | {r['mode']} | {p['total_ms']:.1f} | {span} | {idle} | {cells} |")
        lines.append("")
    return "\n".join(lines)
