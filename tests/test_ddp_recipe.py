"""The multi-process recipe for a loop of one's own: call the DDP-wrapped model itself
(``ddp(ids, labels=...)``, which arms DDP's gradient hooks), normalise by the kept-token count
summed over ranks, and the ranks stay in sync — equal to one process on the concatenated batch.

Run by pytest; ``torch.multiprocessing`` starts the two gloo workers.
"""

import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import collider_models
from collider_autograd import filtered_mean, select_top_k

B, T, STEPS = 2, 10, 3


def _batch(step: int, rank: int):
    gen = torch.Generator().manual_seed(100 * step + rank)
    ids = torch.randint(0, 512, (B, T), generator=gen)
    return ids, ids.clone()  # transformers-style labels: the inputs, shifted inside


def _model():
    torch.manual_seed(0)
    return collider_models.from_preset("tinyllama-tiny").double()


def _step(model, opt, parts):
    """One SGD step over ``parts`` [(ids, labels)] of this process, normalised by ``global_kept``."""
    outs = [model(ids, labels=labels) for ids, labels in parts]
    keeps = [select_top_k(o.token_loss.detach(), 0.6, per="sequence", valid=o.labels != -100) for o in outs]
    kept = torch.stack([k.sum() for k in keeps]).sum().double()
    if dist.is_initialized():
        dist.all_reduce(kept)  # the global normaliser, before the backward
    loss = sum(filtered_mean(o.token_loss, k, normalizer=kept) for o, k in zip(outs, keeps, strict=True))
    opt.zero_grad(set_to_none=True)
    (loss * (dist.get_world_size() if dist.is_initialized() else 1)).backward()  # DDP averages over ranks
    opt.step()


def _worker(rank: int, world: int, store: str, out: str) -> None:
    # A file store rendezvous: no port to collide with other runs.
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    model = _model()
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.5)
    for step in range(STEPS):
        _step(ddp, opt, [_batch(step, rank)])
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    gathered = [torch.empty_like(flat) for _ in range(world)]
    dist.all_gather(gathered, flat)
    if rank == 0:
        torch.save(gathered, out)
    dist.barrier()  # nobody leaves while another still talks to it
    dist.destroy_process_group()
    # Leave without the interpreter's teardown: gloo's background threads can abort it ("terminate
    # called without an active exception") after all the work is done and checked.
    os._exit(0)


def test_ddp_ranks_stay_in_sync_and_equal_one_process(tmp_path):
    out = str(tmp_path / "params.pt")
    mp.spawn(_worker, args=(2, str(tmp_path / "store"), out), nprocs=2, join=True)
    rank0, rank1 = torch.load(out)
    assert torch.equal(rank0, rank1)  # in sync
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for step in range(STEPS):
        _step(model, opt, [_batch(step, 0), _batch(step, 1)])
    single = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    torch.testing.assert_close(rank0, single, rtol=1e-10, atol=1e-12)
    assert not torch.equal(single, torch.cat([p.detach().reshape(-1) for p in _model().parameters()]))  # it trained
