"""Random compositions of supported ops between ``token_loss`` and ``filtered_mean`` give the
contract's gradient: that of the fp64 dense model, where every attention layer detaches the keys
and values of the tokens that no kept entry reads, and the loss is the masked mean of the same
ops. Which tokens an entry reads is tracked by applying the same ops to a grid of token
positions (with a trailing dim for entries that read several tokens; -1 reads none)."""

import functools

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import collider_models
from collider_autograd import densify_counts, filtered_mean, reset_densify_counts
from collider_models.reference import detach_filtered_kv, masked_mean

B, T = 2, 8


@functools.cache
def _model():
    torch.manual_seed(0)
    model = collider_models.from_preset("tinyllama-tiny").double()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def _lead(x, is_pos):
    return x.dim() - 1 if is_pos else x.dim()


# Each op draws its parameters from the current (leading) shape and returns f(x, is_pos), which
# acts on the leading dims only: the values, or the position grid with its trailing reads dim.


def _slice(data, shape):
    d = data.draw(st.integers(0, len(shape) - 1))
    n = shape[d]
    start = data.draw(st.integers(0, n - 1))
    stop = data.draw(st.integers(start + 1, n))
    step = data.draw(st.integers(1, 2))
    return lambda x, is_pos: x[(slice(None),) * d + (slice(start, stop, step),)]


def _select(data, shape):
    d = data.draw(st.integers(0, len(shape) - 1))
    i = data.draw(st.integers(0, shape[d] - 1))
    return lambda x, is_pos: x.select(d, i)


def _transpose(data, shape):
    if len(shape) < 2:
        return None
    d0, d1 = data.draw(st.permutations(range(len(shape))))[:2]
    return lambda x, is_pos: x.transpose(d0, d1)


def _flatten(data, shape):
    return lambda x, is_pos: x.reshape((-1,) + x.shape[_lead(x, is_pos):])


def _flip(data, shape):
    d = data.draw(st.integers(0, len(shape) - 1))
    return lambda x, is_pos: x.flip(d)


def _index(data, shape):
    d = data.draw(st.integers(0, len(shape) - 1))
    idx = torch.tensor(data.draw(st.lists(st.integers(0, shape[d] - 1), min_size=1, max_size=6)))
    return lambda x, is_pos: x.index_select(d, idx)


def _mask(data, shape):
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**16)))
    m = torch.rand(shape, generator=gen) < 0.7
    return lambda x, is_pos: x[m]


def _shifted_sum(data, shape):
    d = data.draw(st.integers(0, len(shape) - 1))
    if shape[d] < 2:
        return None
    a = (slice(None),) * d + (slice(None, -1),)
    b = (slice(None),) * d + (slice(1, None),)
    return lambda x, is_pos: torch.cat([x[a], x[b]], -1) if is_pos else x[a] + 0.5 * x[b]


def _sum(data, shape):
    d = data.draw(st.integers(0, len(shape) - 1))
    reduce = data.draw(st.sampled_from(["sum", "mean", "logsumexp"]))
    return lambda x, is_pos: x.movedim(d, -2).flatten(-2) if is_pos else getattr(x, reduce)(d)


def _softmax_last(data, shape):
    if len(shape) < 2:
        return None  # over the only dim: no rule

    def op(x, is_pos):
        if not is_pos:
            return x.log_softmax(-1)
        row = x.flatten(-2)  # (..., n * R): every entry of a row reads the whole row
        return row.unsqueeze(-2).expand(*x.shape[:-1], row.shape[-1])

    return op


def _repeat(data, shape):
    d = data.draw(st.integers(0, len(shape)))
    return lambda x, is_pos: x.unsqueeze(d).expand(*x.shape[:d], 2, *x.shape[d:])


def _cat(data, shape):
    d = data.draw(st.integers(0, len(shape) - 1))
    if shape[d] < 2:
        return None
    cut = data.draw(st.integers(1, shape[d] - 1))
    return lambda x, is_pos: torch.cat([x.narrow(d, cut, shape[d] - cut), x.narrow(d, 0, cut)], d)


def _elementwise(data, shape):
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**16)))
    w = torch.rand(shape, generator=gen, dtype=torch.float64) + 0.5
    cond = torch.rand(shape, generator=gen) < 0.7
    fns = {
        "weights": lambda x: x * w,
        "divide": lambda x: x / w,
        "scalar": lambda x: x / 3.0,
        "where": lambda x: torch.where(cond, x, 0.0),
        "masked_fill": lambda x: x.masked_fill(~cond, 0.0),
        "clamp": lambda x: x.clamp(max=6.0),
        "square": lambda x: x.square(),
        "sigmoid": lambda x: x.sigmoid(),
        "neg": lambda x: 1.0 - x,
    }
    fn = fns[data.draw(st.sampled_from(sorted(fns)))]
    return lambda x, is_pos: x if is_pos else fn(x)


OPS = [_slice, _select, _transpose, _flatten, _flip, _index, _mask, _shifted_sum, _sum, _softmax_last, _repeat, _cat,
       _elementwise]


def _draw_ops(data):
    shape, ops = (B, T), []
    pos = torch.arange(B * T).view(B, T, 1)
    for _ in range(data.draw(st.integers(1, 4))):
        make = data.draw(st.sampled_from(OPS))
        if make in (_select, _sum) and len(shape) < 2:
            continue  # keep a token dim
        op = make(data, shape)
        if op is None:
            continue
        ops.append(op)
        pos = op(pos, True)
        shape = tuple(pos.shape[:-1])
    return ops, pos


def _apply(ops, x):
    for op in ops:
        x = op(x, False)
    return x


@settings(deadline=None, max_examples=50)
@given(data=st.data(), seed=st.integers(0, 2**16))
def test_random_compositions_match_the_dense_reference(data, seed):
    model = _model()
    gen = torch.Generator().manual_seed(seed)
    V = model.config.vocab_size
    ids, labels = torch.randint(0, V, (B, T), generator=gen), torch.randint(0, V, (B, T), generator=gen)
    ops, pos = _draw_ops(data)
    keep = torch.rand(pos.shape[:-1], generator=gen) < 0.5
    read = pos[keep].reshape(-1)
    kept_tokens = torch.zeros(B * T, dtype=torch.bool)
    kept_tokens[read[read >= 0]] = True  # the tokens some kept entry reads

    model.zero_grad(set_to_none=True)
    reset_densify_counts()
    filtered_mean(_apply(ops, model.token_loss(ids, labels)), keep).backward()
    assert densify_counts() == {}
    ours = {n: p.grad.clone() for n, p in model.named_parameters()}

    model.zero_grad(set_to_none=True)
    with detach_filtered_kv(model, kept_tokens.view(B, T)):
        masked_mean(_apply(ops, model.token_loss(ids, labels)), keep).backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(ours[name], p.grad, rtol=1e-9, atol=1e-12, msg=name)
