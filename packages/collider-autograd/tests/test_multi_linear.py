"""The one-GEMM projections equal separate Linear layers: outputs and every gradient, dense and
sparse (shared kept rows, different kept rows, an unused output), with and without biases."""

import importlib

import pytest
import torch
from autograd_testing import assert_all_close, kept_index, outputs_and_grads, sparse_grad

from collider_autograd import SparseGradientError, TokenSparseTensor, allow_densify, linear, multi_linear

multi_linear_module = importlib.import_module("collider_autograd.layers.multi_linear")  # the function shadows it

B, T, H = 3, 7, 12
OUTS = (10, 4, 4)  # e.g. q, k, v widths


def _params(gen, bias, dtype=torch.float64):
    ws = [torch.randn(o, H, generator=gen, dtype=dtype).requires_grad_() for o in OUTS]
    bs = [torch.randn(o, generator=gen, dtype=dtype).requires_grad_() for o in OUTS] if bias else [None] * 3
    return ws, bs


def _sparse(gen, index, width):
    return sparse_grad(gen, index, (B, T), width)


def _index(gen, share):
    return kept_index(gen, B * T, share)


def _grads(fn, x, ws, bs, grads):
    leaves = [t for t in [x, *ws, *bs] if t is not None]
    return outputs_and_grads(fn(x, ws, bs), leaves, grads)


def _separate(x, ws, bs):
    return [linear(x, w, b) for w, b in zip(ws, bs, strict=True)]


def _case(kind, gen):
    if kind == "dense":
        return [torch.randn(B, T, o, generator=gen, dtype=torch.float64) for o in OUTS]
    if kind in ("sparse", "none kept"):
        index = _index(gen, 0.5 if kind == "sparse" else 0.0)
        return [_sparse(gen, index, o) for o in OUTS]
    if kind == "unused output":
        index = _index(gen, 0.5)
        return [_sparse(gen, index, OUTS[0]), None, _sparse(gen, index, OUTS[2])]
    if kind == "different rows":
        return [_sparse(gen, _index(gen, 0.5), o) for o in OUTS]
    if kind == "sparse and dense":
        return [_sparse(gen, _index(gen, 0.5), OUTS[0])] + [torch.randn(B, T, o, generator=gen, dtype=torch.float64)
                                                            for o in OUTS[1:]]
    raise AssertionError(kind)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("kind", ["dense", "sparse", "none kept", "unused output", "different rows"])
def test_equals_separate_linear_layers(bias, kind):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(B, T, H, generator=gen, dtype=torch.float64, requires_grad=True)
    ws, bs = _params(gen, bias)
    grads = _case(kind, gen)
    want = _grads(_separate, x, ws, bs, grads)
    assert_all_close(_grads(lambda x, ws, bs: multi_linear(x, ws, bs), x, ws, bs, grads), want)


def test_sparse_meeting_dense_raises_as_separate_layers_do():
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(B, T, H, generator=gen, dtype=torch.float64, requires_grad=True)
    ws, bs = _params(gen, True)
    grads = _case("sparse and dense", gen)
    for fn in (_separate, lambda x, ws, bs: multi_linear(x, ws, bs)):
        with pytest.raises(SparseGradientError, match="meets a dense gradient"):
            _grads(fn, x, ws, bs, grads)
    with allow_densify():  # the plain gradient of the sum, as the separate layers give it
        want = _grads(_separate, x, ws, bs, grads)
        got = _grads(lambda x, ws, bs: multi_linear(x, ws, bs), x, ws, bs, grads)
    assert_all_close(got, want)


def test_sparse_input_gradient_keeps_the_rows():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(B, T, H, generator=gen, dtype=torch.float64, requires_grad=True)
    ws, bs = _params(gen, True)
    index = _index(gen, 0.4)
    seen = {}
    x_in = x * 1.0
    x_in.register_hook(lambda g: seen.setdefault("grad", g))
    outs = multi_linear(x_in, ws, bs)
    torch.autograd.backward(list(outs), [_sparse(gen, index, o) for o in OUTS])
    assert isinstance(seen["grad"], TokenSparseTensor) and torch.equal(seen["grad"].index, index)
    assert all(w.grad.shape == w.shape for w in ws)


@pytest.mark.parametrize("layout", ["one buffer", "gap", "reordered", "separate"])
def test_gradients_in_one_buffer_are_read_without_a_copy(layout, monkeypatch):
    """Kept-rows gradients that are consecutive column slices of one (n, sum out_i) buffer (as the
    attention layer writes dQ, dK, dV) are used as that buffer; any other layout is concatenated.
    The gradients are the same either way."""
    gen = torch.Generator().manual_seed(9)
    x = torch.randn(B, T, H, generator=gen, dtype=torch.float64, requires_grad=True)
    ws, bs = _params(gen, True)
    index = _index(gen, 0.5)
    n, N = index.numel(), sum(OUTS)
    buf = torch.randn(n, N + (3 if layout == "gap" else 0), generator=gen, dtype=torch.float64)
    cols = {"one buffer": [(0, 10), (10, 14), (14, 18)], "gap": [(0, 10), (11, 15), (17, 21)],
            "reordered": [(8, 18), (0, 4), (4, 8)], "separate": None}[layout]
    values = ([buf[:, a:b] for a, b in cols] if cols else
              [torch.randn(n, o, generator=gen, dtype=torch.float64) for o in OUTS])
    grads = [TokenSparseTensor(v, index, (B, T)) for v in values]
    used = []
    one_buffer = multi_linear_module._one_buffer
    monkeypatch.setattr(multi_linear_module, "_one_buffer", lambda rows: used.append(one_buffer(rows)) or used[-1])
    got = _grads(lambda x, ws, bs: multi_linear(x, ws, bs), x, ws, bs, grads)
    assert len(used) == 1
    if layout == "one buffer":
        assert used[0] is not None and used[0].data_ptr() == buf.data_ptr() and used[0].shape == (n, N)
    else:
        assert used[0] is None
    assert_all_close(got, _grads(_separate, x, ws, bs, grads))


def test_outputs_are_views_of_one_gemm_output():
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(B, T, H, generator=gen)
    ws, _ = _params(gen, False, torch.float32)
    outs = multi_linear(x, ws)
    assert [o.shape for o in outs] == [(B, T, o) for o in OUTS]
    assert len({o.untyped_storage().data_ptr() for o in outs}) == 1


def test_frozen_weight_gets_no_gradient():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(B, T, H, generator=gen, dtype=torch.float64, requires_grad=True)
    ws, bs = _params(gen, True)
    ws[1].requires_grad_(False)
    outs = multi_linear(x, ws, bs)
    sum(o.sum() for o in outs).backward()
    assert ws[1].grad is None and ws[0].grad is not None and bs[1].grad is not None


def test_autocast_runs_the_gemm_in_bf16_with_fp32_parameter_grads():
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(B, T, H, generator=gen, requires_grad=True)
    ws, bs = _params(gen, True, torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        outs = multi_linear(x, ws, bs)
    assert all(o.dtype == torch.bfloat16 for o in outs)
    sum(o.float().sum() for o in outs).backward()
    assert all(w.grad.dtype == torch.float32 for w in ws) and x.grad.dtype == torch.float32


def test_bad_arguments_name_what_is_wrong():
    x = torch.randn(B, T, H)
    w = torch.randn(4, H)
    with pytest.raises(ValueError, match="at least one"):
        multi_linear(x, [])
    with pytest.raises(ValueError, match=r"weights\[1\] must be \(out, 12\)"):
        multi_linear(x, [w, torch.randn(4, H + 1)])
    with pytest.raises(ValueError, match="all given or all None"):
        multi_linear(x, [w, w], [torch.randn(4), None])
    with pytest.raises(ValueError, match="one entry per weight"):
        multi_linear(x, [w, w], [torch.randn(4)])
    with pytest.raises(ValueError, match=r"biases\[0\] must be \(4,\)"):
        multi_linear(x, [w, w], [torch.randn(5), torch.randn(4)])


def test_single_weight_is_plain_linear():
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(B, T, H, generator=gen)
    w, b = torch.randn(6, H, generator=gen), torch.randn(6, generator=gen)
    (y,) = multi_linear(x, [w], [b])
    torch.testing.assert_close(y, linear(x, w, b))
