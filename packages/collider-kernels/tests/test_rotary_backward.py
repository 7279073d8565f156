"""``rotary_backward`` (torch and Triton backends) against the dense reference (autograd of the forward).

The torch backend is checked in fp64; the Triton backend runs under the interpreter on CPU (fp32,
fp16) and on CUDA in the ``gpu`` tests (bf16, fp16, fp32) with the rule
``max|out - ref32| <= 2 max|out_torch - ref32| + atol``. Triton outputs are allocated NaN-filled.
"""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from kernel_testing import assert_rule, nan_outputs, rotary_case, small_atol

import collider_kernels as ck
from collider_kernels import reference

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"

triton_only = pytest.mark.skipif("triton" not in ck.available_backends("rotary_backward", DEVICE),
                                 reason="the Triton backend is not available here")


def ref32(grad, cos, sin, positions, truth=torch.float64):
    return reference.rotary_backward_reference(grad.to(truth), cos.to(truth), sin.to(truth), positions)


@settings(deadline=None, max_examples=25)
@given(n=st.integers(0, 40), H=st.integers(1, 4), half=st.integers(0, 8), extra=st.integers(0, 6),
       T=st.integers(1, 50), seed=st.integers(0, 2**31 - 1))
def test_torch_backend_fp64(n, H, half, extra, T, seed):
    R = 2 * half
    grad, cos, sin, pos = rotary_case(n, H, R + extra or 2, R, T, torch.float64, "cpu", seed)
    out = ck.rotary_backward(grad, cos, sin, pos, backend="torch")
    torch.testing.assert_close(out, ref32(grad, cos, sin, pos), rtol=1e-12, atol=1e-12)


def test_general_tables_not_just_duplicated_halves():
    """The formula holds for any cos/sin tables, not only ones whose halves repeat."""
    gen = torch.Generator().manual_seed(3)
    grad = torch.randn(7, 2, 8, dtype=torch.float64, generator=gen)
    cos = torch.randn(5, 6, dtype=torch.float64, generator=gen)
    sin = torch.randn(5, 6, dtype=torch.float64, generator=gen)
    pos = torch.tensor([0, 4, 4, 1, 2, 3, 0])
    want = ref32(grad, cos, sin, pos)
    for backend in ck.available_backends("rotary_backward", "cpu"):
        out = ck.rotary_backward(grad.float(), cos.float(), sin.float(), pos, backend=backend).double()
        torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5, msg=backend)


@triton_only
@settings(deadline=None, max_examples=12)
@given(n=st.integers(0, 70), H=st.integers(1, 5), D=st.sampled_from((8, 16, 24, 64)),
       rot_share=st.sampled_from((1.0, 0.5, 0.25)), head_pad=st.integers(0, 2),
       dtype=st.sampled_from((torch.float32, torch.float16)), seed=st.integers(0, 2**31 - 1))
def test_triton_matches_reference(n, H, D, rot_share, head_pad, dtype, seed):
    if CUDA:
        pytest.skip("the GPU variant runs in test_gpu_rule")
    R = int(D * rot_share) // 2 * 2
    grad, cos, sin, pos = rotary_case(n, H, D, R, 33, dtype, DEVICE, seed, head_pad=head_pad)
    with nan_outputs():  # NaN-filled outputs (a fixture cannot wrap hypothesis examples)
        out = ck.rotary_backward(grad, cos, sin, pos, backend="triton")
    truth = ref32(grad, cos, sin, pos, torch.float32)
    torch_out = ck.rotary_backward(grad, cos, sin, pos, backend="torch")
    assert out.dtype == dtype
    assert_rule(out, truth, torch_out, atol=small_atol(dtype, truth), what=f"triton {dtype} D={D} R={R}")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("H,D,R", [(32, 64, 64), (12, 128, 128), (32, 64, 32), (2, 128, 128)])
def test_gpu_rule(dtype, H, D, R, poison):
    grad, cos, sin, pos = rotary_case(3000, H, D, R, 2048, dtype, "cuda", seed=H + D + R, head_pad=1)
    out = ck.rotary_backward(grad, cos, sin, pos, backend="triton")
    truth = ref32(grad, cos, sin, pos, torch.float32)
    torch_out = ck.rotary_backward(grad, cos, sin, pos, backend="torch")
    assert_rule(out, truth, torch_out, atol=small_atol(dtype, truth), what=f"gpu {dtype} {H}/{D}/{R}")


@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if CUDA else []))
@pytest.mark.parametrize("R", [8, 4])
def test_into_a_view_of_a_larger_buffer_and_in_place(device, R):
    """``into`` receives dx as the op returns it: a column slice of a poisoned larger buffer (the
    rest untouched), and the gradient itself (in place), with partial rotation too."""
    for backend in ck.available_backends("rotary_backward", device):
        grad, cos, sin, pos = rotary_case(37, 3, 8, R, 20, torch.float32, device, seed=R)
        want = ck.rotary_backward(grad, cos, sin, pos, backend=backend)
        buf = torch.full((37, 5, 8), float("nan"), device=device)
        into = buf[:, 1:4]  # (n, 3, 8) view, row stride 40
        got = ck.rotary_backward(grad, cos, sin, pos, backend=backend, into=into)
        assert got is into
        torch.testing.assert_close(got, want, rtol=0, atol=0, msg=backend)
        assert buf[:, 0].isnan().all() and buf[:, 4].isnan().all()
        inplace = grad.clone()
        assert ck.rotary_backward(inplace, cos, sin, pos, backend=backend, into=inplace) is inplace
        torch.testing.assert_close(inplace, want, rtol=0, atol=0, msg=f"{backend} in place")


def test_bad_input_names_the_argument():
    grad, cos, sin, pos = rotary_case(5, 2, 8, 8, 10, torch.float32, "cpu", seed=1)
    with pytest.raises(ValueError, match="grad must be 3-D"):
        ck.rotary_backward(grad[0], cos, sin, pos)
    with pytest.raises(ValueError, match="same shape"):
        ck.rotary_backward(grad, cos, sin[:, :6], pos)
    with pytest.raises(ValueError, match="even"):
        ck.rotary_backward(grad, cos[:, :5], sin[:, :5], pos)
    with pytest.raises(ValueError, match="head dim"):
        ck.rotary_backward(grad[..., :6], cos, sin, pos)
    with pytest.raises(IndexError, match="positions must lie in"):
        ck.rotary_backward(grad, cos, sin, pos + 10)
    with pytest.raises(ValueError, match="one entry per row"):
        ck.rotary_backward(grad, cos, sin, pos[:3])
    with pytest.raises(TypeError, match="positions must have dtype"):
        ck.rotary_backward(grad, cos, sin, pos.float())
    with pytest.raises(ValueError, match=r"into must be \(5, 2, 8\)"):
        ck.rotary_backward(grad, cos, sin, pos, into=torch.empty(5, 2, 6))
    with pytest.raises(ValueError, match="into must be .* unit last stride"):
        ck.rotary_backward(grad, cos, sin, pos, into=torch.empty(5, 2, 16)[..., ::2])
    with pytest.raises(TypeError, match="into must have dtype"):
        ck.rotary_backward(grad, cos, sin, pos, into=torch.empty(5, 2, 8, dtype=torch.float64))
    wide = torch.randn(6, 2, 8)  # into overlapping grad without being it: rows read after they are written
    with pytest.raises(ValueError, match="into must not share memory with grad or be grad itself"):
        ck.rotary_backward(wide[:5], cos, sin, pos, into=wide[1:])
