"""In the Collider backward of every architecture, the attention layer writes dQ, dK and dV (rotated
back) into one buffer and the fused q/k/v projection reads its gradient from there, without
concatenating the three (``collider_autograd.layers.multi_linear._one_buffer``)."""

import importlib

import pytest
import torch

from collider_models.cli.bench import _forward_loss, _inputs

multi_linear_module = importlib.import_module("collider_autograd.layers.multi_linear")


@pytest.mark.parametrize("autocast", [False, True])
@pytest.mark.parametrize("arch", ["llama", "qwen2", "phi"])
def test_every_layer_reads_one_gradient_buffer(arch, autocast, make_ours, monkeypatch):
    """Also under bf16 autocast over fp32 weights (the training job's setting: fp32 rotary tables,
    bf16 projections)."""
    model = make_ours(arch)
    ids, labels, keep = _inputs(model.config.vocab_size, 2, 24, 0.6, 0, torch.device("cpu"))
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = _forward_loss(model, ids, labels, keep, "collider", select=0.6)
    found = []
    one_buffer = multi_linear_module._one_buffer
    monkeypatch.setattr(multi_linear_module, "_one_buffer", lambda rows: found.append(one_buffer(rows)) or found[-1])
    loss.backward()
    assert len(found) == model.config.num_layers
    assert all(g is not None for g in found), "a layer concatenated its q/k/v gradient rows"
