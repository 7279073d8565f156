"""Multi-process training on PyTorch's engines (gloo, 2 CPU processes through torchrun): after
one step, the gradients under DDP and FSDP2 equal the single-process gradients of the
concatenated batch with the masked-mean loss over every kept token, also when a process or
an accumulation micro-batch keeps nothing, and when nothing is kept at all (zero gradients,
no hang).

Run as a script under torchrun, this file is the worker: it writes the gradients of every case
to the file given as its argument.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

WORLD, B, T = 2, 2, 12
# case name -> (accumulation micro-batches, (rank, micro-batch) pairs that keep nothing; "all": every one)
CASES = {
    "keep-everywhere": (1, []),
    "rank-1-keeps-nothing": (1, [(1, 0)]),
    "accumulation": (2, []),
    "accumulation-micro-batch-keeps-nothing": (2, [(0, 1)]),
    "nothing-kept": (2, "all"),
}


def _model():
    import collider_models

    torch.manual_seed(0)
    return collider_models.from_preset("tinyllama-tiny").double()


def _global_batch(K: int):
    """(WORLD*K*B, T) ids and keep masks; rows [(r*K + k)*B, +B) are rank r's micro-batch k."""
    gen = torch.Generator().manual_seed(K)
    ids = torch.randint(0, 512, (WORLD * K * B, T), generator=gen)
    keep = torch.rand(WORLD * K * B, T, generator=gen) < 0.5
    keep[:, -1] = False  # the last position predicts nothing
    return ids, keep


def _masks(case: str):
    K, empty = CASES[case]
    ids, keep = _global_batch(K)
    for r in range(WORLD):
        for k in range(K):
            if empty == "all" or (r, k) in empty:
                keep[(r * K + k) * B : (r * K + k + 1) * B] = False
    return ids, keep


def reference_grads(case: str) -> dict[str, torch.Tensor]:
    """One process, the whole batch at once: mean of the kept per-token losses."""
    from collider_autograd import filtered_mean

    ids, keep = _masks(case)
    model = _model()
    filtered_mean(model(ids, labels=ids).token_loss, keep).backward()
    return {n: p.grad.clone() if p.grad is not None else torch.zeros_like(p) for n, p in model.named_parameters()}


def worker(out: str) -> None:
    from collider_models.training import distributed
    from collider_models.training.step import Selection, accumulate_gradients

    class Fixed(Selection):
        def __init__(self, masks):
            super().__init__("given", 1.0)
            self.masks = masks

        def plan(self, valids, step, rank):
            return [int(m.sum()) for m in self.masks]

        def mask(self, k, ids, token_loss, valid):
            return self.masks[k]

    d = distributed.init("cpu")
    results = {}
    for mode in ("ddp", "fsdp"):
        for case, (K, _) in CASES.items():
            ids, keep = _masks(case)
            rows = [slice((d.rank * K + k) * B, (d.rank * K + k + 1) * B) for k in range(K)]
            model = distributed.wrap(_model(), d, fsdp=mode == "fsdp")
            stats = accumulate_gradients(model, [ids[s] for s in rows], Fixed([keep[s] for s in rows]), d)
            grads = {}
            for name, p in distributed.unwrap(model).named_parameters():
                g = p.grad if p.grad is not None else torch.zeros_like(p)
                grads[name] = g.full_tensor() if hasattr(g, "full_tensor") else g
            results[(mode, case)] = {"grads": grads, "kept": stats.kept, "loss": stats.loss}
    # FSDP2 under --precision bf16: fp32 parameters gathered as bf16 (MixedPrecisionPolicy)
    case, (K, _) = "keep-everywhere", CASES["keep-everywhere"]
    ids, keep = _masks(case)
    rows = [slice((d.rank * K + k) * B, (d.rank * K + k + 1) * B) for k in range(K)]
    model = distributed.wrap(_model().float(), d, fsdp=True, precision="bf16")
    seen = []
    distributed.unwrap(model).model.layers[0].mlp.register_forward_pre_hook(
        lambda m, a: seen.append(next(m.parameters()).dtype))
    stats = accumulate_gradients(model, [ids[s] for s in rows], Fixed([keep[s] for s in rows]), d, precision="bf16")
    grads = {name: p.grad.full_tensor() for name, p in model.named_parameters()}
    results[("fsdp-bf16", case)] = {"grads": grads, "kept": stats.kept, "param_dtype": seen[0],
                                    "master_dtype": next(model.parameters()).dtype}
    if d.main:
        torch.save(results, out)
    distributed.shutdown(d)


@pytest.fixture(scope="module")
def distributed_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist") / "grads.pt"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={WORLD}",
           str(Path(__file__).resolve()), str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return torch.load(out, weights_only=False)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
@pytest.mark.parametrize("case", list(CASES))
def test_one_step_gradients_equal_single_process(distributed_results, mode, case):
    got = distributed_results[(mode, case)]
    ref = reference_grads(case)
    _, keep = _masks(case)
    assert got["kept"] == int(keep.sum())
    assert set(got["grads"]) == set(ref)
    for name, g in got["grads"].items():
        torch.testing.assert_close(g, ref[name], rtol=1e-9, atol=1e-12, msg=f"{mode} {case} {name}")
    if case == "nothing-kept":
        assert all(bool((g == 0).all()) for g in got["grads"].values())
        assert got["loss"] == 0.0
    else:
        assert max(float(g.abs().max()) for g in got["grads"].values()) > 0


@pytest.mark.slow
def test_fsdp_bf16_gathers_bf16_parameters_and_keeps_fp32_master_gradients(distributed_results):
    got = distributed_results[("fsdp-bf16", "keep-everywhere")]
    assert got["param_dtype"] == torch.bfloat16 and got["master_dtype"] == torch.float32
    ref = reference_grads("keep-everywhere")
    assert all(g.dtype == torch.float32 for g in got["grads"].values())
    flat = torch.cat([got["grads"][n].double().reshape(-1) for n in sorted(ref)])
    want = torch.cat([ref[n].reshape(-1) for n in sorted(ref)])
    assert float((flat - want).norm() / want.norm()) < 3e-2  # bf16 compute against the fp64 step


if __name__ == "__main__":
    worker(sys.argv[1])
