"""GPU checks of collider-models, then the end-to-end benchmark, in one run.

Checks (each PASS/FAIL, the run goes on after a failure):

1. the gradient contract on CUDA for the tiny presets, fp32 and bf16: ``filtered_mean``
   gradients against the dense reference (filtered K/V detached, masked mean), both
   against an fp32 dense reference; no densification;
2. bf16 logits of a tiny ``transformers`` checkpoint loaded with ``from_pretrained``: our
   error against the fp32 logits is at most twice ``transformers``' bf16 error plus a
   small atol; fp32 logits agree closely;
3. KV-cached greedy generation equals the no-cache recompute on CUDA;
4. each full-size preset, random init in bf16 on CUDA: forward + backward at B=1, T=2048,
   60% random keep; gradients finite and close to the dense reference's.

Then ``collider-bench`` runs in a subprocess (fresh memory), with the torch kernels as a
fallback when the automatic backends fail. Usage (from the repository root)::

    PYTHONPATH=packages/collider-kernels/src:packages/collider-autograd/src:packages/collider-models/src \\
        python3 benchmarks/models/gpu_checks.py --out results_dir

``--quick`` runs the same code on small sizes (on CPU too) to try the script.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

START = time.monotonic()
RESULTS: list[dict] = []


def log(msg: str) -> None:
    print(f"[{time.monotonic() - START:6.1f}s] {msg}", flush=True)


def check(name: str, fn, *args) -> None:
    """Run one check; record PASS/FAIL with its details or the exception."""
    t0 = time.monotonic()
    try:
        ok, details = fn(*args)
        status = "PASS" if ok else "FAIL"
    except Exception as exc:  # keep going: later checks are still informative
        status, details = "ERROR", {"error": f"{type(exc).__name__}: {exc}", "trace": traceback.format_exc()[-2000:]}
    RESULTS.append({"check": name, "status": status, "seconds": round(time.monotonic() - t0, 2), **details})
    short = {k: v for k, v in details.items() if k != "trace"}
    log(f"{status} {name}: {json.dumps(short, default=str)[:600]}")
    if status == "ERROR":
        print(details["trace"], flush=True)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """‖a − b‖ / ‖b‖ in fp64 (0 when both are zero)."""
    a, b = a.double(), b.double()
    den = b.norm().item()
    return (a - b).norm().item() / den if den > 0 else (a - b).norm().item()


@torch.no_grad()
def _perturb(model, seed: int, std: float = 0.05):
    gen = torch.Generator(device="cpu").manual_seed(seed)
    for p in model.parameters():
        p.add_((torch.randn(p.shape, generator=gen) * std).to(device=p.device, dtype=p.dtype))
    return model


def _grads(model) -> dict[str, torch.Tensor]:
    return {
        n: (p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p)) for n, p in model.named_parameters()
    }


def _contract_grads(model, ids, labels, keep, collider: bool) -> dict[str, torch.Tensor]:
    from collider_autograd import filtered_mean
    from collider_models.reference import detach_filtered_kv, masked_mean

    model.zero_grad(set_to_none=True)
    if collider:
        filtered_mean(model.token_loss(ids, labels), keep).backward()
    else:
        with detach_filtered_kv(model, keep):
            masked_mean(model.token_loss(ids, labels), keep).backward()
    return _grads(model)


def _keep(B: int, T: int, ratio: float, device, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    keep = torch.rand(B, T, generator=gen) < ratio
    if B >= 3:
        keep[1] = False  # a sequence with nothing kept
        keep[2] = True  # and one with everything kept
    return keep.to(device)


def contract_check(preset: str, dtype: torch.dtype, device, T: int):
    import collider_models
    from collider_autograd import densify_counts, reset_densify_counts

    torch.manual_seed(0)
    base = _perturb(collider_models.from_preset(preset), 0).to(device)
    V = base.config.vocab_size
    B = 3
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, V, (B, T), generator=gen).to(device)
    labels = torch.randint(0, V, (B, T), generator=gen).to(device)
    keep = _keep(B, T, 0.6, device, 2)
    ref32 = _contract_grads(base, ids, labels, keep, collider=False)
    model = base.to(dtype)
    reset_densify_counts()
    col = _contract_grads(model, ids, labels, keep, collider=True)
    densified = densify_counts()
    ref = _contract_grads(model, ids, labels, keep, collider=False)
    err_col = max(_rel(col[n], ref32[n]) for n in ref32)
    err_ref = max(_rel(ref[n], ref32[n]) for n in ref32)
    worst = max(ref32, key=lambda n: _rel(col[n], ref32[n]))
    finite = all(bool(torch.isfinite(g).all()) for g in col.values())
    if dtype == torch.float32:
        ok = err_col < 1e-4
    else:
        ok = err_col <= 2 * err_ref + 2e-3
    ok = ok and finite and not densified
    return ok, {"max_rel_err_collider": err_col, "max_rel_err_dense_same_dtype": err_ref, "worst_param": worst,
                "densified": densified, "finite": finite}


def _hf_tiny_checkpoint(arch_preset: str, folder: Path):
    import transformers

    from collider_models.presets import preset_config

    cfg = preset_config(arch_preset)
    if cfg.get("eos_token_id") is not None and cfg["eos_token_id"] >= cfg["vocab_size"]:
        cfg["bos_token_id"], cfg["eos_token_id"] = 1, 2
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(**cfg), dtype=torch.float32)
    _perturb(hf, 3)
    hf.save_pretrained(folder)
    return hf


@torch.no_grad()
def logits_check(preset: str, device, T: int):
    import transformers

    import collider_models

    with tempfile.TemporaryDirectory() as tmp:
        hf32 = _hf_tiny_checkpoint(preset, Path(tmp)).to(device).eval()
        hf16 = transformers.AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.bfloat16).to(device).eval()
        ours32 = collider_models.from_pretrained(tmp, device=device)
        ours16 = collider_models.from_pretrained(tmp, dtype=torch.bfloat16, device=device)
    assert ours16.lm_head.weight.dtype == torch.bfloat16 and ours16.lm_head.weight.device.type == device.type
    ids = torch.randint(0, ours32.config.vocab_size, (2, T), generator=torch.Generator().manual_seed(4)).to(device)
    ref = hf32(ids).logits.float()
    err32 = (ours32(ids).float() - ref).abs().max().item()
    err_hf = (hf16(ids).logits.float() - ref).abs().max().item()
    err_ours = (ours16(ids).float() - ref).abs().max().item()
    ok = err32 < 1e-3 and err_ours <= 2 * err_hf + 1e-2
    return ok, {"fp32_max_abs_err": err32, "bf16_err_ours": err_ours, "bf16_err_transformers": err_hf,
                "logit_scale": ref.abs().max().item()}


def generate_check(preset: str, device):
    import collider_models

    torch.manual_seed(0)
    model = _perturb(collider_models.from_preset(preset), 5).to(device)
    ids = torch.randint(0, model.config.vocab_size, (2, 7), generator=torch.Generator().manual_seed(6)).to(device)
    a = collider_models.generate(model, ids, 16)
    b = collider_models.generate(model, ids, 16, use_cache=False)
    model = model.to(torch.bfloat16)
    gen = torch.Generator(device=device).manual_seed(0)
    s = collider_models.generate(model, ids, 16, do_sample=True, top_p=0.9, temperature=0.8, generator=gen)
    return bool(torch.equal(a, b)) and s.shape == (2, 23), {"greedy_equal": bool(torch.equal(a, b))}


def full_size_check(preset: str, device, T: int):
    import collider_models
    from collider_autograd import filtered_mean
    from collider_models.reference import detach_filtered_kv, masked_mean

    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with device:
            model = collider_models.from_config(collider_models.preset_config(preset))
    finally:
        torch.set_default_dtype(previous)
    V = model.config.vocab_size
    gen = torch.Generator().manual_seed(7)
    ids = torch.randint(0, V, (1, T), generator=gen).to(device)
    labels = torch.randint(0, V, (1, T), generator=gen).to(device)
    keep = _keep(1, T, 0.6, device, 8)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.monotonic()
    loss = filtered_mean(model.token_loss(ids, labels), keep)
    loss.backward()
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.monotonic() - t0
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
    col = _grads(model)
    finite = all(bool(torch.isfinite(g).all()) for g in col.values())
    nonzero = sum(bool(g.abs().max() > 0) for g in col.values())
    model.zero_grad(set_to_none=True)
    with detach_filtered_kv(model, keep):
        ref_loss = masked_mean(model.token_loss(ids, labels), keep)
        ref_loss.backward()
    ref = _grads(model)
    rel = {n: _rel(col[n], ref[n]) for n in ref}
    worst = max(rel, key=rel.get)
    median_rel = sorted(rel.values())[len(rel) // 2]
    ok = finite and nonzero == len(col) and rel[worst] < 0.1 and abs(loss.item() - ref_loss.item()) < 1e-3
    del model, col, ref
    return ok, {"loss": loss.item(), "ref_loss": ref_loss.item(), "finite": finite,
                "params_with_grad": f"{nonzero}/{len(rel)}", "max_rel_vs_dense_ref": rel[worst],
                "worst_param": worst, "median_rel": median_rel, "first_step_s": round(seconds, 2),
                "peak_gib": peak}


def _free(device) -> None:
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def run_bench(out: Path, quick: bool, device, kernels: str, extra: list[str], timeout: float) -> int:
    cmd = [sys.executable, "-m", "collider_models.cli.bench", "--out", str(out), "--kernels", kernels,
           "--device", str(device)]
    if quick:
        cmd += ["--presets", "tinyllama-tiny", "qwen2.5-tiny", "phi-tiny", "--batch", "2", "--seq", "64",
                "--warmup", "1", "--repeats", "2"]
    cmd += extra
    log(f"bench: {' '.join(cmd[1:])} (timeout {timeout:.0f}s)")
    try:
        return subprocess.run(cmd, timeout=timeout).returncode
    except subprocess.TimeoutExpired:
        log("bench: timed out")
        return 124


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "gpu_checks_out")))
    p.add_argument("--quick", action="store_true", help="small sizes, any device: to try the script")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--deadline", type=float, default=300.0, help="seconds for the whole run")
    p.add_argument("--skip-bench", action="store_true")
    p.add_argument("--skip-fp32-grad", action="store_true", help="skip the fp32 contract checks on the device")
    p.add_argument("--bench-args", nargs=argparse.REMAINDER, default=[], help="passed on to collider-bench")
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    device = torch.device(args.device)

    import triton

    from collider_kernels import available_backends

    env = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
           "torch": torch.__version__, "triton": triton.__version__,
           "backends": {op: available_backends(op, device) for op in
                        ("gather_matmul", "gathered_weight_grad", "scatter_add_rows", "masked_attention_backward")}}
    try:
        import transformers

        env["transformers"] = transformers.__version__
    except ImportError:
        env["transformers"] = None
    log(f"environment: {json.dumps(env)}")

    tiny = ["tinyllama-tiny", "qwen2.5-tiny", "phi-tiny"]
    full = tiny if args.quick else ["tinyllama-1.1b", "qwen2.5-1.5b", "phi-1.5"]
    T_tiny, T_full = (40, 64) if args.quick else (200, 2048)
    for preset in tiny:
        for dtype in (torch.bfloat16,) if args.skip_fp32_grad else (torch.float32, torch.bfloat16):
            check(f"contract {preset} {str(dtype)[6:]}", contract_check, preset, dtype, device, T_tiny)
        check(f"logits vs transformers {preset}", logits_check, preset, device, T_tiny)
        check(f"generate {preset}", generate_check, preset, device)
    for preset in full:
        check(f"full-size fwd+bwd {preset} B=1 T={T_full}", full_size_check, preset, device, T_full)
        _free(device)

    rc_bench = None
    if not args.skip_bench:
        left = args.deadline - (time.monotonic() - START)
        rc_bench = run_bench(args.out / "e2e_h200", args.quick, device, "auto", args.bench_args, max(30.0, left - 10))
        left = args.deadline - (time.monotonic() - START)
        if rc_bench != 0 and left > 90:
            log("bench with automatic kernel backends failed; rerunning with the torch kernels")
            rc_bench = run_bench(args.out / "e2e_h200_torch_kernels", args.quick, device, "torch",
                                 args.bench_args, left - 10)
    summary = {"environment": env, "checks": RESULTS, "bench_rc": rc_bench}
    (args.out / "gpu_checks.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    log("summary: " + ", ".join(f"{r['check']}={r['status']}" for r in RESULTS))
    failed = [r for r in RESULTS if r["status"] != "PASS"]
    return 1 if failed or rc_bench not in (None, 0) else 0


if __name__ == "__main__":
    sys.exit(main())
