"""Each op with a sparse rule, applied between a per-token loss and ``filtered_mean``: the sparse
gradient equals the dense gradient of the masked mean, nothing densifies, and the kept rows are
exactly the tokens the kept entries read (the loss's tokens mapped through the op)."""

import warnings

import pytest
import torch
import torch.nn.functional as F

from collider_autograd import (
    SparseGradientError,
    TokenSparseTensor,
    allow_densify,
    densify_counts,
    filtered_mean,
    reset_densify_counts,
)

B, T = 3, 8
F64 = torch.float64
gen = torch.Generator().manual_seed(0)
W = torch.rand(B, T, generator=gen, dtype=F64) + 0.5  # per-token weights
COND = torch.rand(B, T, generator=gen) < 0.6
IDX = torch.tensor([[0, 2, 2, 7], [1, 1, 5, 0], [6, 3, 4, 4]])


def _leaf():
    g = torch.Generator().manual_seed(1)
    return (torch.rand(B, T, generator=g, dtype=F64) + 0.1).requires_grad_()


_LOSS = _leaf().detach()  # the values every op test starts from (max/topk/sort read by value)


def identity(p):
    return p


# name: (op on the loss, the tokens each output entry reads: the op on a grid of token positions,
# with a trailing dim when an entry reads several; -1 reads nothing)
OPS = {
    "shift slice": (lambda t: t[:, :-1], lambda p: p[:, :-1]),
    "strided slice": (lambda t: t[:, 1::3], lambda p: p[:, 1::3]),
    "narrow": (lambda t: t.narrow(1, 2, 4), lambda p: p.narrow(1, 2, 4)),
    "select": (lambda t: t[:, 3], lambda p: p[:, 3]),
    "select batch": (lambda t: t[1], lambda p: p[1]),
    "int index": (lambda t: t[:, torch.tensor([0, 2, 2, 7])], lambda p: p[:, torch.tensor([0, 2, 2, 7])]),
    "bool mask": (lambda t: t[COND], lambda p: p[COND]),
    "masked_select": (lambda t: t.masked_select(COND), lambda p: p.masked_select(COND)),
    "index_select": (lambda t: t.index_select(1, IDX[0]), lambda p: p.index_select(1, IDX[0])),
    "gather": (lambda t: t.gather(1, IDX), lambda p: p.gather(1, IDX)),
    "transpose": (lambda t: t.t(), lambda p: p.t()),
    "permute 3-D": (lambda t: t.view(B, 2, 4).permute(2, 0, 1), lambda p: p.view(B, 2, 4).permute(2, 0, 1)),
    "flatten": (lambda t: t.flatten(), lambda p: p.flatten()),
    "reshape": (lambda t: t.reshape(B * 2, 4), lambda p: p.reshape(B * 2, 4)),
    "unsqueeze": (lambda t: t.unsqueeze(-1), lambda p: p.unsqueeze(-1)),
    "expand": (lambda t: t.unsqueeze(-1).expand(B, T, 3), lambda p: p.unsqueeze(-1).expand(B, T, 3)),
    "flip": (lambda t: t.flip(1), lambda p: p.flip(1)),
    "roll": (lambda t: t.roll(2, 1), lambda p: p.roll(2, 1)),
    "crop pad": (lambda t: F.pad(t, (-1, -2)), lambda p: F.pad(p, (-1, -2))),
    "zero pad": (lambda t: F.pad(t, (1, 2)), lambda p: F.pad(p, (1, 2), value=-1)),
    "cat": (lambda t: torch.cat([t[:, :3], t[:, 5:]], 1), lambda p: torch.cat([p[:, :3], p[:, 5:]], 1)),
    "stack": (lambda t: torch.stack([t[0], t[2]]), lambda p: torch.stack([p[0], p[2]])),
    "chunk": (lambda t: t.chunk(2, 1)[1], lambda p: p.chunk(2, 1)[1]),
    "unbind": (lambda t: t.unbind(0)[2], lambda p: p.unbind(0)[2]),
    "repeat": (lambda t: t.repeat(2, 1), lambda p: p.repeat(2, 1)),
    "sum over T": (lambda t: t.sum(1), lambda p: p),  # output b reads the tokens p[b, :]
    "mean keepdim": (lambda t: t.mean(1, keepdim=True), lambda p: p[:, None, :]),
    "weights": (lambda t: t * W, identity),
    "weights on the left": (lambda t: W * t, identity),
    "per-sequence weights": (lambda t: t * W[:, :1], identity),
    "divide by tokens": (lambda t: t / W, identity),
    "divide by scalar": (lambda t: t / 4.0, identity),
    "scalar tensor": (lambda t: t * torch.tensor(0.3, dtype=F64), identity),
    "where": (lambda t: torch.where(COND, t, 0.0), identity),
    "where other side": (lambda t: torch.where(COND, 0.0, t), identity),
    "masked_fill": (lambda t: t.masked_fill(COND, 0.0), identity),
    "clamp": (lambda t: t.clamp(0.2, 0.8), identity),
    "minimum": (lambda t: torch.minimum(t, W - 0.5), identity),
    "relu": (lambda t: F.relu(t - 0.5), identity),
    "sigmoid": (lambda t: t.sigmoid(), identity),
    "tanh": (lambda t: t.tanh(), identity),
    "gelu": (lambda t: F.gelu(t), identity),
    "silu": (lambda t: F.silu(t), identity),
    "softplus": (lambda t: F.softplus(t), identity),
    "square": (lambda t: t**2, identity),
    "exp log sqrt": (lambda t: t.exp().log().sqrt(), identity),
    "abs neg": (lambda t: -(t - 0.5).abs(), identity),
    "one minus": (lambda t: 1 - t, identity),
    "dtype casts": (lambda t: t.float().double(), identity),
    "nan_to_num": (lambda t: torch.nan_to_num(t), identity),
    "same loss twice": (lambda t: t + 2 * t, identity),
    "softmax over positions": (lambda t: t.softmax(1), lambda p: p[:, None, :].expand(B, T, T)),
    "max over positions": (lambda t: t.max(1).values, lambda p: p.gather(1, _LOSS.max(1).indices[:, None])),
    "topk": (lambda t: t.topk(3, 1).values, lambda p: p.gather(1, _LOSS.topk(3, 1).indices)),
    "sort": (lambda t: t.sort(1, descending=True)[0], lambda p: p.gather(1, _LOSS.sort(1, descending=True)[1])),
    "logsumexp": (lambda t: t.logsumexp(1), lambda p: p),
    "amax keepdim": (lambda t: t.amax(1, keepdim=True), lambda p: p[:, None, :]),
    "norm": (lambda t: t.norm(dim=1), lambda p: p),
    "var": (lambda t: t.var(1), lambda p: p),
    "shifted sum": (lambda t: t[:, :-1] + t[:, 1:], lambda p: torch.stack([p[:, :-1], p[:, 1:]], -1)),
}


@pytest.mark.parametrize("name", sorted(OPS))
def test_op_between_token_loss_and_filtered_mean(name):
    op, on_positions = OPS[name]
    loss = _leaf()
    out = op(loss)
    g = torch.Generator().manual_seed(hash(name) % 2**31)
    keep = torch.rand(out.shape, generator=g) < 0.5
    keep.view(-1)[0] = True
    keep.view(-1)[-1] = False
    reset_densify_counts()
    (grad,) = torch.autograd.grad(filtered_mean(out, keep), loss)
    assert densify_counts() == {}
    assert isinstance(grad, TokenSparseTensor)
    grad = grad.regroup(2)  # (B, T) as token dims, as a layer sees it
    (ref,) = torch.autograd.grad((op(loss) * keep).sum() / keep.sum(), loss)
    torch.testing.assert_close(grad.to_dense(), ref, rtol=1e-13, atol=1e-15)
    # The kept rows are the tokens the kept entries read.
    read = on_positions(torch.arange(B * T).view(B, T))[keep].reshape(-1)
    assert grad.index.tolist() == sorted({int(i) for i in read if i >= 0})


def test_gradient_of_the_per_token_weight():
    loss = _leaf().detach()
    w = W.clone().requires_grad_()
    keep = COND.clone()
    (grad,) = torch.autograd.grad(filtered_mean(loss * w, keep), w)
    assert isinstance(grad, TokenSparseTensor)
    torch.testing.assert_close(grad.to_dense(), loss * keep / keep.sum())
    w1 = W[:, :1].clone().requires_grad_()  # broadcast over T: the gradient is summed per sequence
    (grad,) = torch.autograd.grad(filtered_mean(loss * w1, keep), w1)
    torch.testing.assert_close(grad.to_dense(), (loss * keep).sum(1, keepdim=True) / keep.sum())
    s = torch.tensor(2.0, dtype=F64, requires_grad=True)  # a scalar weight: an ordinary 0-dim gradient
    (grad,) = torch.autograd.grad(filtered_mean(loss * s, keep), s)
    assert type(grad) is torch.Tensor
    torch.testing.assert_close(grad, (loss * keep).sum() / keep.sum())


@pytest.mark.parametrize("name, op", [
    ("cumsum", lambda t: t.cumsum(1)),
    ("_log_softmax_backward_data", lambda t: t.log_softmax(0)),  # over the leading dim: nothing per row
    ("add", lambda t: t - t.mean()),  # a dense gradient meets the sparse one
    ("add", lambda t: t + torch.where(COND, 0.0, t.mean())),
])
def test_op_without_rule_raises_naming_it_and_densifies_when_allowed(name, op):
    loss = _leaf()
    keep = COND.clone()
    with pytest.raises(SparseGradientError, match=f"'{name}'"):
        torch.autograd.grad(filtered_mean(op(loss), keep), loss)
    reset_densify_counts()
    with allow_densify(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # shown once per op and process; the counter is the signal
        (grad,) = torch.autograd.grad(filtered_mean(op(loss), keep), loss)
    assert densify_counts().get(name)
    (ref,) = torch.autograd.grad((op(loss) * keep).sum() / keep.sum(), loss)
    torch.testing.assert_close(grad, ref)  # the plain masked-mean gradient


@pytest.mark.parametrize("name", ["shifted cross_entropy", "log_softmax + gather", "label smoothing", "softmax"])
def test_per_token_losses_from_logits(name):
    """The usual ways of writing a per-token loss from (B, T, V) logits stay sparse and exact."""
    V = 7
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(B, T, V, generator=g, dtype=F64, requires_grad=True)
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[0, 2] = -100
    losses = {
        "shifted cross_entropy": lambda x: F.cross_entropy(x[:, :-1].reshape(-1, V), labels[:, 1:].reshape(-1),
                                                           reduction="none").view(B, T - 1),
        "log_softmax + gather": lambda x: -x.log_softmax(-1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1),
        "label smoothing": lambda x: F.cross_entropy(x.view(-1, V), labels.view(-1), reduction="none",
                                                     label_smoothing=0.1).view(B, T),
        "softmax": lambda x: x.softmax(-1)[..., 0],
    }
    out = losses[name](logits)
    keep = torch.rand(out.shape, generator=g) < 0.5
    keep[1, 0] = True
    reset_densify_counts()
    (grad,) = torch.autograd.grad(filtered_mean(out, keep), logits)
    assert densify_counts() == {}
    assert isinstance(grad, TokenSparseTensor)
    grad = grad.regroup(2)  # (B, T) tokens with V features, as the LM head sees it
    assert grad.feature_shape == (V,)
    (ref,) = torch.autograd.grad((losses[name](logits) * keep).sum() / keep.sum(), logits)
    torch.testing.assert_close(grad.to_dense(), ref)
    kept = torch.zeros(B, T, dtype=torch.bool)
    kept[:, : out.shape[1]] = keep
    assert grad.index.tolist() == kept.reshape(-1).nonzero().squeeze(1).tolist()
