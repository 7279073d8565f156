"""Problem size, error measures, configuration sweeps and result files shared by the kernel
benchmarks (run them as scripts: this folder is on sys.path). Timing is :mod:`collider_kernels.timing`."""

import datetime
import json
import os
import time

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


def time_configs(configs, make_fn, deadline: float, log, **timing) -> list[dict]:
    """Time ``make_fn(cfg)()`` for each Triton block configuration with
    :func:`collider_kernels.timing.median_ms` (``timing``: its keyword arguments) until the
    ``deadline`` (``time.time()``); a configuration that fails is reported, not fatal."""
    from collider_kernels.timing import median_ms

    results = []
    for cfg in configs:
        if time.time() > deadline:
            log("  sweep stopped at the time budget")
            break
        try:
            results.append({"config": cfg, "ms": median_ms(make_fn(cfg), **timing)})
        except Exception as e:  # a config that does not compile or fit
            results.append({"config": cfg, "error": f"{type(e).__name__}: {e}"[:200]})
    best = best_config(results)
    if best:
        log(f"  best swept config {best['config']}: {best['ms']:.3f} ms")
    return results


def best_config(results: list[dict]) -> dict | None:
    """The fastest timed entry of :func:`time_configs`' results, or None."""
    return min((r for r in results if "ms" in r), key=lambda r: r["ms"], default=None)


DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def row_bench_parser(description: str, default_stem: str, budget_s: float):
    """The arguments the row-wise kernel benchmarks share: ``--out`` (results stem under
    ``benchmarks/results``), ``--dtype``, ``--sweep`` and its ``--budget-s``."""
    import argparse

    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "results", default_stem),
                    help="output path stem: writes STEM.json and STEM.md")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    ap.add_argument("--sweep", action="store_true", help="also time alternative Triton block configurations")
    ap.add_argument("--budget-s", type=float, default=budget_s, help="stop the sweep after this many seconds")
    return ap


def sweep_lines(rows: list[dict], title: str, labels, default_ms) -> list[str]:
    """Markdown table of the rows that carry a ``sweep``: the ``labels`` columns ((header, row ->
    text) pairs), the default configuration's ms (``default_ms(row)``), the best ms and config."""
    swept = [r for r in rows if r.get("sweep")]
    if not swept:
        return []
    heads = [h for h, _ in labels] + ["default", "best", "best config"]
    lines = ["", f"## {title}", "", "| " + " | ".join(heads) + " |", "|" + "---|" * len(heads)]
    for r in swept:
        best = best_config(r["sweep"])
        if best:
            cells = [f(r) for _, f in labels] + [f"{default_ms(r):.3f}", f"{best['ms']:.3f}", str(best["config"])]
            lines.append("| " + " | ".join(cells) + " |")
    return lines


def environment(dtype: str, rows: int, ops) -> dict:
    """The run's GPU, versions, date, dtype, row count and ``auto`` backend of each op."""
    import triton

    import collider_kernels as ck

    return {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
            "date": datetime.date.today().isoformat(), "dtype": dtype, "rows": rows,
            "auto_backends": {op: ck.available_backends(op, "cuda")[0] for op in ops}}


def save_results(stem: str, meta: dict, rows: list[dict], write_md) -> None:
    """Write ``stem.json`` (meta and rows) and ``stem.md`` (``write_md(path, meta, rows)``)."""
    os.makedirs(os.path.dirname(os.path.abspath(stem)), exist_ok=True)
    with open(stem + ".json", "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    write_md(stem + ".md", meta, rows)
