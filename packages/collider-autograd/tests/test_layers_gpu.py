"""The layers on CUDA: PyTorch's flash/efficient attention kernels in the forward and the dense
backward, the masked backward for sparse gradients, and a whole model against the contract."""

import pytest
import torch

import collider_autograd as ca
from collider_autograd import TokenSparseTensor, causal_attention
from collider_kernels.reference import attention_forward_reference

pytestmark = pytest.mark.gpu


def _attention_grads(q, k, v, grad, keep=None, fn=None):
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    if fn is None:
        m = keep[..., None, None]
        out = attention_forward_reference(q, torch.where(m, k, k.detach()), torch.where(m, v, v.detach()))[0]
    else:
        out = fn(q, k, v)
    grads = torch.autograd.grad(out, (q, k, v), grad)
    return out.detach(), [g.to_dense() if isinstance(g, TokenSparseTensor) else g for g in grads]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("group", [1, 4])
def test_causal_attention_cuda_dense_and_sparse(dtype, group):
    gen = torch.Generator(device="cuda").manual_seed(group)
    B, T, hkv, D = 2, 300, 2, 64
    hq = hkv * group
    q = torch.randn(B, T, hq, D, device="cuda", generator=gen)
    k, v = (torch.randn(B, T, hkv, D, device="cuda", generator=gen) for _ in range(2))
    keep = torch.rand(B, T, device="cuda", generator=gen) < 0.6
    keep[1] = False
    keep[1, 5] = True
    dense_grad = torch.randn(B, T, hq, D, device="cuda", generator=gen)
    index = keep.reshape(-1).nonzero().squeeze(1)
    sparse = TokenSparseTensor(dense_grad.reshape(B * T, hq, D)[index].to(dtype), index, (B, T))
    low = [t.to(dtype) for t in (q, k, v)]
    for grad, mask in ((dense_grad, torch.ones_like(keep)), (sparse, keep)):
        g_low = grad if isinstance(grad, TokenSparseTensor) else grad.to(dtype)
        g_dense = grad.to_dense().float() if isinstance(grad, TokenSparseTensor) else grad
        out, ours = _attention_grads(*low, g_low, fn=causal_attention)
        ref_out, ref = _attention_grads(q, k, v, g_dense, keep=mask)  # fp32 truth
        _, same_dtype = _attention_grads(*low, g_dense.to(dtype), keep=mask)  # reference math in dtype
        bound_out = 2 * (attention_forward_reference(*low)[0].float() - ref_out).abs().max() + 1e-5
        assert (out.float() - ref_out).abs().max() <= bound_out
        for a, r, s in zip(ours, ref, same_dtype, strict=True):
            bound = 2 * (s.float() - r).abs().max() + 1e-4
            assert (a.float() - r).abs().max() <= bound
        assert all(g.reshape(B * T, -1)[~mask.reshape(-1)].abs().sum() == 0 for g in ours[1:])  # filtered K/V rows


def test_model_contract_on_cuda_fp32():
    import collider_models
    from collider_models.reference import detach_filtered_kv, masked_mean

    torch.manual_seed(0)
    model = collider_models.from_preset("tinyllama-tiny").cuda()
    V = model.config.vocab_size
    ids = torch.randint(0, V, (2, 64), device="cuda")
    labels = torch.randint(0, V, (2, 64), device="cuda")
    keep = torch.rand(2, 64, device="cuda") < 0.5
    ca.reset_densify_counts()
    ca.filtered_mean(model.token_loss(ids, labels), keep).backward()
    assert ca.densify_counts() == {}
    ours = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    with detach_filtered_kv(model, keep):
        masked_mean(model.token_loss(ids, labels), keep).backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(ours[n], p.grad, rtol=2e-3, atol=2e-5, msg=n)


@pytest.mark.parametrize("sparse", [False, True])
def test_gelu_mlp_bf16_within_twice_the_two_layer_error(sparse):
    """The fused GELU MLP (Triton's recomputed activation rows) in bf16 against the fp32 truth of
    the two-layer form: every gradient within twice the error of the two-layer form run in bf16."""
    gen = torch.Generator(device="cuda").manual_seed(7)
    B, T, H, I = 2, 300, 256, 1024
    x = torch.randn(B, T, H, device="cuda", generator=gen)
    w1, b1 = torch.randn(I, H, device="cuda", generator=gen) / H**0.5, torch.randn(I, device="cuda", generator=gen)
    w2, b2 = torch.randn(H, I, device="cuda", generator=gen) / I**0.5, torch.randn(H, device="cuda", generator=gen)
    index = (torch.rand(B * T, device="cuda", generator=gen) < 0.6).nonzero().squeeze(1)
    values = torch.randn(index.numel(), H, device="cuda", generator=gen)
    dense = torch.zeros(B * T, H, device="cuda").index_copy_(0, index, values).view(B, T, H)

    def grads(fn, dtype, grad):
        leaves = [t.detach().to(dtype).requires_grad_() for t in (x, w1, w2, b1, b2)]
        y = fn(*leaves)
        return [y.detach(), *torch.autograd.grad(y, leaves, grad)]

    def two_layer(x, w1, w2, b1, b2):
        return ca.linear(ca.gelu_new(ca.linear(x, w1, b1)), w2, b2)

    low = TokenSparseTensor(values.bfloat16(), index, (B, T)) if sparse else dense.bfloat16()
    ours = grads(ca.gelu_mlp, torch.bfloat16, low)
    same = grads(two_layer, torch.bfloat16, dense.bfloat16())
    truth = grads(two_layer, torch.float32, dense)
    for name, a, s, r in zip(("y", "dx", "dw1", "dw2", "db1", "db2"), ours, same, truth, strict=True):
        a = a.to_dense() if isinstance(a, TokenSparseTensor) else a
        bound = 2 * (s.float() - r).abs().max() + 1e-3 * r.abs().max()
        assert (a.float() - r).abs().max() <= bound, name
