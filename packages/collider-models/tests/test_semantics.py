"""The sparse gradient's semantics through whole models: losses built with ops between
``token_loss`` and ``filtered_mean`` get the contract's gradient (the dense fp64 model with the
keys and values detached at the tokens no kept entry reads); sums of terms are exact or raise
with the fix; ops without a sparse rule raise in every layer and densify (counted) only when
allowed, giving the plain gradient from that layer down; frozen parameters cost no
weight-gradient GEMM."""

import importlib
import warnings
from contextlib import nullcontext

import pytest
import torch

import collider_models
from collider_autograd import SparseGradientError, allow_densify, densify_counts, filtered_mean, reset_densify_counts
from collider_models.reference import detach_filtered_kv, masked_mean

ARCHS = ["tinyllama-tiny", "qwen2.5-tiny", "phi-tiny"]
B, T = 2, 10


def _model(arch="tinyllama-tiny", dtype=torch.float64):
    torch.manual_seed(0)
    model = collider_models.from_preset(arch).to(dtype)
    with torch.no_grad():  # every parameter away from its init value
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def _inputs(model, seed=0):
    gen = torch.Generator().manual_seed(seed)
    V = model.config.vocab_size
    ids, labels = torch.randint(0, V, (B, T), generator=gen), torch.randint(0, V, (B, T), generator=gen)
    keep = torch.rand(B, T, generator=gen) < 0.5
    keep[:, 0] = True
    return ids, labels, keep


def _grads(model, ids, labels, loss_fn, detach=None, backward=True):
    """Parameter gradients of ``loss_fn(token_loss)``; with ``detach`` (a (B, T) mask of kept
    tokens, or a list of masks for several terms) the dense contract reference."""
    model.zero_grad(set_to_none=True)
    if detach is None:
        loss_fn(model.token_loss(ids, labels)).backward()
    else:
        with detach_filtered_kv(model, detach):
            loss_fn(model.token_loss(ids, labels)).backward()
    return {n: (p.grad.clone() if p.grad is not None else torch.zeros_like(p)) for n, p in model.named_parameters()}


def _close(a, b):
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-9, atol=1e-12, msg=name)


def _sum(*grads):
    return {n: sum(g[n] for g in grads) for n in grads[0]}


@pytest.fixture(scope="module")
def llama():
    return _model()


# ------------------------------------------------------------- ops between token_loss and filtered_mean


def test_shift_slice_gets_the_contract_gradient(llama):
    ids, labels, keep = _inputs(llama)
    reset_densify_counts()
    ours = _grads(llama, ids, labels, lambda tl: filtered_mean(tl[:, :-1], keep[:, :-1]))
    assert densify_counts() == {}
    kept = keep.clone()
    kept[:, -1] = False  # the last position is read by no kept entry
    _close(ours, _grads(llama, ids, labels, lambda tl: masked_mean(tl[:, :-1], keep[:, :-1]), kept))
    # Keeping every entry of a slice still detaches the tokens outside it.
    everything = torch.ones(B, T - 1, dtype=torch.bool)
    not_first = torch.ones(B, T, dtype=torch.bool)
    not_first[:, 0] = False
    _close(_grads(llama, ids, labels, lambda tl: filtered_mean(tl[:, 1:], everything)),
           _grads(llama, ids, labels, lambda tl: masked_mean(tl[:, 1:], everything), not_first))


def test_per_token_weights_and_their_gradient(llama):
    ids, labels, keep = _inputs(llama, 1)
    w = (torch.rand(B, T, dtype=torch.float64) + 0.5).requires_grad_()
    ours = _grads(llama, ids, labels, lambda tl: filtered_mean(tl * w, keep))
    w_grad, w.grad = w.grad.clone(), None
    assert type(w_grad) is torch.Tensor  # a leaf: dense .grad
    _close(ours, _grads(llama, ids, labels, lambda tl: masked_mean(tl * w, keep), keep))
    torch.testing.assert_close(w_grad, w.grad)


@pytest.mark.parametrize("name, op", [
    ("transpose", lambda tl, k: (tl.t(), k.t())),
    ("flatten", lambda tl, k: (tl.reshape(-1), k.reshape(-1))),
    ("bool index", lambda tl, k: (tl[k], torch.ones(int(k.sum()), dtype=torch.bool))),
    ("where", lambda tl, k: (torch.where(tl > 6.2, tl, 0.0), k)),
    ("masked_fill", lambda tl, k: (tl.masked_fill(tl > 6.2, 0.0), k)),
    ("divide by a scalar", lambda tl, k: (tl / 4.0, k)),
    ("clamp", lambda tl, k: (tl.clamp(max=6.25), k)),
])
def test_supported_ops_get_the_contract_gradient(llama, name, op):
    ids, labels, keep = _inputs(llama, 2)
    reset_densify_counts()
    ours = _grads(llama, ids, labels, lambda tl: filtered_mean(*op(tl, keep)))
    assert densify_counts() == {}
    _close(ours, _grads(llama, ids, labels, lambda tl: masked_mean(*op(tl, keep)), keep))


def test_a_per_token_loss_written_from_logits(llama):
    """The transformers way: logits, then cross_entropy(reduction="none") on shifted labels."""
    ids, labels, keep = _inputs(llama, 10)
    V = llama.config.vocab_size
    shift = keep.clone()
    shift[:, -1] = False

    def grads(reduce, detach=None):
        llama.zero_grad(set_to_none=True)
        with detach_filtered_kv(llama, detach) if detach is not None else nullcontext():
            logits = llama(ids).logits  # (B, T, V)
            token_loss = torch.nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, V), ids[:, 1:].reshape(-1), reduction="none").view(B, T - 1)
            reduce(token_loss, keep[:, :-1]).backward()
        return {n: p.grad.clone() for n, p in llama.named_parameters()}

    reset_densify_counts()
    ours = grads(filtered_mean)
    assert densify_counts() == {}
    _close(ours, grads(masked_mean, shift))


# ---------------------------------------------------------------------------------- several terms


def test_terms_with_the_same_keep_sum_exactly(llama):
    ids, labels, keep = _inputs(llama, 3)
    ours = _grads(llama, ids, labels, lambda tl: filtered_mean(tl, keep) + 0.5 * filtered_mean(tl.square(), keep))
    _close(ours, _grads(llama, ids, labels, lambda tl: masked_mean(tl, keep) + 0.5 * masked_mean(tl.square(), keep),
                        keep))


def _two_backwards(model, ids, labels, first, second):
    model.zero_grad(set_to_none=True)
    tl = model.token_loss(ids, labels)
    first(tl).backward(retain_graph=True)
    second(tl).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def test_terms_with_different_keeps_raise_and_the_fix_gives_each_terms_contract(llama):
    ids, labels, k1 = _inputs(llama, 4)
    k2 = torch.rand(B, T, generator=torch.Generator().manual_seed(9)) < 0.5
    k2[:, 1] = True
    with pytest.raises(SparseGradientError, match="different kept sets.*retain_graph"):
        _grads(llama, ids, labels, lambda tl: filtered_mean(tl, k1) + filtered_mean(tl, k2))
    fixed = _two_backwards(llama, ids, labels, lambda tl: filtered_mean(tl, k1), lambda tl: filtered_mean(tl, k2))
    _close(fixed, _sum(_grads(llama, ids, labels, lambda tl: masked_mean(tl, k1), k1),
                       _grads(llama, ids, labels, lambda tl: masked_mean(tl, k2), k2)))
    with allow_densify(), warnings.catch_warnings():  # opted in: the plain gradient, nothing detached
        warnings.simplefilter("ignore")
        plain = _grads(llama, ids, labels, lambda tl: filtered_mean(tl, k1) + filtered_mean(tl, k2))
    _close(plain, _grads(llama, ids, labels, lambda tl: masked_mean(tl, k1) + masked_mean(tl, k2)))


def test_a_dense_term_raises_and_the_fix_adds_its_ordinary_gradient(llama):
    ids, labels, keep = _inputs(llama, 5)
    with pytest.raises(SparseGradientError, match="meets a dense gradient.*retain_graph"):
        _grads(llama, ids, labels, lambda tl: filtered_mean(tl, keep) + 0.1 * tl.mean())
    fixed = _two_backwards(llama, ids, labels, lambda tl: filtered_mean(tl, keep), lambda tl: 0.1 * tl.mean())
    _close(fixed, _sum(_grads(llama, ids, labels, lambda tl: masked_mean(tl, keep), keep),
                       _grads(llama, ids, labels, lambda tl: 0.1 * tl.mean())))
    reset_densify_counts()
    with allow_densify(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plain = _grads(llama, ids, labels, lambda tl: filtered_mean(tl, keep) + 0.1 * tl.mean())
    assert densify_counts() == {"add": 1}
    _close(plain, _grads(llama, ids, labels, lambda tl: masked_mean(tl, keep) + 0.1 * tl.mean()))
    # A term that keeps every position detaches nothing: with a dense term it sums exactly.
    everything = torch.ones(B, T, dtype=torch.bool)
    _close(_grads(llama, ids, labels, lambda tl: filtered_mean(tl, everything) + 0.1 * tl.mean()),
           _grads(llama, ids, labels, lambda tl: masked_mean(tl, everything) + 0.1 * tl.mean()))


def test_parameter_grads_are_dense_and_clip_in_place(llama):
    ids, labels, keep = _inputs(llama, 6)
    _grads(llama, ids, labels, lambda tl: filtered_mean(tl, keep))
    assert all(type(p.grad) is torch.Tensor for p in llama.parameters())
    torch.nn.utils.clip_grad_norm_(llama.parameters(), 1e-4)
    total = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in llama.parameters()]))
    torch.testing.assert_close(total, torch.tensor(1e-4, dtype=torch.float64))


# ------------------------------------------------------------- every layer: no densify, or an error


def _modules_called_by_token_loss(model, ids, labels):
    """Every submodule that runs in ``token_loss`` (not the LM head: its weight is used directly)."""
    called, handles = [], []
    for name, module in model.named_modules():
        if name:
            handles.append(module.register_forward_hook(lambda m, i, o, name=name: called.append(name)))
    with torch.no_grad():
        model.token_loss(ids, labels)
    for h in handles:
        h.remove()
    return [(name, model.get_submodule(name)) for name in dict.fromkeys(called)]


def _mix_tokens(_module, _inputs, out):
    if isinstance(out, tuple):  # a norm fused with its residual add (y, h), a layer's (stream, MLP output)
        return (out[0].cumsum(1), *out[1:])
    return out.cumsum(1)  # a cumulative sum over positions: no sparse rule


@pytest.mark.parametrize("arch", ARCHS)
def test_every_layer_never_densifies_and_raises_on_an_op_without_rule(arch):
    model = _model(arch, torch.float32)
    ids, labels, keep = _inputs(model, 7)
    reset_densify_counts()
    _grads(model, ids, labels, lambda tl: filtered_mean(tl, keep))
    assert densify_counts() == {}
    modules = _modules_called_by_token_loss(model, ids, labels)
    assert len(modules) >= 10 * model.config.num_layers
    for name, module in modules:
        handle = module.register_forward_hook(_mix_tokens)
        try:
            with pytest.raises(SparseGradientError, match="'cumsum' has no sparse rule"):
                _grads(model, ids, labels, lambda tl: filtered_mean(tl, keep))
            reset_densify_counts()
            with allow_densify(), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                grads = _grads(model, ids, labels, lambda tl: filtered_mean(tl, keep))
        finally:
            handle.remove()
        assert densify_counts().get("cumsum") == 1, name
        assert all(torch.isfinite(g).all() for g in grads.values()), name


@pytest.mark.parametrize("arch", ARCHS)
def test_densifying_in_a_layer_gives_the_plain_gradient_from_that_layer_down(arch):
    model = _model(arch)
    ids, labels, keep = _inputs(model, 8)
    layers = model.model.layers
    final_norm = getattr(model.model, model.model.final_norm_name)

    def run(module, detach_in):
        handle = module.register_forward_hook(_mix_tokens)  # before the reference's detach hooks
        try:
            with allow_densify(), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ours = _grads(model, ids, labels, lambda tl: filtered_mean(tl, keep))
            model.zero_grad(set_to_none=True)
            with detach_filtered_kv(detach_in, keep) if detach_in is not None else nullcontext():
                masked_mean(model.token_loss(ids, labels), keep).backward()
        finally:
            handle.remove()
        ref = {n: (p.grad.clone() if p.grad is not None else torch.zeros_like(p)) for n, p in model.named_parameters()}
        _close(ours, ref)

    run(final_norm, None)  # densified at the top: the plain masked-mean gradient, nothing detached
    run(layers[0], layers[1:])  # layers above the op keep the contract, the first one does not
    run(model.model.embed_tokens, model)  # densified below every layer: the whole contract


# ------------------------------------------------------------------------------------ frozen params


def test_frozen_parameters_cost_no_gemm_and_inputs_still_get_gradients(monkeypatch):
    model = _model()
    ids, labels, keep = _inputs(model, 9)
    full = _grads(model, ids, labels, lambda tl: filtered_mean(tl, keep))
    calls = []
    for module, name in [("collider_autograd.layers.linear", "gathered_weight_grad"),
                         ("collider_autograd.layers.multi_linear", "gathered_weight_grad"),
                         ("collider_autograd.layers.swiglu_mlp", "gathered_weight_grad"),
                         ("collider_autograd.layers.linear_cross_entropy", "gathered_weight_grad"),
                         ("collider_autograd.layers.embedding", "scatter_add_rows")]:
        mod = importlib.import_module(module)
        original = getattr(mod, name)

        def counted(*args, _original=original, _name=f"{module}.{name}", **kwargs):
            calls.append(_name)
            return _original(*args, **kwargs)

        monkeypatch.setattr(mod, name, counted)
    frozen = [model.model.embed_tokens, model.model.layers[1], model.model.norm, model.lm_head]
    for module in frozen:
        module.requires_grad_(False)
    ours = _grads(model, ids, labels, lambda tl: filtered_mean(tl, keep))
    # layer 0's projections only: q/k/v as one GEMM, o through Linear, gate, up, down through the fused MLP
    assert sorted(calls) == sorted(["collider_autograd.layers.multi_linear.gathered_weight_grad"]
                                   + ["collider_autograd.layers.linear.gathered_weight_grad"]
                                   + ["collider_autograd.layers.swiglu_mlp.gathered_weight_grad"] * 3)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("model.layers.0.") for n in trainable)
    for name, p in model.named_parameters():
        if name in trainable:  # the gradient flowed through the frozen layer and head unchanged
            torch.testing.assert_close(ours[name], full[name], rtol=1e-12, atol=1e-14, msg=name)
        else:
            assert p.grad is None, name
