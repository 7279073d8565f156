"""The command-line tools run end to end on tiny settings (``collider-train`` in depth:
test_train_cli.py)."""

import json

import pytest

from collider_models.cli.train import main


def test_collider_train_help_names_the_fixed_options(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for option in ("--model", "--data", "--out", "--reference", "--selection", "--keep", "--steps", "--batch-size",
                   "--seq-len", "--grad-accum", "--lr", "--warmup", "--precision", "--device", "--eval-every",
                   "--save-every", "--resume", "--seed", "--fsdp"):
        assert option in text, option


def test_collider_train_rejects_bad_keep(tmp_path, capsys):
    assert main(["--keep", "0", "--out", str(tmp_path)]) == 2
    assert "--keep must be in (0, 1]" in capsys.readouterr().err


def test_collider_bench_tiny_cpu_run(tmp_path):
    from collider_models.cli.bench import main as bench_main

    stem = tmp_path / "bench"
    bench_main(["--presets", "tinyllama-tiny", "--batch", "2", "--seq", "32", "--device", "cpu", "--dtype",
                "float32", "--warmup", "1", "--repeats", "2", "--no-ideal", "--out", str(stem)])
    record = json.loads(stem.with_suffix(".json").read_text())
    (row,) = record["results"]
    assert row["preset"] == "tinyllama-tiny"
    for mode in ("masked", "collider"):
        assert row[mode]["backward_ms"] > 0 and len(row[mode]["backward_all_ms"]) == 2
    assert row["ratios"]["backward"] == row["collider"]["backward_ms"] / row["masked"]["backward_ms"]
    assert "tinyllama-tiny" in stem.with_suffix(".md").read_text()


def test_collider_bench_full_step_times_selection_and_optimizer(tmp_path):
    from collider_models.cli.bench import main as bench_main

    stem = tmp_path / "bench"
    bench_main(["--presets", "tinyllama-tiny", "--batch", "2", "--seq", "32", "--device", "cpu", "--dtype",
                "float32", "--warmup", "0", "--repeats", "1", "--no-ideal", "--full-step", "--kernels", "torch",
                "--out", str(stem)])
    (row,) = json.loads(stem.with_suffix(".json").read_text())["results"]
    import collider_kernels as ck

    # --kernels torch holds for the run only: backend="auto" may pick every backend again after it.
    assert ck.auto_backend("swiglu_backward", "cuda") == ck.available_backends("swiglu_backward", "cuda")[0]
    assert row["full_step"] and row["keep_fraction"] == 0.6
    for mode in ("masked", "collider"):
        r = row[mode]
        assert r["optimizer_ms"] > 0
        assert r["step_ms"] == r["forward_ms"] + r["backward_ms"] + r["optimizer_ms"]
    assert "fused AdamW" in stem.with_suffix(".md").read_text()


def test_collider_bench_several_keeps_one_row_each(tmp_path):
    from collider_models.cli.bench import main as bench_main

    stem = tmp_path / "bench"
    bench_main(["--presets", "tinyllama-tiny", "--batch", "2", "--seq", "32", "--device", "cpu", "--dtype",
                "float32", "--warmup", "0", "--repeats", "1", "--keep", "1.0", "0.5", "--out", str(stem)])
    rows = json.loads(stem.with_suffix(".json").read_text())["results"]
    assert [r["keep"] for r in rows] == [1.0, 0.5]
    assert rows[0]["ideal_seq"] == 32 and rows[1]["ideal_seq"] == 16
    assert rows[1]["keep_fraction"] < 1.0
    with pytest.raises(SystemExit, match="--keep"):
        bench_main(["--keep", "0.5", "1.5", "--out", str(stem)])
