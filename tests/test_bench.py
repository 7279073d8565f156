"""collider-bench on a CPU: defaults that fit the device, an honest report, baselines skipped with a reason."""

import json

import pytest

from collider_models.cli.bench import main as bench_main


def test_cpu_defaults_pick_a_tiny_model_and_say_so(tmp_path, capsys):
    stem = tmp_path / "bench"
    rc = bench_main(["--device", "cpu", "--warmup", "0", "--repeats", "1", "--no-ideal", "--liger", "--out", str(stem)])
    assert rc == 0
    err = capsys.readouterr().err
    assert "no GPU" in err and "tinyllama-tiny" in err
    record = json.loads(stem.with_suffix(".json").read_text())
    (row,) = record["results"]
    assert row["preset"] == "tinyllama-tiny" and row["batch"] == 4 and row["seq"] == 256
    assert row["masked"]["peak_gib"] is None  # not measured on CPU, not NaN
    assert "liger" in row["skipped"] and "CUDA" in row["skipped"]["liger"]
    md = stem.with_suffix(".md").read_text()
    assert "wall clock" in md and "CUDA events" not in md and "nan" not in md
    assert "no liger column" in md


def test_full_size_preset_refused_on_cpu(tmp_path):
    with pytest.raises(SystemExit, match="tinyllama-1.1b has 1100M parameters"):
        bench_main(["--device", "cpu", "--presets", "tinyllama-1.1b", "--out", str(tmp_path / "b")])


def test_cuda_requested_without_a_gpu_is_a_plain_error(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU; the message is for machines without one")
    with pytest.raises(SystemExit, match="no CUDA GPU"):
        bench_main(["--device", "cuda", "--out", str(tmp_path / "b")])


def test_hf_baseline_column_on_cpu(tmp_path):
    pytest.importorskip("transformers")
    stem = tmp_path / "bench"
    bench_main(["--device", "cpu", "--presets", "tinyllama-tiny", "--batch", "2", "--seq", "32", "--warmup", "0",
                "--repeats", "1", "--no-ideal", "--hf", "--out", str(stem)])
    (row,) = json.loads(stem.with_suffix(".json").read_text())["results"]
    q = row["ratios"]
    assert q["baseline"] == "hf"
    assert q["masked_fwd_bwd_vs_baseline"] == row["masked"]["fwd_bwd_ms"] / row["hf"]["fwd_bwd_ms"]
    assert q["forward_vs_hf"] == row["masked"]["forward_ms"] / row["hf"]["forward_ms"]
    assert "Against what users run today" in stem.with_suffix(".md").read_text()


@pytest.mark.parametrize("name,kind", [
    ("void cutlass::Kernel2<cutlass_80_wmma_tensorop_bf16_s161616gemm_bf16_32x32_128x2_nn_align8>", "gemm"),
    ("nvjet_tst_192x192_64x4_2x1_v_bz_coopB_TNT", "gemm"),
    ("void pytorch_flash::flash_bwd_dq_dk_dv_loop_seqk_parallel_kernel<Flash_bwd_kernel_traits<128>>", "attention"),
    ("_rms_norm_backward_kernel", "norm"),
    ("_norm_bwd_kernel", "norm"),
    ("_ce_fwd_kernel", "lm head + loss"),
    ("_swiglu_bwd_kernel", "activation"),
    ("_attn_bwd_dkdv", "attention"),
    ("cudnn_generated_fort_native_sdpa_sm90_flash_bprop_wgmma_f16_knob_26", "attention"),
    ("void at::native::vectorized_elementwise_kernel<4, at::native::silu_kernel>", "activation"),
    ("_liger_rope_kernel", "rotary"),
    ("void at::native::(anonymous namespace)::cunn_SoftMaxForward<4, float>", "lm head + loss"),
    ("void at::native::multi_tensor_apply_kernel<FusedAdamMathFunctor>", "optimizer"),
    ("void at::native::index_elementwise_kernel<128, 4>", "gather / scatter / index"),
    ("void at::native::unrolled_elementwise_kernel<direct_copy_kernel_cuda>", "copy / cast / fill"),
    ("some_unknown_kernel", "other"),
])
def test_kernel_names_map_to_op_kinds(name, kind):
    from collider_models.cli.op_breakdown import kind_of

    assert kind_of(name) == kind


def test_timeline_unions_overlapping_kernels_and_names_the_gaps():
    """Span, busy time (overlaps counted once) and idle gaps of a kernel timeline (µs in, ms out)."""
    from types import SimpleNamespace

    import torch

    from collider_models.cli.op_breakdown import _timeline

    def event(name, start, end, device=torch.autograd.DeviceType.CUDA):
        return SimpleNamespace(name=name, device_type=device, time_range=SimpleNamespace(start=start, end=end))

    events = [event("c", 400.0, 450.0), event("a", 100.0, 200.0), event("b", 150.0, 250.0),
              event("host_op", 0.0, 1000.0, torch.autograd.DeviceType.CPU), event("d", 460.0, 470.0)]
    line = _timeline(SimpleNamespace(events=lambda: events), gaps=1)
    assert line["kernel_count"] == 4
    assert line["span_ms"] == 0.370 and line["busy_ms"] == 0.210 and abs(line["idle_ms"] - 0.160) < 1e-12
    assert line["gaps"] == [{"us": 150.0, "after": "b", "before": "c"}]
    empty = _timeline(SimpleNamespace(events=lambda: []), gaps=3)
    assert empty["busy_ms"] == empty["idle_ms"] == 0.0 and empty["gaps"] == []


def test_full_step_on_cpu_selects_the_share_and_times_the_optimizer(tmp_path):
    stem = tmp_path / "bench"
    rc = bench_main(["--device", "cpu", "--warmup", "0", "--repeats", "1", "--no-ideal", "--full-step",
                     "--keep", "0.5", "--out", str(stem)])
    assert rc == 0
    (row,) = json.loads(stem.with_suffix(".json").read_text())["results"]
    assert row["full_step"] and row["keep_fraction"] == 0.5
    for mode in ("masked", "collider"):
        assert row[mode]["optimizer_ms"] > 0 and row[mode]["step_ms"] > row[mode]["fwd_bwd_ms"]


def test_full_step_losses_agree_between_modes():
    """The sync-free Collider loss (kept count planned before the forward) equals the masked loss
    over the same top-k selection."""
    import torch

    import collider_models
    from collider_models.cli.bench import _forward_loss, _inputs

    torch.manual_seed(0)
    model = collider_models.from_preset("tinyllama-tiny").double()
    ids, labels, keep = _inputs(model.config.vocab_size, 2, 24, 0.5, seed=3, device="cpu")
    for share in (0.3, 0.49, 1.0):  # 0.49 of 48 positions rounds up
        collider = _forward_loss(model, ids, labels, keep, "collider", share)
        masked = _forward_loss(model, ids, labels, keep, "masked", share)
        torch.testing.assert_close(collider, masked, rtol=1e-12, atol=1e-12)
