"""``collider-bench``: end-to-end forward/backward timing, Collider against the masked-loss baseline.

For each preset (default the three full-size models) at B×T tokens with a random share
``--keep`` of positions kept, one run interleaves, step by step:

* ``masked``: ``(token_loss * keep).sum() / keep.sum()`` and a dense backward (Rho-1 style);
* ``collider``: :func:`collider_autograd.filtered_mean` (backward over kept tokens only);
* ``ideal``: the dense masked step on sequences of ``keep·T`` tokens, all kept: the bound
  a kept-rows backward is compared with (DESIGN.md §5);
* ``hf`` (with ``--hf``): the same-shaped ``transformers`` model (SDPA) with the masked loss.

With ``--full-step`` each step is the whole training step of DESIGN.md §5: the kept tokens
are chosen by top-k of the token loss (timed with the forward) and a fused AdamW step follows
the backward (timed apart). Times are CUDA-event medians after warm-up; peak memory is per
step. Results go to ``<out>.json`` and ``<out>.md``.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
from pathlib import Path

import torch

from collider_models.reference import masked_mean
from collider_models.timing import Timer

# Kernel backends: "auto" lets collider-kernels pick (the fastest measured on CUDA);
# "torch" restricts backend="auto" to the torch backend (collider_kernels.set_auto_backends).
KERNELS_ENV = "COLLIDER_BENCH_KERNELS"
FULL_PRESETS = ("tinyllama-1.1b", "qwen2.5-1.5b", "phi-1.5")
_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
KERNEL_OPS = ("gather_matmul", "gathered_weight_grad", "scatter_add_rows", "masked_attention_backward",
              "rms_norm_backward", "swiglu_backward", "layer_norm_backward", "gelu_new_backward", "rotary_backward")


def build_parser() -> argparse.ArgumentParser:
    """Command-line arguments of ``collider-bench``."""
    p = argparse.ArgumentParser(prog="collider-bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--presets", nargs="+", default=list(FULL_PRESETS))
    p.add_argument("--batch", type=int, default=8, help="sequences per step (halved on out-of-memory)")
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--keep", type=float, nargs="+", default=[0.6],
                   help="share(s) of positions kept (at random, or by top-k with --full-step); one row each")
    p.add_argument("--dtype", default="bfloat16", choices=sorted(_DTYPES))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--hf", action="store_true", help="also time the transformers model")
    p.add_argument("--no-ideal", action="store_true", help="skip the dense keep·T bound")
    p.add_argument("--full-step", action="store_true",
                   help="the whole training step of DESIGN.md §5: also top-k token selection by loss "
                        "(timed with the forward) and a fused AdamW step (timed apart)")
    p.add_argument("--kernels", default=os.environ.get(KERNELS_ENV, "auto"), choices=["auto", "torch"],
                   help=f"kernel backends (default from ${KERNELS_ENV}, else auto)")
    p.add_argument("--out", type=Path, default=Path("bench_e2e"),
                   help="output stem: writes <out>.json and <out>.md")
    return p


def _step(model, ids, labels, keep, mode: str, timer: Timer, optimizer=None, select: float | None = None):
    """One forward + loss (+ top-k selection of ``select`` of the tokens) + backward (+ optimizer
    step): (forward ms, backward ms, optimizer ms, peak GiB)."""
    from collider_autograd import filtered_mean, select_top_k

    model.zero_grad(set_to_none=True)
    if timer.cuda:
        torch.cuda.reset_peak_memory_stats()
    t0 = timer.mark()
    if mode == "hf":
        logits = model(ids).logits  # (B, T, V)
        V = logits.shape[-1]
        token_loss = torch.nn.functional.cross_entropy(
            logits.float().view(-1, V), labels.view(-1), reduction="none"
        ).view(labels.shape)  # (B, T)
    else:
        token_loss = model.token_loss(ids, labels)  # (B, T) fp32
    if select is not None:
        keep = select_top_k(token_loss.detach(), select)
    loss = filtered_mean(token_loss, keep, validate=False) if mode == "collider" else masked_mean(token_loss, keep)
    t1 = timer.mark()
    loss.backward()
    t2 = timer.mark()
    if optimizer is not None:
        optimizer.step()
    t3 = timer.mark()
    peak = torch.cuda.max_memory_allocated() / 2**30 if timer.cuda else float("nan")
    return timer.elapsed_ms(t0, t1), timer.elapsed_ms(t1, t2), timer.elapsed_ms(t2, t3), peak


def _build(preset: str, dtype: torch.dtype, device: torch.device, hf: bool):
    """Random-init model(s) of ``preset`` built directly in ``dtype`` on ``device``."""
    import collider_models

    cfg = collider_models.preset_config(preset)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with device:
            ours = collider_models.from_config(cfg)
            theirs = None
            if hf:
                import transformers

                hf_cfg = transformers.AutoConfig.for_model(**cfg)
                theirs = transformers.AutoModelForCausalLM.from_config(hf_cfg, dtype=dtype, attn_implementation="sdpa")
    finally:
        torch.set_default_dtype(previous)
    return ours, theirs


def _inputs(vocab: int, B: int, T: int, keep: float, seed: int, device):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (B, T), generator=gen)
    labels = torch.randint(0, vocab, (B, T), generator=gen)
    mask = torch.rand(B, T, generator=gen) < keep
    return ids.to(device), labels.to(device), mask.to(device)


def bench_preset(preset: str, args, device: torch.device, progress) -> list[dict]:
    """One result per kept share in ``args.keep`` for one preset at batch ``args.batch``."""
    ours, theirs = _build(preset, _DTYPES[args.dtype], device, args.hf)
    results = [bench_keep(preset, ours, theirs, share, args, device, progress) for share in args.keep]
    del ours, theirs
    return results


def bench_keep(preset: str, ours, theirs, share: float, args, device: torch.device, progress) -> dict:
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
    if theirs is not None:
        runs["hf"] = (theirs, ids, labels, keep, "hf")
    timer = Timer(device)
    optimizers = {}
    if args.full_step:  # one fused AdamW per model; the tiny lr keeps the weights near their init
        for model in (ours, theirs):
            if model is not None:
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
    for model in (ours, theirs):
        if model is not None:
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
        result[name] = {"forward_ms": fwd, "backward_ms": bwd, "optimizer_ms": opt, "step_ms": fwd + bwd + opt,
                        "peak_gib": max(t["peak_gib"]), "backward_all_ms": t["backward"]}
    m, c = result["masked"], result["collider"]
    result["ratios"] = {
        "backward": c["backward_ms"] / m["backward_ms"],
        "forward": c["forward_ms"] / m["forward_ms"],
        "step": c["step_ms"] / m["step_ms"],
    }
    if "ideal" in result:
        result["ratios"]["backward_vs_ideal"] = c["backward_ms"] / result["ideal"]["backward_ms"]
    if "hf" in result:
        result["ratios"]["masked_step_vs_hf"] = m["step_ms"] / result["hf"]["step_ms"]
    del runs, optimizers
    _free(device)
    return result


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def environment(device: torch.device, kernels: str) -> dict:
    """GPU, library versions, date, commit and the kernel backend each op resolves to."""
    from collider_kernels import auto_backend

    env = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "python": platform.python_version(),
        "kernels": kernels,
        "kernel_backends": {op: auto_backend(op, device) for op in KERNEL_OPS},
        "env": {k: v for k, v in os.environ.items() if k.startswith(("COLLIDER_", "TRITON_"))},
    }
    for mod in ("triton", "transformers"):
        try:
            env[mod] = __import__(mod).__version__
        except ImportError:
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
    """The results as a markdown table with ratios."""
    env = report["environment"]
    lines = [
        "# End-to-end forward/backward: Collider vs masked-loss baseline",
        "",
        f"- date: {env['date']}; device: {env['device']}; torch {env['torch']}; triton {env.get('triton')}; "
        f"transformers {env.get('transformers')}; commit {env.get('commit')}",
        f"- kernels: {env['kernels']} ({', '.join(f'{k}: {v}' for k, v in env['kernel_backends'].items())})",
        f"- shape: B={report['batch']} (requested), T={report['seq']}, {report['dtype']}; tokens kept "
        + ("by top-k token loss, step = forward + loss + selection + backward + fused AdamW"
           if report.get("full_step") else "at random, step = forward + loss + backward")
        + f"; {report['warmup']} warm-up + {report['repeats']} timed steps, medians (ms), CUDA events; "
        "modes interleaved",
        "- masked: `(token_loss * keep).sum() / keep.sum()`, dense backward; collider: `filtered_mean`; "
        "ideal: dense step on keep·T-token sequences; hf: transformers (SDPA), masked loss",
        "",
        "| model | keep | B | masked fwd | masked bwd | collider fwd | collider bwd | bwd ratio | step ratio "
        "| ideal bwd | bwd / ideal | hf step | masked step / hf | peak GiB masked / collider | opt ms |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]

    def f(x, spec=".1f"):
        return "–" if x is None else format(x, spec)

    for r in report["results"]:
        if "error" in r:
            lines.append(f"| {r['preset']} | – | {r.get('batch', '–')} | error: {r['error']} |" + " |" * 11)
            continue
        m, c, ratios = r["masked"], r["collider"], r["ratios"]
        ideal, hf = r.get("ideal"), r.get("hf")
        lines.append(
            f"| {r['preset']} | {r['keep']:.1f} | {r['batch']} | {f(m['forward_ms'])} | {f(m['backward_ms'])} "
            f"| {f(c['forward_ms'])} "
            f"| {f(c['backward_ms'])} | {f(ratios['backward'], '.3f')} | {f(ratios['step'], '.3f')} "
            f"| {f(ideal and ideal['backward_ms'])} | {f(ratios.get('backward_vs_ideal'), '.3f')} "
            f"| {f(hf and hf['step_ms'])} | {f(ratios.get('masked_step_vs_hf'), '.3f')} "
            f"| {f(m['peak_gib'])} / {f(c['peak_gib'])} | {f(m['optimizer_ms']) if r.get('full_step') else '–'} |"
        )
    lines.append("")
    return "\n".join(lines)


def _write(report: dict, stem: Path) -> None:
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    stem.with_suffix(".md").write_text(markdown(report))


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; print the table; write ``<out>.json`` and ``<out>.md``."""
    args = build_parser().parse_args(argv)
    if not all(0.0 < k <= 1.0 for k in args.keep):
        raise SystemExit(f"--keep must be in (0, 1], got {args.keep}")
    if args.batch < 1 or args.seq < 2 or args.repeats < 1 or args.warmup < 0:
        raise SystemExit("--batch and --repeats must be >= 1, --seq >= 2, --warmup >= 0")
    from collider_kernels import set_auto_backends

    previous = set_auto_backends(("torch",) if args.kernels == "torch" else None)
    try:
        return _run(args)
    finally:
        set_auto_backends(previous)


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
