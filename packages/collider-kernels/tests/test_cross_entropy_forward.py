"""``cross_entropy_forward`` (torch and Triton backends) against the dense reference and each other.

The torch backend is checked in fp64 against ``F.cross_entropy`` and ``torch.logsumexp``. Both
backends upcast the logits to fp32, so the Triton backend (under the interpreter on CPU with
several vocabulary blocks per row; on CUDA in the ``gpu`` tests) equals the torch backend up to
the order of the sum, in every input dtype; against the fp64 reference the rule
``max|out - ref| <= 2 max|out_torch - ref| + atol`` holds. Triton outputs are allocated NaN-filled.
"""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from kernel_testing import (
    DEVICE,
    GPU_DTYPES,
    assert_rule,
    ce_case,
    nan_outputs,
    poison_cuda_allocator,
    small_atol,
    triton_only,
)

import collider_kernels as ck
from collider_kernels import reference

needs_triton = triton_only("cross_entropy_forward")


def check_ce_forward(backend, logits, labels, ignore_index=-100):
    """``(loss, lse)`` on ``backend`` against the torch backend (fp32 math in both) and the fp64 reference."""
    loss, lse = ck.cross_entropy_forward(logits, labels, ignore_index, backend=backend)
    base = ck.cross_entropy_forward(logits, labels, ignore_index, backend="torch")
    truth = reference.cross_entropy_forward_reference(logits.double(), labels, ignore_index)
    for name, out, b, t in zip(("loss", "lse"), (loss, lse), base, truth, strict=True):
        assert out.dtype == torch.float32 and out.shape == (logits.shape[0],) and out.device == logits.device
        assert_rule(out, t, b, atol=small_atol(torch.float32, t, logits.shape[1]), what=f"ce {name}[{backend}]")
        torch.testing.assert_close(out, b, rtol=4e-6, atol=4e-6 * (1 + b.abs().max().item() if b.numel() else 1))
    assert torch.equal(loss[labels == ignore_index], torch.zeros_like(loss[labels == ignore_index]))
    return loss, lse


@settings(deadline=None, max_examples=15)
@given(n=st.integers(0, 30), V=st.integers(1, 300), ignore_index=st.sampled_from((-100, 0, 3)),
       seed=st.integers(0, 2**16))
def test_torch_fp64(n, V, ignore_index, seed):
    logits, labels = ce_case(n, V, torch.float64, "cpu", seed, ignore_index=ignore_index)
    loss, lse = ck.cross_entropy_forward(logits, labels, ignore_index, backend="torch")
    want_loss, want_lse = reference.cross_entropy_forward_reference(logits, labels, ignore_index)
    assert loss.dtype == lse.dtype == torch.float64
    torch.testing.assert_close(loss, want_loss, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lse, want_lse, rtol=1e-12, atol=1e-12)


@needs_triton
@settings(deadline=None, max_examples=15)
@given(n=st.integers(1, 24), V=st.integers(1, 700), dtype=st.sampled_from((torch.float32, torch.float16)),
       row_pad=st.sampled_from((0, 5)), ignore_index=st.sampled_from((-100, 2)), int32_labels=st.booleans(),
       scale=st.sampled_from((1.0, 30.0)), seed=st.integers(0, 2**16))
def test_triton(n, V, dtype, row_pad, ignore_index, int32_labels, scale, seed):
    logits, labels = ce_case(n, V, dtype, DEVICE, seed, row_pad=row_pad, ignore_index=ignore_index, scale=scale)
    with nan_outputs():
        check_ce_forward("triton", logits, labels.int() if int32_labels else labels, ignore_index)


@needs_triton
def test_triton_edges(poison):
    """No rows, one class, every row ignored, huge logits (no overflow), a column-strided input."""
    logits, labels = ce_case(0, 50, torch.float32, DEVICE, seed=1)
    loss, lse = ck.cross_entropy_forward(logits, labels, backend="triton")
    assert loss.shape == lse.shape == (0,)
    check_ce_forward("triton", *ce_case(6, 1, torch.float32, DEVICE, seed=2, ignore_share=0.0))
    check_ce_forward("triton", *ce_case(6, 300, torch.float32, DEVICE, seed=3, ignore_share=1.0))
    check_ce_forward("triton", *ce_case(6, 300, torch.float32, DEVICE, seed=4, scale=1e4))
    logits, labels = ce_case(9, 40, torch.float16, DEVICE, seed=5)
    check_ce_forward("triton", logits.t().contiguous().t(), labels)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's numpy on log(0) and -inf - -inf
def test_infinite_logits_behave_as_torch_logsumexp():
    """Masked classes (-inf), a row of -inf only (ignored), and a +inf logit, on every backend."""
    logits, labels = ce_case(5, 300, torch.float32, DEVICE, seed=6, ignore_share=0.0)
    logits[0, ::3] = float("-inf")  # masked classes
    logits[1] = float("-inf")  # nothing but -inf: lse -inf
    labels[1] = -100
    logits[2, 7] = float("inf")  # lse +inf
    labels[0] = 1
    want_lse = torch.logsumexp(logits.double(), -1).float()
    for backend in ck.available_backends("cross_entropy_forward", DEVICE):
        loss, lse = ck.cross_entropy_forward(logits, labels, backend=backend)
        torch.testing.assert_close(lse, want_lse, rtol=4e-6, atol=4e-6, msg=backend)
        assert loss[1] == 0 and torch.isfinite(loss[[0, 3, 4]]).all(), backend


def test_labels_out_of_range_are_an_error_or_nan_without_validation():
    logits, labels = ce_case(6, 20, torch.float32, DEVICE, seed=7, ignore_share=0.0)
    for bad in (20, -1):
        wrong = labels.clone()
        wrong[2] = bad
        with pytest.raises(IndexError, match=r"labels must lie in \[0, 20\) or equal ignore_index=-100, got"):
            ck.cross_entropy_forward(logits, wrong)
        for backend in ck.available_backends("cross_entropy_forward", DEVICE):
            loss, _ = ck.cross_entropy_forward(logits, wrong, validate=False, backend=backend)
            assert loss[2].isnan() and torch.isfinite(loss[[0, 1, 3, 4, 5]]).all(), backend


@needs_triton
def test_triton_fp64_takes_torch_under_auto_and_is_refused_explicitly():
    logits, labels = ce_case(6, 30, torch.float64, DEVICE, seed=2)
    got, want = ck.cross_entropy_forward(logits, labels), ck.cross_entropy_forward(logits, labels, backend="torch")
    assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))
    with pytest.raises(RuntimeError, match="float64"):
        ck.cross_entropy_forward(logits, labels, backend="triton")


def test_bad_inputs_name_the_argument():
    logits, labels = torch.randn(4, 10), torch.tensor([1, 2, -100, 9])
    cases = [
        (lambda: ck.cross_entropy_forward(logits[0], labels), ValueError, "logits must be 2-D"),
        (lambda: ck.cross_entropy_forward(logits[:, :0], labels), ValueError, "at least one column"),
        (lambda: ck.cross_entropy_forward(logits.long(), labels), TypeError, "logits"),
        (lambda: ck.cross_entropy_forward(logits, labels.float()), TypeError, "labels"),
        (lambda: ck.cross_entropy_forward(logits, labels[:3]), ValueError, "one entry per row"),
        (lambda: ck.cross_entropy_forward(logits, labels[:, None]), ValueError, "labels must be 1-D"),
        (lambda: ck.cross_entropy_forward(logits, labels, 1.5), TypeError, "ignore_index"),
        (lambda: ck.cross_entropy_forward(logits, labels, backend="nope"), ValueError, "backend"),
    ]
    for fn, exc, match in cases:
        with pytest.raises(exc, match=match):
            fn()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("V", (32000, 151936, 51200, 1000))
def test_gpu(poison, dtype, V):
    poison_cuda_allocator()
    check_ce_forward("triton", *ce_case(600, V, dtype, "cuda", seed=V, row_pad=16))
