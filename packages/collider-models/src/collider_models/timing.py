"""Forward/backward timing of one training step, Collider vs the masked-loss baseline."""

from __future__ import annotations

import statistics

from collider_autograd import filtered_mean
from collider_kernels.timing import Timer
from collider_models.reference import masked_mean

__all__ = ["MODES", "Timer", "compare_backward", "step_times"]

MODES = ("masked", "collider")


def step_times(model, input_ids, labels, keep, mode: str) -> tuple[float, float]:
    """(forward ms, backward ms) of one step; ``mode`` is "collider" (filtered_mean) or
    "masked" (``(loss * keep).sum() / keep.sum()``, dense backward). Gradients are cleared."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    timer = Timer(input_ids.device)
    model.zero_grad(set_to_none=True)
    t0 = timer.mark()
    token_loss = model.token_loss(input_ids, labels)
    loss = filtered_mean(token_loss, keep, validate=False) if mode == "collider" else masked_mean(token_loss, keep)
    t1 = timer.mark()
    loss.backward()
    t2 = timer.mark()
    return timer.elapsed_ms(t0, t1), timer.elapsed_ms(t1, t2)


def compare_backward(model, input_ids, labels, keep, repeats: int = 5, warmup: int = 1) -> dict:
    """Median forward/backward ms of both modes, interleaved so drift hits both alike."""
    times = {m: {"forward": [], "backward": []} for m in MODES}
    for i in range(warmup + repeats):
        for mode in MODES:
            fwd, bwd = step_times(model, input_ids, labels, keep, mode)
            if i >= warmup:
                times[mode]["forward"].append(fwd)
                times[mode]["backward"].append(bwd)
    model.zero_grad(set_to_none=True)
    out = {m: {k: statistics.median(v) for k, v in t.items()} for m, t in times.items()}
    out["backward_ratio"] = out["collider"]["backward"] / out["masked"]["backward"]
    out["keep_fraction"] = float(keep.float().mean())
    return out
