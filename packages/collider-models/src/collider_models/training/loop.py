"""One training stage: build the model, resume if asked, step, evaluate, checkpoint, and write
``metrics.jsonl``, the summary, ``loss.png`` and ``final/``."""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

import collider_models
from collider_models.presets import preset_config
from collider_models.training import checkpoints, distributed
from collider_models.training.config import TrainConfig
from collider_models.training.interrupt import StopRequest
from collider_models.training.metrics import MetricsLog, plot, write_summary
from collider_models.training.packing import Packed, SequenceOrder
from collider_models.training.step import Selection, accumulate_gradients, evaluate
from collider_models.training.tokenizer import TextTokenizer

MAX_GRAD_NORM = 1.0
FINAL_LR_SHARE = 0.1  # the cosine schedule ends at this share of --lr
# Settings a resumed run must share with the checkpoint it continues.
RESUME_KEYS = ("world_size", "batch_size", "seq_len", "grad_accum", "seed", "model", "data", "selection", "keep",
               "masked_loss")
INTERRUPTED = 130  # exit status after a stop request (as after Ctrl-C)


def build_model(cfg: TrainConfig, tokenizer: TextTokenizer, device: torch.device) -> torch.nn.Module:
    """The model to train, in fp32: a preset (random init, seeded, with the tokenizer's
    vocabulary size and special ids) or a checkpoint folder."""
    if cfg.from_scratch:
        hf = preset_config(cfg.model)
        hf.update(vocab_size=cfg.vocab_size or hf["vocab_size"], bos_token_id=tokenizer.eos_id,
                  eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.eos_id)
        torch.manual_seed(cfg.seed)
        model = collider_models.from_config(hf).to(device)
    else:
        model = collider_models.from_pretrained(cfg.model, dtype=torch.float32, device=device)
    check_vocab(model, tokenizer, cfg.model)
    return model


def check_vocab(model, tokenizer: TextTokenizer, name: str) -> None:
    """The model has an embedding row for every token id of the tokenizer."""
    V = model.config.vocab_size
    if tokenizer.vocab_size > V:
        raise ValueError(f"the tokenizer ({tokenizer.source}) has {tokenizer.vocab_size} tokens but model "
                         f"{name!r} has vocab_size {V}: they do not belong together")


def make_optimizer(model: torch.nn.Module, lr: float, device: torch.device) -> torch.optim.AdamW:
    """AdamW (betas 0.9/0.95, no weight decay); the fused kernel on CUDA, the default one elsewhere."""
    return torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0,
                             fused=True if device.type == "cuda" else None)


def lr_lambda(warmup: int, steps: int):
    """Linear warm-up over ``warmup`` steps, then cosine decay to :data:`FINAL_LR_SHARE` at ``steps``."""

    def f(step: int) -> float:  # ``step`` optimizer steps taken so far
        if step < warmup:
            return (step + 1) / (warmup + 1)
        t = (step - warmup) / max(1, steps - warmup)
        return FINAL_LR_SHARE + (1 - FINAL_LR_SHARE) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))

    return f


def _trainer_state(cfg: TrainConfig, d: distributed.Dist, position: int) -> dict:
    return {"data_position": position, "world_size": d.world, "batch_size": cfg.batch_size, "seq_len": cfg.seq_len,
            "grad_accum": cfg.grad_accum, "seed": cfg.seed, "model": cfg.model, "data": cfg.data,
            "selection": cfg.selection, "keep": cfg.keep, "steps": cfg.steps, "masked_loss": cfg.masked_loss}


def _check_resumable(saved: dict, now: dict, folder: Path) -> None:
    diff = [k for k in RESUME_KEYS if saved.get(k) != now.get(k)]
    if diff:
        shown = "; ".join(f"{k}: checkpoint {saved.get(k)!r}, now {now.get(k)!r}" for k in diff)
        raise ValueError(f"cannot resume from {folder}: the run's settings differ ({shown}). "
                         "Resume with the same settings and number of processes, or start a new --out")


def check_data(cfg: TrainConfig, packed: Packed, d: distributed.Dist, what: str) -> None:
    need = d.world * cfg.grad_accum * cfg.batch_size
    if packed.train.shape[0] < need:
        raise ValueError(
            f"{what} is too short: {packed.tokens} tokens make {packed.train.shape[0]} training sequences of "
            f"--seq-len {cfg.seq_len}, one step needs {need} (processes x --grad-accum x --batch-size); "
            "give more text or lower --seq-len/--batch-size"
        )
    if packed.eval.shape[0] < d.world:
        raise ValueError(f"{what}: the held-out split has {packed.eval.shape[0]} sequences of --seq-len "
                         f"{cfg.seq_len}, fewer than the {d.world} processes; give more (or separate) evaluation text")


def _eval_subset(sequences: torch.Tensor, most: int) -> torch.Tensor:
    if sequences.shape[0] <= most:
        return sequences
    pick = torch.linspace(0, sequences.shape[0] - 1, most).round().long()
    return sequences[pick]


def train_stage(
    cfg: TrainConfig,
    tokenizer: TextTokenizer,
    packed: Packed,
    reference: torch.nn.Module | None,
    d: distributed.Dist,
    log=print,
) -> dict:
    """Train ``cfg.model`` on ``packed`` into ``cfg.out``; returns the summary (its
    ``status`` is "complete" or "interrupted")."""
    out = Path(cfg.out)
    started = time.perf_counter()
    model = build_model(cfg, tokenizer, d.device)
    n_params = sum(p.numel() for p in model.parameters())
    model = distributed.wrap(model, d, cfg.fsdp, cfg.precision)
    opt = make_optimizer(model, cfg.learning_rate(), d.device)
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg.warmup, cfg.steps))
    step, position = 0, 0
    latest = checkpoints.latest_checkpoint(out / "checkpoints") if cfg.resume else None
    if latest is not None:
        _check_resumable(checkpoints.read_trainer_state(latest), _trainer_state(cfg, d, 0), latest)
        state = checkpoints.load_checkpoint(latest, model, opt, scheduler)
        step, position = state["step"], state["data_position"]
        log(f"resuming from {latest} (step {step})")
    metrics = MetricsLog(out / "metrics.jsonl", step if latest is not None else None) if d.main else None
    order = SequenceOrder(packed.train.shape[0], cfg.seed)
    eval_seqs = _eval_subset(packed.eval, cfg.eval_sequences)
    sel = Selection(cfg.selection, cfg.keep, reference, cfg.seed)
    per_step = d.world * cfg.grad_accum * cfg.batch_size
    log(f"{cfg.model}: {n_params / 1e6:.2f}M parameters on {d.device} x {d.world}, {cfg.precision}; "
        f"{packed.train.shape[0]} training / {packed.eval.shape[0]} held-out sequences of {cfg.seq_len} tokens; "
        f"keep {cfg.keep:.0%} by {cfg.selection}; {cfg.steps} steps of {per_step} sequences")

    def run_eval(at: int) -> float:
        loss = evaluate(model, eval_seqs, cfg.batch_size, d, cfg.precision)
        if metrics is not None:
            metrics.write({"step": at, "eval_loss": loss})
        return loss

    def save(at: int) -> Path:
        return checkpoints.save_checkpoint(out / "checkpoints", at, model, opt, scheduler,
                                           _trainer_state(cfg, d, position), d)

    status = "complete"
    if step == 0 and cfg.eval_every:
        run_eval(0)
    bar = tqdm(total=cfg.steps, initial=step, desc=Path(cfg.out).name, unit="step", disable=not d.main,
               file=sys.stderr, dynamic_ncols=True)
    last_saved = step if latest is not None else -1
    with StopRequest(announce=d.main) as stop:
        while step < cfg.steps:
            t0 = time.perf_counter()
            idx = order.micro_batches(position, cfg.batch_size, cfg.grad_accum, d.rank, d.world)
            micro = [packed.train[i].to(d.device, non_blocking=True) for i in idx]
            marked = None if packed.train_marked is None else [packed.train_marked[i] for i in idx]
            stats = accumulate_gradients(model, micro, sel, d, step=step, precision=cfg.precision,
                                         stop=stop.requested, masked_loss=cfg.masked_loss, marked=marked)
            if not math.isfinite(stats.loss_all):
                raise FloatingPointError(f"the training loss became {stats.loss_all} at step {step + 1}; "
                                         f"resume from the last checkpoint with a lower --lr")
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_GRAD_NORM)
            lr = scheduler.get_last_lr()[0]
            opt.step()
            scheduler.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            position += per_step
            seconds = time.perf_counter() - t0
            tok_s = per_step * cfg.seq_len / seconds
            record = {"step": step, "loss": stats.loss, "loss_all": stats.loss_all,
                      "kept_share": stats.kept / stats.predicted, "tokens_per_s": tok_s, "lr": lr}
            shown = {"loss": f"{stats.loss:.3f}", "all": f"{stats.loss_all:.3f}", "kept": f"{record['kept_share']:.0%}"}
            if stats.marked:  # data with marked spans (the default corpus: corrupted lines)
                record["kept_share_marked"] = stats.kept_marked / stats.marked
                record["kept_share_unmarked"] = (stats.kept - stats.kept_marked) / (stats.predicted - stats.marked)
                shown["kept_marked"] = f"{record['kept_share_marked']:.0%}"
            if metrics is not None:
                gn = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
                metrics.write({**record, "grad_norm": float(gn)})
            bar.update(1)
            bar.set_postfix(**shown, tok_s=f"{tok_s:,.0f}")
            if cfg.eval_every and (step % cfg.eval_every == 0 or step == cfg.steps):
                run_eval(step)
            if stats.stop:
                status = "interrupted"
                break
            if step == cfg.steps or (cfg.save_every and step % cfg.save_every == 0):
                save(step)
                last_saved = step
    bar.close()
    if status == "interrupted" and last_saved != step:
        folder = save(step)
        last_saved = step
        log(f"stopped at step {step}: checkpoint {folder}; continue with the same command and --resume")
    if status == "complete":
        if cfg.eval_every == 0:
            run_eval(step)
        checkpoints.save_final(out / "final", model, tokenizer, d)
    summary = {"status": status}
    if d.main:
        summary = _summarize(cfg, metrics, status, step, n_params, packed, d, time.perf_counter() - started)
        write_summary(out / "summary.json", summary)
        title = f"{cfg.model} on {cfg.title or ', '.join(map(str, cfg.data or []))}\n" \
                f"keep {cfg.keep:.0%} by {cfg.selection}, {step} steps of {per_step}x{cfg.seq_len} tokens"
        if not plot(metrics, out / "loss.png", title):
            log("loss.png: install matplotlib (collider-models[plot]) to plot the loss curves")
    return summary


def _mean(records: list[dict], key: str) -> float | None:
    values = [r[key] for r in records if key in r]
    return sum(values) / len(values) if values else None


def _summarize(cfg, metrics: MetricsLog, status, step, n_params, packed, d, seconds) -> dict:
    train, evals = metrics.train_records(), metrics.eval_records()
    out = Path(cfg.out)
    return {
        "status": status,
        "model": cfg.model,
        "parameters": n_params,
        "data": cfg.title or cfg.data,
        "selection": cfg.selection,
        "keep": cfg.keep,
        "reference": cfg.reference,
        "reference_data": cfg.reference_data,
        "precision": cfg.precision,
        "backward": "dense (masked loss)" if cfg.masked_loss else "Collider (filtered_mean)",
        "device": str(d.device),
        "world_size": d.world,
        "steps": step,
        "tokens_trained": step * d.world * cfg.grad_accum * cfg.batch_size * cfg.seq_len,
        "train_sequences": int(packed.train.shape[0]),
        "eval_sequences": int(packed.eval.shape[0]),
        "final_loss_kept": train[-1]["loss"] if train else None,
        "final_loss_all": train[-1]["loss_all"] if train else None,
        "eval_loss_first": evals[0]["eval_loss"] if evals else None,
        "eval_loss_last": evals[-1]["eval_loss"] if evals else None,
        "mean_kept_share": _mean(train, "kept_share"),
        "mean_kept_share_marked": _mean(train, "kept_share_marked"),
        "mean_kept_share_unmarked": _mean(train, "kept_share_unmarked"),
        "mean_tokens_per_s": _mean(train, "tokens_per_s"),
        "seconds_this_session": seconds,
        "final": str(out / "final") if status == "complete" else None,
        "checkpoints": str(out / "checkpoints"),
        "metrics": str(out / "metrics.jsonl"),
        "plot": str(out / "loss.png"),
        "config": cfg.to_dict(),
    }
