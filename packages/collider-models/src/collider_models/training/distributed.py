"""Multi-process training under ``torchrun``: the process group, wrapping the model in DDP or
FSDP2, gradient-sync control for accumulation, and full (unsharded) state dicts.

Without ``torchrun`` (no ``WORLD_SIZE`` in the environment) everything here is a no-op on one
process, so the training loop has a single code path.
"""

from __future__ import annotations

import gc
import os
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass
class Dist:
    """This process's place: ``rank`` of ``world`` processes, and its device."""

    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        """Whether this process writes files and prints (rank 0)."""
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1


FSDP_NEEDS_TORCHRUN = "--fsdp shards the model over processes: launch with torchrun --nproc-per-node N"


def launched() -> bool:
    """Whether this process was started by ``torchrun`` (or another launcher setting ``WORLD_SIZE``)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init(device: str) -> Dist:
    """Set up the process group when launched by ``torchrun`` (NCCL on CUDA, gloo on CPU) and
    pick this process's device (``cuda:LOCAL_RANK`` on CUDA)."""
    if not launched():
        return Dist(0, 1, torch.device(device))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "cuda":
        dev = torch.device("cuda", local)
        torch.cuda.set_device(dev)
    else:
        dev = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", device_id=dev if dev.type == "cuda" else None)
    return Dist(dist.get_rank(), dist.get_world_size(), dev)


def shutdown(d: Dist) -> None:
    """Leave the process group (after a barrier, so no process exits while others still talk).

    Cyclic garbage is collected first: a trained FSDP2 model lives in reference cycles that hold
    the group, and finalizing it only at interpreter exit, after the group is gone, is a suspected
    cause of a rare abort at exit ("terminate called without an active exception")."""
    if d.active and dist.is_initialized():
        gc.collect()
        dist.barrier()
        dist.destroy_process_group()


def barrier(d: Dist) -> None:
    if d.active:
        dist.barrier()


def all_sum(d: Dist, t: torch.Tensor) -> torch.Tensor:
    """``t`` summed over processes (in place; returned)."""
    if d.active:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def broadcast_object(d: Dist, obj):
    """Rank 0's ``obj`` on every process."""
    if not d.active:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def wrap(model: nn.Module, d: Dist, fsdp: bool, precision: str = "fp32") -> nn.Module:
    """The model to train: itself on one process, else ``DistributedDataParallel``, or with
    ``fsdp`` FSDP2 (``fully_shard`` on every decoder layer, then on the whole model, whose
    own group holds the embedding, final norm and LM head: the fused loss reads the LM head's
    weight directly, so it must not be a group of its own).

    With FSDP2 and ``precision == "bf16"`` the sharded fp32 parameters are gathered as bf16 and
    gradients reduced in fp32 (FSDP2's ``MixedPrecisionPolicy``): the layers compute in bf16
    without a cast of each weight, and the optimizer still steps fp32 master weights."""
    if fsdp:
        if not d.active:
            raise ValueError(FSDP_NEEDS_TORCHRUN)
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        policy = MixedPrecisionPolicy()
        if precision == "bf16":
            policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        for layer in model.model.layers:
            fully_shard(layer, mp_policy=policy)
        fully_shard(model, mp_policy=policy)
        return model
    if not d.active:
        return model
    ids = [d.device.index] if d.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids)


def unwrap(model: nn.Module) -> nn.Module:
    """The Collider model inside a DDP wrapper (FSDP2 modules are the model itself)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def gradient_sync(model: nn.Module, sync: bool):
    """Context for one accumulation micro-batch: gradients are reduced over processes only when
    ``sync`` (the last micro-batch of a step)."""
    if isinstance(model, nn.parallel.DistributedDataParallel):
        return nullcontext() if sync else model.no_sync()
    if hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        return _fsdp_sync(model, sync)
    return nullcontext()


@contextmanager
def _fsdp_sync(model, sync: bool):
    model.set_requires_gradient_sync(sync)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


def _options(**kw):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kw)


def full_model_state(model: nn.Module, d: Dist) -> dict[str, torch.Tensor]:
    """Unsharded CPU parameters by name (every process must call it; complete on rank 0)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(model, options=_options(cpu_offload=True))


def full_optimizer_state(model: nn.Module, opt: torch.optim.Optimizer, d: Dist) -> dict:
    """Unsharded optimizer state keyed by parameter name (every process calls it; complete on rank 0)."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return get_optimizer_state_dict(model, opt, options=_options(cpu_offload=True))


def load_full_state(model: nn.Module, opt: torch.optim.Optimizer, model_state: dict, optim_state: dict) -> None:
    """Load unsharded states (as the functions above return them) into ``model`` and ``opt``;
    each process reads them whole and keeps its shard."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    set_model_state_dict(model, model_state, options=_options())
    set_optimizer_state_dict(model, opt, optim_state, options=_options())
