"""One optimizer step of token-filtered training over accumulation micro-batches and processes.

The loss of a step is the mean over every kept token of every micro-batch of every process,
so its normaliser is the global kept-token count. Every selection rule fixes that count before
any forward pass (top-k keeps ``round(keep * n)`` of a micro-batch's ``n`` predicted
positions; random masks are drawn up front), so it is summed over micro-batches and
all-reduced over processes first, and each micro-batch's backward then runs with the final
normaliser. DDP and FSDP average gradients over the ``W`` processes, so each process divides
by ``count / W``. A process or micro-batch that keeps nothing still runs its forward and
backward (a zero loss with zero gradients), so no process waits on another.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch import nn

from collider_autograd import excess_loss, filtered_mean, select_random, select_top_k, top_k_counts
from collider_models.training import distributed


class Selection:
    """Which tokens a step keeps.

    Args:
        rule: "excess" (top-k of the excess loss over ``reference``), "loss" (top-k of the
            model's own loss) or "random" (each position with probability ``keep``).
        keep: share of predicted positions kept, in (0, 1].
        reference: the frozen reference model ("excess" only).
        seed: seeds the random masks, drawn per (seed, step, rank, micro-batch) so that an
            exact resume needs no generator state.

    A step first calls :meth:`plan` (the kept count of each micro-batch, before any
    forward), then :meth:`mask` for each micro-batch after its forward. Subclasses may
    implement other rules with the same two methods.
    """

    def __init__(self, rule: str, keep: float, reference: nn.Module | None = None, seed: int = 0):
        self.rule, self.keep, self.reference, self.seed = rule, keep, reference, seed
        self._masks: list[torch.Tensor] = []

    def plan(self, valids: list[torch.Tensor], step: int, rank: int) -> list[int]:
        """Kept count of each micro-batch, from its (B, T) bool mask of predicted positions."""
        if self.rule == "random":
            self._masks = []
            for k, valid in enumerate(valids):
                gen = torch.Generator().manual_seed(hash((self.seed, step, rank, k)) & 0x7FFF_FFFF_FFFF_FFFF)
                mask = select_random(valid.shape, self.keep, valid=valid.cpu(), generator=gen)
                self._masks.append(mask.to(valid.device))
            return [int(m.sum()) for m in self._masks]
        return [int(top_k_counts(v, self.keep)) for v in valids]  # what select_top_k keeps

    def mask(self, k: int, ids: torch.Tensor, token_loss: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """(B, T) bool keep mask of micro-batch ``k`` from its ids and (B, T) token losses."""
        if self.rule == "random":
            return self._masks[k]
        scores = token_loss.detach()
        if self.rule == "excess":
            with torch.no_grad():
                scores = excess_loss(token_loss, self.reference(ids, labels=ids).token_loss)
        return select_top_k(scores, self.keep, valid=valid, validate=False)  # NaN: caught after the step


@dataclass
class StepStats:
    """Global (all processes) sums of one step."""

    loss: float  # mean loss over kept tokens (the optimised loss)
    loss_all: float  # mean loss over all predicted tokens
    kept: int
    predicted: int
    stop: bool  # some process asked to stop after this step
    kept_marked: int = 0  # kept predicted tokens inside marked spans (see ``marked``)
    marked: int = 0  # predicted tokens inside marked spans


def autocast(device: torch.device, precision: str):
    """bf16 autocast for ``precision == "bf16"`` (parameters and optimizer state stay fp32)."""
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()


def accumulate_gradients(
    model: nn.Module,
    micro_batches: list[torch.Tensor],
    sel: Selection,
    d: distributed.Dist,
    *,
    step: int = 0,
    precision: str = "fp32",
    stop: bool = False,
    masked_loss: bool = False,
    marked: list[torch.Tensor] | None = None,
) -> StepStats:
    """Forward and backward of one step's micro-batches (each (B, T) token ids, used as
    inputs and, shifted inside the model, as labels); gradients land in ``.grad``.

    ``masked_loss`` computes the same loss as a plain masked mean, whose backward is dense
    (the baseline Collider is measured against; its gradient does not detach filtered keys
    and values).

    ``stop`` is this process's stop request; the returned ``stop`` is true when any process
    made one, so all of them stop after the same step. ``marked`` ((B, T) bool per
    micro-batch: tokens inside marked spans of the data) adds the counts of kept marked tokens.
    """
    dev = micro_batches[0].device
    valids = []
    for ids in micro_batches:
        valid = torch.ones(ids.shape, dtype=torch.bool, device=dev)
        valid[:, -1] = False  # the last position has no next token (as ``labels`` say after the shift)
        valids.append(valid)
    planned = sel.plan(valids, step, d.rank)  # kept count of each micro-batch
    local = sum(planned)
    count = distributed.all_sum(d, torch.tensor([float(local)], dtype=torch.float64, device=dev))
    normalizer = float(count.item()) / d.world  # DDP/FSDP average over processes

    sums = torch.zeros(6, dtype=torch.float64, device=dev)  # kept loss, all loss, kept, predicted, marked x2
    for k, (ids, valid) in enumerate(zip(micro_batches, valids, strict=True)):
        last = k == len(micro_batches) - 1
        with distributed.gradient_sync(model, sync=last):
            with autocast(dev, precision):
                out = model(ids, labels=ids)  # call the (wrapped) model so DDP/FSDP hooks run
                token_loss = out.token_loss  # (B, T) fp32; the last position is 0
                keep = sel.mask(k, ids, token_loss, valid)
            if masked_loss:
                loss = (token_loss * keep).sum() / max(normalizer, 1e-30)
            else:
                # the planned count spares filtered_mean a device sync (checked against keep below)
                loss = filtered_mean(token_loss, keep, normalizer=normalizer, validate=False, kept_count=planned[k])
            loss.backward()
        detached = token_loss.detach().double()
        label_marked = torch.zeros_like(valid)  # position t predicts token t + 1
        if marked is not None:
            label_marked[:, :-1] = marked[k][:, 1:].to(dev)
        sums += torch.stack([(detached * keep).sum(), torch.where(valid, detached, 0.0).sum(), keep.sum().double(),
                             valid.sum().double(), (keep & label_marked).sum().double(),
                             (valid & label_marked).sum().double()])
    flags = torch.tensor([1.0 if stop else 0.0], dtype=torch.float64, device=dev)
    total = distributed.all_sum(d, torch.cat([sums, flags])).tolist()
    kept_loss, all_loss, kept, predicted, kept_marked, n_marked, stops = total
    if int(kept) != int(count.item()):
        raise RuntimeError(f"selection kept {int(kept)} tokens, {int(count.item())} were counted for the normaliser")
    return StepStats(
        loss=kept_loss / kept if kept else 0.0,
        loss_all=all_loss / predicted,
        kept=int(kept),
        predicted=int(predicted),
        stop=stops > 0,
        kept_marked=int(kept_marked),
        marked=int(n_marked),
    )


@torch.no_grad()
def evaluate(model: nn.Module, sequences: torch.Tensor, batch: int, d: distributed.Dist, precision: str) -> float:
    """Mean loss over the predicted positions of held-out ``sequences`` (N, T). Each process
    reads the same number of batches (the sequences that do not divide evenly over the
    processes are left out), so sharded models never wait on each other."""
    per_rank = sequences.shape[0] // d.world
    mine = sequences[d.rank * per_rank : (d.rank + 1) * per_rank]
    sums = torch.zeros(2, dtype=torch.float64, device=d.device)
    was_training = model.training
    model.eval()
    for start in range(0, per_rank, batch):
        ids = mine[start : start + batch].to(d.device)
        with autocast(d.device, precision):
            out = model(ids, labels=ids)
        n = out.labels != -100
        sums += torch.stack([out.token_loss.double()[n].sum(), n.sum().double()])
    model.train(was_training)
    total, n = distributed.all_sum(d, sums).tolist()
    return total / n if n else float("nan")
