"""The masked-attention kernel benchmark's smoke mode on CPU (Triton interpreter): the script's
logic end to end on a tiny shape, with its check against the torch backend."""

import importlib.util
import json
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "kernels" / "bench_attention.py"


def _load_script():
    spec = importlib.util.spec_from_file_location("bench_attention", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(SCRIPT.parent))  # the script imports its sibling `common`
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(SCRIPT.parent))
    return module


def test_attention_benchmark_smoke_checks_against_the_torch_backend(tmp_path):
    bench = _load_script()
    bench.main(["--smoke", "--models", "Qwen2.5-1.5B", "--keeps", "0.5", "--check", "--out-dir", str(tmp_path)])
    record = json.loads((tmp_path / "attention_smoke.json").read_text())
    (row,) = record["rows"]
    assert record["info"]["gpu"] == "cpu (smoke)" and record["info"]["shape"]["T"] == 48
    assert row["n"] > 0 and row["ms"] > 0 and row["dense_ms"] > 0
    assert max(row["max_rel_err_vs_torch_backend"].values()) < 1e-4  # fp32 under the interpreter
    assert "attention_smoke.md" in {p.name for p in tmp_path.iterdir()}
