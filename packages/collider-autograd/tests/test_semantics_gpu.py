"""The sparse gradient's semantics on CUDA, where the backward runs on the device's autograd thread:
rules for ops between token_loss and filtered_mean against the contract, errors that keep their
type, the process-wide opt-in, dense leaf gradients."""

import warnings

import pytest
import torch

import collider_autograd as ca

pytestmark = pytest.mark.gpu
B, T = 2, 64


def _setup():
    import collider_models

    torch.manual_seed(0)
    model = collider_models.from_preset("tinyllama-tiny").cuda()
    V = model.config.vocab_size
    ids, labels = (torch.randint(0, V, (B, T), device="cuda") for _ in range(2))
    keep = torch.rand(B, T, device="cuda") < 0.5
    keep[:, 0] = True
    return model, ids, labels, keep


def _grads(model, fn, ids, labels, detach=None):
    from collider_models.reference import detach_filtered_kv

    model.zero_grad(set_to_none=True)
    if detach is None:
        fn(model.token_loss(ids, labels)).backward()
    else:
        with detach_filtered_kv(model, detach):
            fn(model.token_loss(ids, labels)).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("name", ["shift slice", "weights", "bool index", "transpose"])
def test_ops_between_loss_and_filtered_mean_on_cuda(name):
    from collider_models.reference import masked_mean

    model, ids, labels, keep = _setup()
    w = torch.rand(B, T, device="cuda") + 0.5
    shift = keep.clone()
    shift[:, -1] = False
    op, kept = {
        "shift slice": (lambda tl, k: (tl[:, :-1], k[:, :-1]), shift),
        "weights": (lambda tl, k: (tl * w, k), keep),
        "bool index": (lambda tl, k: (tl[k], torch.ones(int(k.sum()), dtype=torch.bool, device="cuda")), keep),
        "transpose": (lambda tl, k: (tl.t(), k.t()), keep),
    }[name]
    ca.reset_densify_counts()
    ours = _grads(model, lambda tl: ca.filtered_mean(*op(tl, keep)), ids, labels)
    assert ca.densify_counts() == {}
    ref = _grads(model, lambda tl: masked_mean(*op(tl, keep)), ids, labels, kept)
    for n in ref:
        torch.testing.assert_close(ours[n], ref[n], rtol=2e-3, atol=2e-5, msg=n)
    assert all(type(p.grad) is torch.Tensor for p in model.parameters())


def test_errors_opt_in_and_leaves_on_the_device_thread():
    model, ids, labels, keep = _setup()
    with pytest.raises(ca.SparseGradientError, match="meets a dense gradient"):
        _grads(model, lambda tl: ca.filtered_mean(tl, keep) + 0.1 * tl.mean(), ids, labels)
    ca.reset_densify_counts()
    with ca.allow_densify(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _grads(model, lambda tl: ca.filtered_mean(tl, keep) + 0.1 * tl.mean(), ids, labels)
    assert ca.densify_counts() == {"add": 1}
    w = torch.ones(B, T, device="cuda", requires_grad=True)
    ca.filtered_mean(torch.rand(B, T, device="cuda") * w, keep).backward()
    assert type(w.grad) is torch.Tensor and w.grad.is_cuda
    torch.nn.utils.clip_grad_norm_([w], 1e-3)
    torch.testing.assert_close(w.grad.norm().cpu(), torch.tensor(1e-3))
