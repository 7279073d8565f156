"""The backend registry: listing, ``auto`` order and fallback, explicit backends that cannot take a
call. Listings take device names only, so the CUDA rules are checked without a GPU."""

import importlib

import pytest
import torch

import collider_kernels as ck
from collider_kernels import backends

OPS = ("cross_entropy_backward", "cross_entropy_forward", "gather_matmul", "gathered_weight_grad",
       "gelu_new_backward", "layer_norm_backward", "masked_attention_backward", "rms_norm_backward",
       "rms_norm_forward", "rotary_backward", "rotary_forward", "scatter_add_rows", "swiglu_backward",
       "swiglu_forward")


def test_registered_ops():
    assert ck.registered_ops() == OPS


def test_available_backends_without_arguments_lists_every_op_and_device():
    listing = ck.available_backends()
    assert tuple(listing) == OPS
    for op, per_device in listing.items():
        assert set(per_device) == {"cpu", "cuda"}
        assert per_device["cpu"][0] == "torch"
        assert "torch" in per_device["cuda"]
        assert per_device["cuda"] == ck.available_backends(op, "cuda")  # the two-argument form agrees
        assert per_device == ck.available_backends(op)
    assert ck.available_backends(device="cpu") == {op: d["cpu"] for op, d in listing.items()}


def test_available_backends_follow_the_auto_order_on_cuda():
    for op in OPS:
        order = backends.AUTO_ORDER_CUDA_BY_OP.get(op, backends.AUTO_ORDER_CUDA)
        listed = ck.available_backends(op, "cuda")
        assert listed == [b for b in order if b in listed]


def test_auto_order_on_cuda_lists_every_backend():
    orders = [backends.AUTO_ORDER_CUDA, *backends.AUTO_ORDER_CUDA_BY_OP.values()]
    for order in orders:
        assert sorted(order) == sorted(backends.BACKENDS)


def test_unknown_op():
    with pytest.raises(KeyError, match="unknown op"):
        ck.available_backends("nope", "cpu")


def test_auto_on_cpu_is_torch():
    for op in OPS:
        assert ck.auto_backend(op, "cpu") == "torch"
        assert backends.resolve_backend(op, "auto", "cpu") is backends._REGISTRY[op]["torch"].fn


def test_auto_falls_back_by_dtype_and_call():
    """On CUDA, fp64 is no kernel dtype: ``auto`` takes the next backend that takes it (torch);
    a row-norm row wider than the Triton kernel holds falls back the same way."""
    for op in OPS:
        if "triton" not in ck.available_backends(op, "cuda"):
            continue
        first = ck.auto_backend(op, "cuda", (torch.bfloat16,))
        assert first == ck.available_backends(op, "cuda")[0]
        assert ck.auto_backend(op, "cuda", (torch.float64,)) == "torch"
        assert ck.auto_backend(op, "cuda", (torch.bfloat16, torch.float64)) == "torch"
    if "triton" in ck.available_backends("rms_norm_backward", "cuda"):
        from collider_kernels.triton.row_norms import MAX_NORM_WIDTH

        wide = torch.empty(1, MAX_NORM_WIDTH + 1)
        args = (wide, wide, wide[0], 1e-5, None)
        assert ck.auto_backend("rms_norm_backward", "cuda", (torch.float32,), args) == "torch"
        assert ck.auto_backend("rms_norm_backward", "cuda", (torch.float32,), (wide[:, :8], wide[:, :8],
                                                                                 wide[0, :8], 1e-5, None)) == "triton"


def test_explicit_backend_that_cannot_take_the_call_is_an_error():
    if "triton" not in ck.available_backends("gather_matmul", "cuda"):
        pytest.skip("triton is not installed")
    with pytest.raises(RuntimeError, match=r"'triton' of gather_matmul does not take dtype float64"):
        backends.resolve_backend("gather_matmul", "triton", "cuda", (torch.float64,))
    x, w = torch.randn(6, 4, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64)
    if "triton" in ck.available_backends("gather_matmul", "cpu"):  # the interpreter
        with pytest.raises(RuntimeError, match="float64"):
            ck.gather_matmul(x, None, w, backend="triton")
    else:
        with pytest.raises(RuntimeError, match="device 'cpu'"):
            ck.gather_matmul(x, None, w, backend="triton")
    from collider_kernels.triton.row_norms import MAX_NORM_WIDTH

    wide = torch.empty(1, MAX_NORM_WIDTH + 1)
    with pytest.raises(RuntimeError, match="wider than"):
        backends.resolve_backend("rms_norm_backward", "triton", "cuda", (torch.float32,),
                                 (wide, wide, wide[0], 1e-5, None))


def test_unknown_and_unavailable_backends():
    x, w, idx = torch.randn(6, 4), torch.randn(3, 4), torch.tensor([0, 5, 2])
    with pytest.raises(ValueError, match="backend"):
        ck.gather_matmul(x, idx, w, backend="nope")
    with pytest.raises(RuntimeError, match="cupy"):
        ck.gather_matmul(x, idx, w, backend="cupy")  # CUDA only (or not installed)
    with pytest.raises(RuntimeError, match="cupy"):
        ck.swiglu_backward(torch.randn(2, 4), x, x, idx[:2], backend="cupy")  # no CuPy implementation


def test_auto_choice_with_a_per_call_check_is_not_cached(monkeypatch):
    """auto remembers its choice per (op, device type, dtypes), except where a backend's check of
    the call's arguments took part: that decision is made on every call."""
    import dataclasses

    op = "swiglu_backward"
    impls = backends._REGISTRY[op]
    verdicts = iter(["too wide", None])
    first = backends._order(op, "cuda")[0]
    monkeypatch.setitem(impls, first, dataclasses.replace(impls.get(first, impls["torch"]), devices=("cuda",),
                                                          check=lambda *a: next(verdicts)))
    monkeypatch.setattr(backends, "_AUTO_CHOICE", {})
    dt = (torch.bfloat16,)
    assert backends.auto_backend(op, "cuda", dt, args=(1,)) != first  # refused by the check
    assert backends.auto_backend(op, "cuda", dt, args=(1,)) == first  # asked again, and taken
    assert not backends._AUTO_CHOICE
    assert backends.auto_backend(op, "cpu", dt) == "torch" and backends._AUTO_CHOICE  # no check: remembered


def test_set_auto_backends_restricts_auto_only():
    op = "swiglu_backward"
    assert ck.auto_backend(op, "cpu") == "torch"
    expected = backends.available_backends(op, "cuda")[0]  # listing only: no CUDA tensor is made
    assert ck.auto_backend(op, "cuda") == expected
    previous = ck.set_auto_backends(("torch",))
    try:
        assert ck.auto_backend(op, "cuda") == "torch"
        assert backends.resolve_backend(op, "auto", "cuda") is backends._REGISTRY[op]["torch"].fn
        if "triton" in backends._REGISTRY[op]:  # an explicit backend is unaffected
            assert backends.resolve_backend(op, "triton", "cuda") is backends._REGISTRY[op]["triton"].fn
    finally:
        ck.set_auto_backends(previous)
    assert ck.auto_backend(op, "cuda") == expected
    for bad in (("triton",), ("torch", "nope")):
        with pytest.raises(ValueError, match="subset"):
            ck.set_auto_backends(bad)


def test_backends_import_no_front_door():
    """The Triton and CuPy modules register kernels only; the registry does the fallbacks."""
    import pathlib

    root = pathlib.Path(ck.__file__).parent
    for folder in ("triton", "cupy"):
        for path in (root / folder).glob("*.py"):
            text = path.read_text()
            assert "collider_kernels.ops" not in text, path.name
            assert "_torch(" not in text, path.name  # no torch implementation called directly


def test_triton_backend_is_registered_for_every_op():
    """Where Triton runs (CUDA, or CPU under the interpreter the test setup enables), every op has
    a Triton implementation; CuPy, where installed on a GPU, has the two GEMMs and the scatter-add."""
    pytest.importorskip("triton")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    for op in OPS:
        assert "triton" in ck.available_backends(op, device), op
    if torch.cuda.is_available() and "cupy" in backends._REGISTRY["gather_matmul"]:
        for op in ("gather_matmul", "gathered_weight_grad", "scatter_add_rows"):
            assert "cupy" in ck.available_backends(op, "cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("op", [op for op in OPS if backends._order(op, "cuda")[0] == "triton"])
def test_gpu_auto_picks_triton_where_it_comes_first(op):
    """On a GPU, ``auto`` resolves every op whose CUDA order starts with Triton to its Triton kernel."""
    module = importlib.import_module(f"collider_kernels.triton.{op}")
    registered = backends.resolve_backend(op, "triton", "cuda")
    assert registered.__module__ == module.__name__
    assert backends.resolve_backend(op, "auto", "cuda") is registered
