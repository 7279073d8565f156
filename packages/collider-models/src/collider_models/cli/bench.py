"""``collider-bench``: end-to-end forward/backward timing, Collider against the masked-loss baseline.

For each preset (default the three full-size models) at B×T tokens with a random share
``--keep`` of positions kept, one run interleaves, step by step:

* ``masked``: ``(token_loss * keep).sum() / keep.sum()`` and a dense backward (Rho-1 style);
* ``collider``: :func:`collider_autograd.filtered_mean` (backward over kept tokens only);
* ``ideal``: the dense masked step on sequences of ``keep·T`` tokens, all kept: the bound
  a kept-rows backward is compared with (the design page's performance model);
* ``hf`` (with ``--hf``): the same-shaped ``transformers`` model (SDPA) with the masked loss;
* ``liger`` (with ``--liger``): ``transformers`` + Liger-Kernel with filtered labels set to -100
  (Llama, Qwen2, Mistral; see :mod:`collider_models.cli.bench_baselines`).

With ``--full-step`` each step is the whole training step of the design page's performance
model: the kept tokens are chosen by top-k of the token loss (timed with the forward, without a
device sync, as the training step does it; the Liger
baseline is handed the mask instead, since its fused loss needs it before the forward) and a
fused AdamW step follows the backward (timed apart). ``--profile`` adds a per-op-kind breakdown
of one forward and one backward of every mode (``torch.profiler``, CUDA). On CUDA times are
CUDA-event medians after warm-up and peak memory is per step; on CPU they are wall-clock medians
and memory is not measured. Results go to ``<out>.json`` and ``<out>.md``.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import gc
import importlib.metadata
import json
import os
import platform
import statistics
import subprocess
import sys
from pathlib import Path

import torch

from collider_kernels.timing import Timer
from collider_models.cli import bench_baselines as baselines
from collider_models.cli import op_breakdown
from collider_models.reference import masked_mean

# Kernel backends: "auto" lets collider-kernels pick (the fastest measured on CUDA);
# "torch" restricts backend="auto" to the torch backend (collider_kernels.set_auto_backends).
KERNELS_ENV = "COLLIDER_BENCH_KERNELS"
FULL_PRESETS = ("tinyllama-1.1b", "qwen2.5-1.5b", "phi-1.5")
# What a run without --presets/--batch/--seq/--dtype measures, per device type: the full models at the
# design page's shape on a GPU; a tiny model on a CPU, where a full model would take minutes per step.
DEFAULTS = {
    "cuda": {"presets": list(FULL_PRESETS), "batch": 8, "seq": 2048, "dtype": "bfloat16"},
    "cpu": {"presets": ["tinyllama-tiny"], "batch": 4, "seq": 256, "dtype": "float32"},
}
# Presets this large are refused on a CPU unless --force is given (parameters, millions).
CPU_MAX_PARAMS_M = 200
_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def build_parser() -> argparse.ArgumentParser:
    """Command-line arguments of ``collider-bench``."""
    p = argparse.ArgumentParser(prog="collider-bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--presets", nargs="+", default=None,
                   help=f"default: {' '.join(FULL_PRESETS)} on CUDA, {DEFAULTS['cpu']['presets'][0]} on CPU")
    p.add_argument("--batch", type=int, default=None,
                   help="sequences per step, halved on out-of-memory (default: 8 on CUDA, 4 on CPU)")
    p.add_argument("--seq", type=int, default=None, help="tokens per sequence (default: 2048 on CUDA, 256 on CPU)")
    p.add_argument("--keep", type=float, nargs="+", default=[0.6],
                   help="share(s) of positions kept (at random, or by top-k with --full-step); one row each")
    p.add_argument("--dtype", default=None, choices=sorted(_DTYPES),
                   help="default: bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--force", action="store_true", help=f"allow presets over {CPU_MAX_PARAMS_M}M parameters on CPU")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--hf", action="store_true", help="also time the transformers model (masked loss)")
    p.add_argument("--liger", action="store_true",
                   help="also time transformers + Liger-Kernel with loss-only filtering (Llama/Qwen2/Mistral, CUDA; "
                        f"needs liger-kernel: {baselines.LIGER_INSTALL_HINT})")
    p.add_argument("--keep-logits", action="store_true",
                   help="our models keep the LM head's logits for the backward instead of recomputing them "
                        "(CausalLM.keep_logits: one LM-head GEMM less, tokens x vocab elements more memory)")
    p.add_argument("--profile", action="store_true",
                   help="also profile one forward and one backward of every mode: GPU time by op kind (CUDA)")
    p.add_argument("--no-ideal", action="store_true", help="skip the dense keep·T bound")
    p.add_argument("--full-step", action="store_true",
                   help="the whole training step of the design page's performance model: also top-k selection by loss "
                        "(timed with the forward) and a fused AdamW step (timed apart)")
    p.add_argument("--kernels", default=os.environ.get(KERNELS_ENV, "auto"), choices=["auto", "torch"],
                   help=f"kernel backends (default from ${KERNELS_ENV}, else auto)")
    p.add_argument("--out", type=Path, default=Path("bench_e2e"),
                   help="output stem: writes <out>.json and <out>.md")
    return p


def _forward_loss(model, ids, labels, keep, mode: str, select: float | None = None):
    """Forward + per-token loss (+ top-k selection of ``select`` of the tokens) + the mode's loss."""
    from collider_autograd import filtered_mean, select_top_k, top_k_counts

    if mode == "liger":  # the fused loss needs the kept set before the forward (module docstring)
        return baselines.liger_loss(model, ids, labels, keep)
    # The kept count is known before the forward (top-k fixes it), so, as in the training step,
    # neither the selection nor filtered_mean waits on the device between forward and backward.
    # Every position is valid here (random labels), counted on the host: no device work.
    kept = None if select is None else int(top_k_counts(torch.ones(keep.shape, dtype=torch.bool), select))
    token_loss = baselines.hf_token_loss(model, ids, labels) if mode == "hf" else model.token_loss(ids, labels)
    if select is not None:
        keep = select_top_k(token_loss.detach(), select, validate=False)
    if mode == "collider":
        return filtered_mean(token_loss, keep, validate=False, kept_count=kept)
    return masked_mean(token_loss, keep)


def _step(model, ids, labels, keep, mode: str, timer: Timer, optimizer=None, select: float | None = None):
    """One forward + loss (+ top-k selection of ``select`` of the tokens) + backward (+ optimizer
    step): (forward ms, backward ms, optimizer ms, peak GiB or None on CPU)."""
    model.zero_grad(set_to_none=True)
    if timer.cuda:
        torch.cuda.reset_peak_memory_stats()
    t0 = timer.mark()
    loss = _forward_loss(model, ids, labels, keep, mode, select)
    t1 = timer.mark()
    loss.backward()
    t2 = timer.mark()
    if optimizer is not None:
        optimizer.step()
    t3 = timer.mark()
    peak = torch.cuda.max_memory_allocated() / 2**30 if timer.cuda else None
    return timer.elapsed_ms(t0, t1), timer.elapsed_ms(t1, t2), timer.elapsed_ms(t2, t3), peak


def _build(preset: str, dtype: torch.dtype, device: torch.device, baseline_modes: list[str],
           keep_logits: bool = False):
    """Random-init models of ``preset`` built directly in ``dtype`` on ``device``: ours, and one
    ``transformers`` model per requested baseline mode ("hf", "liger")."""
    import collider_models

    cfg = collider_models.preset_config(preset)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with device:
            ours = collider_models.from_config(cfg)
            ours.keep_logits = keep_logits
            theirs = {}
            if "hf" in baseline_modes:
                theirs["hf"] = baselines.build_transformers(cfg)
            if "liger" in baseline_modes:
                theirs["liger"] = baselines.build_liger(cfg)
    finally:
        torch.set_default_dtype(previous)
    return ours, theirs


def _baseline_modes(preset: str, args, device: torch.device) -> tuple[list[str], dict[str, str]]:
    """The baseline modes that run for ``preset``, and why each requested one that cannot is skipped."""
    import collider_models

    model_type = collider_models.preset_config(preset)["model_type"]
    modes, skipped = [], {}
    for mode, wanted in (("hf", args.hf), ("liger", args.liger)):
        if not wanted:
            continue
        reason = baselines.transformers_unavailable()
        if reason is None and mode == "liger":
            reason = baselines.liger_unavailable(model_type, device)
        if reason is None:
            modes.append(mode)
        else:
            skipped[mode] = reason
    return modes, skipped


def _inputs(vocab: int, B: int, T: int, keep: float, seed: int, device):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (B, T), generator=gen)
    labels = torch.randint(0, vocab, (B, T), generator=gen)
    mask = torch.rand(B, T, generator=gen) < keep
    return ids.to(device), labels.to(device), mask.to(device)


def bench_preset(preset: str, args, device: torch.device, progress) -> list[dict]:
    """One result per kept share in ``args.keep`` for one preset at batch ``args.batch``."""
    modes, skipped = _baseline_modes(preset, args, device)
    for mode, reason in skipped.items():
        progress.write(f"{preset}: no {mode} column: {reason}")
    ours, theirs = _build(preset, _DTYPES[args.dtype], device, modes, args.keep_logits)
    results = [bench_keep(preset, ours, theirs, share, args, device, progress) for share in args.keep]
    for r in results:
        r["skipped"] = skipped
    del ours, theirs
    return results


def bench_keep(preset: str, ours, theirs: dict, share: float, args, device: torch.device, progress) -> dict:
    """Interleaved medians of every mode at kept share ``share``."""
    V = ours.config.vocab_size
    B, T = args.batch, args.seq
    ids, labels, keep = _inputs(V, B, T, share, args.seed, device)
    T_ideal = max(1, round(share * T))
    ideal_ids, ideal_labels, _ = _inputs(V, B, T_ideal, 1.0, args.seed + 1, device)
    ideal_keep = torch.ones(B, T_ideal, dtype=torch.bool, device=device)
    runs = {
        "masked": (ours, ids, labels, keep, "masked"),
        "collider": (ours, ids, labels, keep, "collider"),
    }
    if not args.no_ideal:
        runs["ideal"] = (ours, ideal_ids, ideal_labels, ideal_keep, "masked")
    for mode, model in theirs.items():
        runs[mode] = (model, ids, labels, keep, mode)
    models = [ours, *theirs.values()]
    timer = Timer(device)
    optimizers = {}
    if args.full_step:  # one fused AdamW per model; the tiny lr keeps the weights near their init
        for model in models:
            optimizers[id(model)] = torch.optim.AdamW(model.parameters(), lr=1e-7, fused=device.type == "cuda")
    times = {name: {"forward": [], "backward": [], "optimizer": [], "peak_gib": []} for name in runs}
    order = list(runs)
    for i in range(args.warmup + args.repeats):
        for name in order[i % len(order):] + order[: i % len(order)]:  # rotate who goes first
            model, mode = runs[name][0], runs[name][4]
            select = share if args.full_step and name != "ideal" else None
            fwd, bwd, opt, peak = _step(*runs[name][:4], mode, timer, optimizers.get(id(model)), select)
            if i >= args.warmup:
                times[name]["forward"].append(fwd)
                times[name]["backward"].append(bwd)
                times[name]["optimizer"].append(opt)
                times[name]["peak_gib"].append(peak)
        progress.update(1)
    for model in models:
        model.zero_grad(set_to_none=True)
    result = {
        "preset": preset,
        "params_m": sum(p.numel() for p in ours.parameters()) / 1e6,
        "batch": B,
        "seq": T,
        "keep": share,
        "keep_fraction": share if args.full_step else float(keep.float().mean()),
        "full_step": bool(args.full_step),
        "ideal_seq": T_ideal,
    }
    for name, t in times.items():
        fwd, bwd = statistics.median(t["forward"]), statistics.median(t["backward"])
        opt = statistics.median(t["optimizer"])
        peaks = [p for p in t["peak_gib"] if p is not None]
        result[name] = {"forward_ms": fwd, "backward_ms": bwd, "fwd_bwd_ms": fwd + bwd, "optimizer_ms": opt,
                        "step_ms": fwd + bwd + opt, "peak_gib": max(peaks) if peaks else None,
                        "backward_all_ms": t["backward"]}
    result["ratios"] = _ratios(result)
    if args.profile and device.type == "cuda":
        result["profile"] = {}
        for name in runs:
            model, r_ids, r_labels, r_keep, mode = runs[name]
            model.zero_grad(set_to_none=True)
            select = share if args.full_step and name != "ideal" else None
            result["profile"][name] = op_breakdown.profile_phases(
                functools.partial(_forward_loss, model, r_ids, r_labels, r_keep, mode, select))
            model.zero_grad(set_to_none=True)
    del runs, optimizers
    _free(device)
    return result


def _ratios(result: dict) -> dict:
    """Collider against our masked baseline and the ideal bound; ours against the transformers
    baselines. ``baseline`` is Liger where it ran, else plain transformers."""
    m, c = result["masked"], result["collider"]
    ratios = {
        "backward": c["backward_ms"] / m["backward_ms"],
        "forward": c["forward_ms"] / m["forward_ms"],
        "step": c["step_ms"] / m["step_ms"],
    }
    if "ideal" in result:
        ratios["backward_vs_ideal"] = c["backward_ms"] / result["ideal"]["backward_ms"]
    if "hf" in result:
        ratios["masked_step_vs_hf"] = m["step_ms"] / result["hf"]["step_ms"]
        ratios["forward_vs_hf"] = m["forward_ms"] / result["hf"]["forward_ms"]
    base = "liger" if "liger" in result else "hf" if "hf" in result else None
    if base is not None:
        b = result[base]
        ratios["baseline"] = base
        ratios["masked_fwd_bwd_vs_baseline"] = m["fwd_bwd_ms"] / b["fwd_bwd_ms"]
        ratios["collider_fwd_bwd_vs_baseline"] = c["fwd_bwd_ms"] / b["fwd_bwd_ms"]
        ratios["collider_step_vs_baseline"] = c["step_ms"] / b["step_ms"]
        if c["peak_gib"] is not None:
            ratios["collider_peak_vs_baseline"] = c["peak_gib"] / b["peak_gib"]
    return ratios


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def environment(device: torch.device, kernels: str) -> dict:
    """GPU, library versions, date, commit and the kernel backend each op resolves to."""
    from collider_kernels import auto_backend, registered_ops

    env = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "python": platform.python_version(),
        "kernels": kernels,
        "device_type": device.type,
        "kernel_backends": {op: auto_backend(op, device) for op in registered_ops()},
        "env": {k: v for k, v in os.environ.items() if k.startswith(("COLLIDER_", "TRITON_"))},
    }
    for mod, dist in (("triton", "triton"), ("transformers", "transformers"), ("liger_kernel", "liger-kernel")):
        try:
            env[mod] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            env[mod] = None
    env["commit"] = os.environ.get("COLLIDER_BENCH_COMMIT")
    if env["commit"]:
        return env
    try:
        root = Path(__file__).resolve().parents[5]
        env["commit"] = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
                                       capture_output=True, text=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError, IndexError):
        env["commit"] = None
    return env


def markdown(report: dict) -> str:
    """The results as markdown tables with ratios."""
    env = report["environment"]
    cuda = env.get("device_type", "cuda") == "cuda"
    timing = "CUDA events" if cuda else "wall clock (time.perf_counter; no GPU)"
    lines = [
        "# End-to-end forward/backward: Collider vs the masked-loss baselines",
        "",
        f"- date: {env['date']}; device: {env['device']}; torch {env['torch']}; triton {env.get('triton')}; "
        f"transformers {env.get('transformers')}; liger-kernel {env.get('liger_kernel')}; commit {env.get('commit')}",
        f"- kernels: {env['kernels']} ({', '.join(f'{k}: {v}' for k, v in env['kernel_backends'].items())})",
        f"- shape: B={report['batch']} (requested), T={report['seq']}, {report['dtype']}; tokens kept "
        + ("by top-k token loss (Liger: the same share, given before the forward), step = forward + loss + "
           "selection + backward + fused AdamW" if report.get("full_step")
           else "at random, step = forward + loss + backward")
        + f"; {report['warmup']} warm-up + {report['repeats']} timed steps, medians (ms), {timing}; "
        "modes interleaved; peak memory " + ("per step (torch.cuda.max_memory_allocated)" if cuda
                                             else "not measured on CPU"),
        "- masked: ours, `(token_loss * keep).sum() / keep.sum()`, dense backward; collider: ours, `filtered_mean`; "
        + ("ours keep the LM head's logits for the backward (`--keep-logits`); " if report.get("keep_logits") else "")
        + "ideal: ours, dense step on keep·T-token sequences; hf: transformers (SDPA), masked loss; "
        "liger: transformers + Liger-Kernel, filtered labels set to -100",
        "",
        "| model | keep | B | masked fwd | masked bwd | collider fwd | collider bwd | bwd ratio | step ratio "
        "| ideal bwd | bwd / ideal | peak GiB masked / collider | opt ms |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]

    def f(x, spec=".1f"):
        return "–" if x is None else format(x, spec)

    rows = [r for r in report["results"] if "error" not in r]
    for r in report["results"]:
        if "error" in r:
            lines.append(f"| {r['preset']} | – | {r.get('batch', '–')} | error: {r['error']} |" + " |" * 9)
            continue
        m, c, ratios, ideal = r["masked"], r["collider"], r["ratios"], r.get("ideal")
        lines.append(
            f"| {r['preset']} | {r['keep']:.1f} | {r['batch']} | {f(m['forward_ms'])} | {f(m['backward_ms'])} "
            f"| {f(c['forward_ms'])} | {f(c['backward_ms'])} | {f(ratios['backward'], '.3f')} "
            f"| {f(ratios['step'], '.3f')} | {f(ideal and ideal['backward_ms'])} "
            f"| {f(ratios.get('backward_vs_ideal'), '.3f')} | {f(m['peak_gib'])} / {f(c['peak_gib'])} "
            f"| {f(m['optimizer_ms']) if r.get('full_step') else '–'} |"
        )
    versus = [r for r in rows if "baseline" in r["ratios"]]
    if versus:
        lines += [
            "",
            "Against what users run today (baseline: transformers + Liger-Kernel where Liger has a patch, else plain "
            "transformers; fwd+bwd and step in ms):",
            "",
            "| model | keep | baseline | baseline fwd+bwd | baseline step | masked fwd+bwd / baseline "
            "| collider fwd+bwd / baseline | collider step / baseline | peak GiB baseline / collider "
            "| hf fwd | our fwd / hf fwd |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in versus:
            q, b = r["ratios"], r[r["ratios"]["baseline"]]
            hf = r.get("hf")
            lines.append(
                f"| {r['preset']} | {r['keep']:.1f} | {q['baseline']} | {f(b['fwd_bwd_ms'])} | {f(b['step_ms'])} "
                f"| {f(q['masked_fwd_bwd_vs_baseline'], '.3f')} | {f(q['collider_fwd_bwd_vs_baseline'], '.3f')} "
                f"| {f(q['collider_step_vs_baseline'], '.3f')} | {f(b['peak_gib'])} / {f(r['collider']['peak_gib'])} "
                f"| {f(hf and hf['forward_ms'])} | {f(q.get('forward_vs_hf'), '.3f')} |"
            )
    notes = sorted({f"{r['preset']}: no {mode} column: {why}"
                    for r in rows for mode, why in r.get("skipped", {}).items()})
    if notes:
        lines += [""] + [f"- {n}" for n in notes]
    profiled = [{"preset": r["preset"], "mode": mode, "profile": prof}
                for r in rows for mode, prof in r.get("profile", {}).items()]
    if profiled:
        lines += ["", op_breakdown.markdown(profiled)]
    lines.append("")
    return "\n".join(lines)


def _write(report: dict, stem: Path) -> None:
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    stem.with_suffix(".md").write_text(markdown(report))


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; print the table; write ``<out>.json`` and ``<out>.md``."""
    args = build_parser().parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA GPU is available here; run with --device cpu (tiny defaults)")
    device_type = torch.device(args.device).type
    defaults = DEFAULTS.get(device_type, DEFAULTS["cpu"])
    chosen = {k: getattr(args, k) for k in defaults}
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if device_type != "cuda" and chosen["presets"] is None:
        print(f"collider-bench: no GPU, so the defaults fit a CPU: {' '.join(args.presets)}, B={args.batch}, "
              f"T={args.seq}, {args.dtype} (pass --device cuda on a GPU machine for the full models)", file=sys.stderr)
    if not all(0.0 < k <= 1.0 for k in args.keep):
        raise SystemExit(f"--keep must be in (0, 1], got {args.keep}")
    if args.batch < 1 or args.seq < 2 or args.repeats < 1 or args.warmup < 0:
        raise SystemExit("--batch and --repeats must be >= 1, --seq >= 2, --warmup >= 0")
    if device_type != "cuda" and not args.force:
        _refuse_large_on_cpu(args.presets)
    from collider_kernels import set_auto_backends

    previous = set_auto_backends(("torch",) if args.kernels == "torch" else None)
    try:
        return _run(args)
    finally:
        set_auto_backends(previous)


def _refuse_large_on_cpu(presets: list[str]) -> None:
    import collider_models

    for name in presets:
        if name not in collider_models.PRESETS:
            continue  # reported with the list of presets later
        with torch.device("meta"):
            params_m = sum(p.numel() for p in collider_models.from_preset(name).parameters()) / 1e6
        if params_m > CPU_MAX_PARAMS_M:
            raise SystemExit(f"preset {name} has {params_m:.0f}M parameters: a step on a CPU takes minutes and GBs of "
                             "memory. Use a tiny preset (e.g. tinyllama-tiny) or --device cuda, or pass --force.")


def _run(args) -> int:
    from tqdm import tqdm

    import collider_models

    unknown = [p for p in args.presets if p not in collider_models.PRESETS]
    if unknown:
        raise SystemExit(f"unknown presets {unknown}; choose from {sorted(collider_models.PRESETS)}")
    device = torch.device(args.device)
    stem = args.out.with_suffix("") if args.out.suffix in (".json", ".md") else args.out
    report = {
        "environment": environment(device, args.kernels),
        "batch": args.batch, "seq": args.seq, "keep": args.keep, "dtype": args.dtype, "full_step": args.full_step,
        "keep_logits": args.keep_logits,
        "warmup": args.warmup, "repeats": args.repeats, "results": [],
    }
    steps = len(args.presets) * len(args.keep) * (args.warmup + args.repeats)
    with tqdm(total=steps, desc="collider-bench", unit="step", file=sys.stderr) as progress:
        for preset in args.presets:
            B = args.batch
            while True:
                progress.set_postfix_str(f"{preset} B={B}")
                try:
                    results = bench_preset(preset, argparse.Namespace(**{**vars(args), "batch": B}), device, progress)
                    break
                except torch.OutOfMemoryError:
                    _free(device)
                    if B == 1:
                        results = [{"preset": preset, "batch": 1, "error": "out of memory at B=1"}]
                        break
                    tqdm.write(f"{preset}: out of memory at B={B}; retrying at B={B // 2}")
                    B //= 2
                except Exception as exc:  # a broken kernel: report it and carry on with the next preset
                    results = [{"preset": preset, "batch": B, "error": f"{type(exc).__name__}: {exc}"[:300]}]
                    tqdm.write(f"{preset}: {results[0]['error']}")
                    break
            _free(device)
            report["results"].extend(results)
            _write(report, stem)  # partial results survive an interrupted run
    table = markdown(report)
    print(table)
    print(f"wrote {stem.with_suffix('.json')} and {stem.with_suffix('.md')}")
    return 0 if all("error" not in r for r in report["results"]) else 1


if __name__ == "__main__":
    sys.exit(main())
