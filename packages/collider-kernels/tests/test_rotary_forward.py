"""``rotary_forward`` (torch and Triton backends) against the dense reference and each other.

The torch backend is checked in fp64 against the reference, against Hugging Face's
``apply_rotary_pos_emb`` in 16 bits (bit for bit: the rounding convention), and as the adjoint of
``rotary_backward``. The Triton backend rounds each product and the sum as the torch backend does
and equals it bit for bit: under the interpreter on CPU (fp32, fp16) and on CUDA in the ``gpu``
tests (bf16, fp16, fp32). Inputs are strided views (heads of a fused projection); Triton outputs
are allocated NaN-filled.
"""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from kernel_testing import DEVICE, GPU_DTYPES, nan_outputs, poison_cuda_allocator, rotary_case, triton_only

import collider_kernels as ck
from collider_kernels import reference

needs_triton = triton_only("rotary_forward")


def check_rotary_forward(backend, x, cos, sin, pos):
    """``rotary_forward`` on ``backend`` equals the torch backend bit for bit."""
    y = ck.rotary_forward(x, cos, sin, pos, backend=backend)
    base = ck.rotary_forward(x, cos, sin, pos, backend="torch")
    assert y.dtype == base.dtype == torch.promote_types(x.dtype, cos.dtype) and y.shape == x.shape
    assert y.is_contiguous() and torch.isfinite(y).all(), "unwritten output"
    assert torch.equal(y, base), f"rotary_forward[{backend}]: max diff {(y - base).abs().max().item():.3g}"


@settings(deadline=None, max_examples=20)
@given(n=st.integers(0, 40), H=st.integers(1, 4), half=st.integers(0, 8), extra=st.integers(0, 6),
       T=st.integers(1, 50), head_pad=st.integers(0, 2), seed=st.integers(0, 2**31 - 1))
def test_torch_fp64(n, H, half, extra, T, head_pad, seed):
    R = 2 * half
    x, cos, sin, pos = rotary_case(n, H, R + extra or 2, R, T, torch.float64, "cpu", seed, head_pad)
    y = ck.rotary_forward(x, cos, sin, pos, backend="torch")
    torch.testing.assert_close(y, reference.rotary_forward_reference(x, cos, sin, pos), rtol=1e-12, atol=1e-12)


@settings(deadline=None, max_examples=10)
@given(n=st.integers(1, 20), H=st.integers(1, 3), half=st.integers(0, 6), extra=st.integers(0, 4),
       seed=st.integers(0, 2**31 - 1))
def test_backward_is_the_adjoint(n, H, half, extra, seed):
    """``<rotary_forward(x), g> == <x, rotary_backward(g)>`` on every backend here, general tables."""
    R, gen = 2 * half, torch.Generator().manual_seed(seed)
    D = R + extra or 2
    x, g = torch.randn(2, n, H, D, dtype=torch.float64, generator=gen)
    cos, sin = torch.randn(2, 9, R, dtype=torch.float64, generator=gen)
    pos = torch.randint(0, 9, (n,), generator=gen)
    for backend in ck.available_backends("rotary_forward", "cpu"):
        dt = torch.float64 if backend == "torch" else torch.float32
        args = (cos.to(dt), sin.to(dt), pos)
        lhs = (ck.rotary_forward(x.to(dt), *args, backend=backend).double() * g).sum()
        rhs = (x * ck.rotary_backward(g.to(dt), *args, backend=backend).double()).sum()
        torch.testing.assert_close(lhs, rhs, rtol=1e-5 if dt == torch.float32 else 1e-12, atol=1e-5, msg=backend)


@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16, torch.float32))
@pytest.mark.parametrize("R", (64, 32))
def test_torch_equals_hugging_face(dtype, R):
    """Bit for bit what ``apply_rotary_pos_emb`` gives on the first R dims (Phi-1.5 concatenates
    the pass-through dims after it), on (B, H, T, D) queries with tables of x's dtype."""
    llama = pytest.importorskip("transformers.models.llama.modeling_llama")
    B, T, H, D = 2, 11, 3, 64
    x, cos, sin, _ = rotary_case(B * T, H, D, R, T, dtype, "cpu", seed=R)
    pos = torch.arange(T).repeat(B)  # (B*T,) row b*T + t at position t
    q = x.view(B, T, H, D).transpose(1, 2)  # (B, H, T, D)
    rot, _ = llama.apply_rotary_pos_emb(q[..., :R], q[..., :R], cos[None], sin[None])
    want = torch.cat([rot, q[..., R:]], dim=-1).transpose(1, 2).reshape(B * T, H, D)
    assert torch.equal(ck.rotary_forward(x, cos, sin, pos, backend="torch"), want)


@needs_triton
@settings(deadline=None, max_examples=15)
@given(n=st.integers(0, 50), H=st.integers(1, 6), D=st.sampled_from((8, 12, 16, 24, 64)),
       rot_share=st.sampled_from((1.0, 0.5, 0.25, 0.0)), head_pad=st.integers(0, 2),
       dtype=st.sampled_from((torch.float32, torch.float16)), fp32_tables=st.booleans(),
       int32_positions=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_triton(n, H, D, rot_share, head_pad, dtype, fp32_tables, int32_positions, seed):
    R = int(D * rot_share) // 2 * 2
    x, cos, sin, pos = rotary_case(n, H, D, R, 33, dtype, DEVICE, seed, head_pad,
                                   torch.float32 if fp32_tables else None)
    with nan_outputs():
        check_rotary_forward("triton", x, cos, sin, pos.int() if int32_positions else pos)


@needs_triton
def test_triton_general_tables_and_layouts(poison):
    """Tables whose halves differ, a non-unit last stride, and strided tables."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(7, 3, 10, generator=gen, device=DEVICE)
    cos, sin = torch.randn(2, 5, 16, generator=gen, device=DEVICE)[..., :8]  # (5, 8) rows strided
    pos = torch.tensor([0, 4, 4, 1, 2, 3, 0], device=DEVICE)
    check_rotary_forward("triton", x, cos, sin, pos)
    check_rotary_forward("triton", x.transpose(1, 2).contiguous().transpose(1, 2), cos, sin, pos)


@needs_triton
def test_triton_fp64_takes_torch_under_auto_and_is_refused_explicitly():
    x, cos, sin, pos = rotary_case(6, 2, 8, 8, 10, torch.float64, DEVICE, seed=2)
    assert torch.equal(ck.rotary_forward(x, cos, sin, pos), ck.rotary_forward(x, cos, sin, pos, backend="torch"))
    with pytest.raises(RuntimeError, match="float64"):
        ck.rotary_forward(x.float(), cos, sin, pos, backend="triton")


def test_bad_inputs_name_the_argument():
    x, cos, sin, pos = rotary_case(5, 2, 8, 8, 10, torch.float32, "cpu", seed=1)
    cases = [
        (lambda: ck.rotary_forward(x[0], cos, sin, pos), ValueError, "x must be 3-D"),
        (lambda: ck.rotary_forward(x, cos, sin[:, :6], pos), ValueError, "same shape"),
        (lambda: ck.rotary_forward(x, cos[:, :5], sin[:, :5], pos), ValueError, "even"),
        (lambda: ck.rotary_forward(x[..., :6], cos, sin, pos), ValueError, "head dim"),
        (lambda: ck.rotary_forward(x, cos, sin.half(), pos), TypeError, "sin must have cos's dtype"),
        (lambda: ck.rotary_forward(x, cos, sin, pos + 10), IndexError, "positions must lie in"),
        (lambda: ck.rotary_forward(x, cos, sin, pos[:3]), ValueError, "one entry per row of x"),
        (lambda: ck.rotary_forward(x, cos, sin, pos.float()), TypeError, "positions must have dtype"),
        (lambda: ck.rotary_forward(x.long(), cos, sin, pos), TypeError, "x must have dtype"),
    ]
    for fn, exc, match in cases:
        with pytest.raises(exc, match=match):
            fn()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("H,D,R", [(32, 64, 64), (4, 64, 64), (12, 128, 128), (2, 128, 128), (32, 64, 32), (5, 24, 8)])
def test_gpu(poison, dtype, H, D, R):
    poison_cuda_allocator()
    check_rotary_forward("triton", *rotary_case(3000, H, D, R, 2048, dtype, "cuda", seed=H + D + R, head_pad=2))


@pytest.mark.gpu
def test_gpu_fp32_tables_with_bf16_rows(poison):
    x, cos, sin, pos = rotary_case(3000, 32, 64, 64, 2048, torch.bfloat16, "cuda", seed=1, head_pad=4,
                                   table_dtype=torch.float32)
    check_rotary_forward("triton", x, cos, sin, pos)
