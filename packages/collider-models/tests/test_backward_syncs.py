"""The Collider backward never reads device values on the host: a read (a value check, an
``.item()``) would synchronise, empty the GPU's queue of work and make the rest of the backward
wait on the host's launches. On CUDA the synchronisation itself is caught; on CPU, every index
value check is."""

import pytest
import torch

import collider_kernels._checks as checks
from collider_models.cli.bench import _forward_loss, _inputs

ARCHS = ["llama", "qwen2", "phi"]
B, T, KEEP = 2, 24, 0.6


def _loss(model, device):
    """collider-bench's step: top-k of the token loss, the kept count known on the host."""
    ids, labels, keep = _inputs(model.config.vocab_size, B, T, KEEP, 0, device)
    return _forward_loss(model, ids, labels, keep, "collider", select=KEEP)


@pytest.mark.parametrize("arch", ARCHS)
def test_backward_checks_no_index_values(arch, make_ours, monkeypatch):
    model = make_ours(arch)
    loss = _loss(model, torch.device("cpu"))
    seen = []
    monkeypatch.setattr(checks, "check_index_values", lambda name, *a: seen.append(name))
    loss.backward()
    assert seen == [], f"the backward checked the values of {seen}"
    assert all(p.grad is not None for p in model.parameters())


def test_index_value_check_is_the_patched_one(monkeypatch):
    # The guard above is only as good as this: the public ops' index checks go through it.
    from collider_kernels import gathered_weight_grad

    seen = []
    monkeypatch.setattr(checks, "check_index_values", lambda name, *a: seen.append(name))
    gathered_weight_grad(torch.randn(2, 3), torch.randn(4, 5), torch.tensor([0, 3]))
    assert seen == ["index"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("arch", ARCHS)
def test_gpu_backward_does_not_synchronise(arch, make_ours):
    model = make_ours(arch).to("cuda", torch.bfloat16)
    for _ in range(2):  # warm-up: compilation and tuning may synchronise
        model.zero_grad(set_to_none=True)
        _loss(model, torch.device("cuda")).backward()
    model.zero_grad(set_to_none=True)
    loss = _loss(model, torch.device("cuda"))
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
