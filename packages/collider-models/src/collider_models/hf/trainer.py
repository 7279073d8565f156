"""``ColliderTrainer``: a ``transformers.Trainer`` that trains on the best-scoring share of tokens.

Each micro-batch is scored per position (excess loss over a reference model, the model's own
loss, or at random), the top share of its non-padded positions is kept, and the loss is
:func:`~collider_autograd.filtered_mean` over the kept positions, so the backward of every
layer runs over the kept tokens only. Everything else is the ``Trainer``'s own.
"""

from __future__ import annotations

import inspect
import os

import torch
from torch import nn
from transformers import PreTrainedModel, Trainer, TrainingArguments
from transformers.trainer import TRAINING_ARGS_NAME

from collider_autograd import excess_loss, filtered_mean, select_top_k, top_k_counts
from collider_models.blocks import CausalLM, loss_labels
from collider_models.checkpoint import save_pretrained
from collider_models.hf.convert import from_hf

SELECTIONS = ("excess", "loss", "random")
IGNORE_INDEX = -100
# Batch keys the trainer reads; the Trainer drops all others (``remove_unused_columns``).
BATCH_KEYS = ["input_ids", "attention_mask", "labels"]


class ColliderTrainer(Trainer):
    """``transformers.Trainer`` with Collider token filtering.

    Args:
        model: a ``transformers`` ``LlamaForCausalLM``, ``Qwen2ForCausalLM`` or
            ``PhiForCausalLM`` (converted with :func:`~collider_models.from_hf`, sharing its
            parameters; checkpoints are then written by its own ``save_pretrained``, so they
            are ordinary ``transformers`` checkpoints), or a Collider
            :class:`~collider_models.CausalLM` (checkpoints written by
            :func:`~collider_models.save_pretrained`: ``config.json`` + ``model.safetensors``).
        args: the ``TrainingArguments``. FSDP, DeepSpeed, ``torch_compile``, gradient
            checkpointing, label smoothing and several GPUs in one process are refused; DDP
            (``torchrun``, ``accelerate launch``), gradient accumulation, logging, evaluation,
            saving and resuming work as usual, and ``bf16``/``fp16`` run the model under the
            ``Trainer``'s autocast (which the model's layers must support). An unset
            ``ddp_find_unused_parameters`` becomes ``False``: every trainable parameter gets a
            gradient, zero where nothing was kept.
        keep: share of each micro-batch's valid positions to keep, in [0, 1].
        selection: ``"excess"`` (Rho-1: the model's loss minus ``reference_model``'s),
            ``"loss"`` (the model's own loss) or ``"random"`` (uniform scores: a random subset
            of exactly that size).
        reference_model: the frozen scorer for ``"excess"``: a Collider model or a
            ``transformers`` model :func:`~collider_models.from_hf` accepts. It is moved to the
            training device, put in eval mode and frozen (``requires_grad_(False)``), and runs
            without an autograd graph, under the same autocast as the model.
        per: ``"batch"`` ranks all positions of a micro-batch together (Rho-1);
            ``"sequence"`` keeps the same share of every sequence, which makes the selection
            independent of how sequences are grouped into micro-batches and ranks.
        **kwargs: the other ``Trainer`` arguments (``train_dataset``, ``eval_dataset``,
            ``data_collator``, ``processing_class``, ``callbacks``, ``optimizers``, ...);
            ``model_init`` and ``compute_loss_func`` are not supported.

    Batches follow the ``Trainer``'s convention: ``input_ids``, optional ``attention_mask``
    and ``labels`` (normally equal to the inputs; shifted inside, ``-100`` ignored). Positions
    whose target is padding (``attention_mask == 0``) are never kept. Batches must be right
    padded unless the model's forward takes an ``attention_mask``.

    The loss of a micro-batch is the sum of its kept per-token losses divided by the number
    of kept positions of the whole optimizer step: all accumulated micro-batches and, with
    ``average_tokens_across_devices`` (the default), all data-parallel ranks, the way the
    ``Trainer`` uses ``num_items_in_batch``. The kept count depends only on ``keep``, ``per``
    and the valid positions, so it is known before any forward. Logged besides the
    ``Trainer``'s ``loss`` (the filtered loss of each step): ``kept_share`` (kept / valid
    positions), ``filtered_loss`` (mean loss over kept positions) and ``unfiltered_loss``
    (mean over all valid positions), over the logging interval and all ranks. Evaluation
    reports the ordinary mean loss over all valid positions.

    Attributes:
        model: the Collider model being trained (what the ``Trainer`` wraps and calls).
        hf_model: the ``transformers`` model it was converted from (same parameters), or
            ``None`` when a Collider model was given.
        reference_model: the frozen Collider reference model, or ``None``.
    """

    # compute_loss already normalises by the kept count of the whole accumulated batch.
    loss_is_scaled_for_ga = True

    def __init__(
        self,
        model: nn.Module | None = None,
        args: TrainingArguments | None = None,
        *,
        keep: float = 0.6,
        selection: str = "excess",
        reference_model: nn.Module | None = None,
        per: str = "batch",
        **kwargs,
    ):
        if not 0.0 <= keep <= 1.0:
            raise ValueError(f"keep must be in [0, 1], got {keep}")
        if selection not in SELECTIONS:
            raise ValueError(f"selection must be one of {SELECTIONS}, got {selection!r}")
        if per not in ("batch", "sequence"):
            raise ValueError(f"per must be 'batch' or 'sequence', got {per!r}")
        if selection == "excess" and reference_model is None:
            raise ValueError(
                'selection="excess" scores tokens against a reference model: pass reference_model=... '
                '(a frozen model of the same tokenizer) or use selection="loss" or "random"'
            )
        if selection != "excess" and reference_model is not None:
            raise ValueError(f'reference_model is only used by selection="excess", got selection={selection!r}')
        for name in ("model_init", "compute_loss_func"):
            if kwargs.get(name) is not None:
                raise ValueError(f"ColliderTrainer does not support {name}")
        args = TrainingArguments(output_dir="tmp_trainer") if args is None else args
        _check_args(args)
        if args.ddp_find_unused_parameters is None:
            args.ddp_find_unused_parameters = False  # every trainable parameter gets a gradient, if only 0
        self.hf_model, model = _collider_model(model, args)
        self.keep, self.selection, self.per = keep, selection, per
        self.reference_model = None
        if selection == "excess":
            self.reference_model = _frozen_reference(reference_model, model, args)
        self._takes_mask = all(_takes_attention_mask(m) for m in (model, self.reference_model) if m is not None)
        self._sums = None  # kept, valid, kept loss, valid loss: summed until the next log
        self._pending = []  # (NaN scores, ignored position kept) flags of micro-batches, on the device
        super().__init__(model=model, args=args, **kwargs)
        # Older Trainer releases decide from this flag (instead of loss_is_scaled_for_ga) that the
        # loss is normalised by num_items_in_batch and must not be divided again.
        self.model_accepts_loss_kwargs = True
        self._signature_columns = list(BATCH_KEYS)

    # ---- the loss -----------------------------------------------------------------------------

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """Filtered loss of one micro-batch (the mean loss over valid positions in eval mode).

        ``num_items_in_batch`` is the kept count of the whole step (:meth:`get_batch_samples`);
        without it, the micro-batch's own kept count normalises.
        """
        ids, labels, mask = self._batch(inputs)
        extra = {"attention_mask": mask} if (self._takes_mask and mask is not None) else {}
        if model.training:  # the kept count before the forward, so nothing after it waits for the GPU
            valid = self._valid(labels, mask)
            kept = int(self._kept_count(valid))
        out = model(ids, labels=labels, **extra)  # token_loss (B, T) fp32, shifted labels (B, T)
        if not model.training:
            return (out.loss, {"loss": out.loss}) if return_outputs else out.loss
        scores = self._scores(ids, labels, out.token_loss, extra)
        keep = select_top_k(scores, self.keep, per=self.per, valid=valid, validate=False)
        # Checked after the backward is queued (training_step): NaN scores, and a kept position
        # whose label the model ignores (never, while `valid` matches the model's labels).
        self._pending.append(((torch.isnan(scores) & valid).any(), (keep & (out.labels == IGNORE_INDEX)).any()))
        loss = filtered_mean(out.token_loss, keep, num_items_in_batch, validate=False, kept_count=kept)
        if num_items_in_batch is not None and self._global_count():
            loss = loss * self.accelerator.num_processes  # undo DDP's average of the rank gradients
        self._record(out.token_loss.detach(), keep, valid)
        return (loss, out) if return_outputs else loss

    def training_step(self, *args, **kwargs):
        """The ``Trainer``'s step; then the checks of :meth:`compute_loss` that need the GPU's answer."""
        loss = super().training_step(*args, **kwargs)
        pending, self._pending = self._pending, []
        for nan_scores, ignored_kept in pending:
            if bool(nan_scores):
                raise ValueError(f"the {self.selection!r} selection scores contain NaN at valid positions "
                                 "(the model's or the reference model's losses diverged)")
            if bool(ignored_kept):
                raise RuntimeError("the selection kept a position whose label the model ignores")
        return loss

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        """The next ``num_batches`` micro-batches of one optimizer step, and their total kept
        count (over all ranks with ``average_tokens_across_devices``): the normaliser."""
        batches = []
        for _ in range(num_batches):
            try:
                batches.append(next(epoch_iterator))
            except StopIteration:
                break
        count = torch.zeros((), dtype=torch.int64, device=device)
        for batch in batches:
            _, labels, mask = self._batch(batch)
            count += self._kept_count(self._valid(labels, mask)).to(device)
        if self._global_count():
            count = self.accelerator.gather(count[None]).sum()
        return batches, count

    @staticmethod
    def _valid(labels: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """(B, T) bool: the positions the model computes a loss for (as its ``output.labels``)."""
        return loss_labels(labels, attention_mask=mask, ignore_index=IGNORE_INDEX) != IGNORE_INDEX

    def _kept_count(self, valid: torch.Tensor) -> torch.Tensor:
        """0-dim int64 count of the positions the selection keeps of ``valid``."""
        return top_k_counts(valid, self.keep, per=self.per).sum().long()

    def _global_count(self) -> bool:
        return bool(self.args.average_tokens_across_devices) and self.accelerator.num_processes > 1

    def _batch(self, inputs) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(input_ids, labels with padded targets ignored, attention_mask or None), checked."""
        for key in ("input_ids", "labels"):
            if key not in inputs:
                raise ValueError(
                    f"batches must hold {key!r} (got {sorted(inputs)}); for causal LM training the labels are the "
                    "input ids, e.g. with DataCollatorForLanguageModeling(tokenizer, mlm=False)"
                )
        ids, labels, mask = inputs["input_ids"], inputs["labels"], inputs.get("attention_mask")
        if labels.shape != ids.shape:
            raise ValueError(f"labels must have input_ids' shape {tuple(ids.shape)}, got {tuple(labels.shape)}")
        if mask is None:
            return ids, labels, None
        if mask.shape != ids.shape:
            raise ValueError(f"attention_mask must have input_ids' shape {tuple(ids.shape)}, got {tuple(mask.shape)}")
        if not self._takes_mask and bool((mask[:, 1:] > mask[:, :-1]).any()):
            raise ValueError(
                "attention_mask has padding before real tokens (left padding); this model's forward takes no "
                "attention_mask, so batches must be right padded (tokenizer.padding_side = 'right')"
            )
        return ids, labels.masked_fill(mask == 0, IGNORE_INDEX), mask

    @torch.no_grad()
    def _scores(self, ids, labels, token_loss, extra) -> torch.Tensor:
        """(B, T) selection scores of one micro-batch."""
        if self.selection == "loss":
            return token_loss.detach()
        if self.selection == "random":
            return torch.rand(token_loss.shape, device=token_loss.device)
        with self.accelerator.autocast():
            reference = self.reference_model(ids, labels=labels, **extra).token_loss  # (B, T) fp32
        return excess_loss(token_loss, reference)

    # ---- logging ------------------------------------------------------------------------------

    def _record(self, token_loss, keep, valid) -> None:
        sums = torch.stack([keep.sum(), valid.sum(), (token_loss * keep).sum(), token_loss.sum()]).double()
        self._sums = sums if self._sums is None else self._sums + sums

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        """The ``Trainer``'s log, plus ``kept_share``, ``filtered_loss`` and ``unfiltered_loss``
        of the training steps since the last log (all ranks)."""
        if "loss" in logs and self._sums is not None:
            kept, valid, kept_loss, valid_loss = self.accelerator.reduce(self._sums, reduction="sum").tolist()
            self._sums = None
            logs["kept_share"] = kept / valid if valid else 0.0
            logs["filtered_loss"] = kept_loss / kept if kept else 0.0
            logs["unfiltered_loss"] = valid_loss / valid if valid else 0.0
        super().log(logs, *args, **kwargs)

    # ---- saving -------------------------------------------------------------------------------

    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        """Write the model as a checkpoint ``transformers`` loads: the ``transformers`` model's own
        ``save_pretrained``, or :func:`collider_models.save_pretrained` for a Collider model."""
        output_dir = self.args.output_dir if output_dir is None else output_dir
        if not self.args.should_save:
            return
        os.makedirs(output_dir, exist_ok=True)
        if self.hf_model is not None:
            self.hf_model.save_pretrained(output_dir)  # its parameters are the trained ones
        else:
            save_pretrained(self.accelerator.unwrap_model(self.model), output_dir)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        elif getattr(self.data_collator, "tokenizer", None) is not None:
            self.data_collator.tokenizer.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_NAME))


    def _issue_warnings_after_load(self, load_result) -> None:
        """Checks a checkpoint loaded into the model (resuming, ``load_best_model_at_end``): a tied
        LM head is stored once, under the embedding's name; any other missing or unexpected
        tensor is an error."""
        model = self.accelerator.unwrap_model(self.model)
        aliases = dict(model.named_parameters(remove_duplicate=False)).keys() - dict(model.named_parameters()).keys()
        missing = sorted(set(load_result.missing_keys) - aliases)
        if missing or load_result.unexpected_keys:
            raise ValueError(
                f"checkpoint does not match the model: missing {missing[:8]}, "
                f"unexpected {sorted(load_result.unexpected_keys)[:8]}"
            )


def _check_args(args: TrainingArguments) -> None:
    if not isinstance(args, TrainingArguments):
        raise TypeError(f"args must be TrainingArguments, got {type(args).__name__}")
    refused = {
        "fsdp": "FSDP", "deepspeed": "DeepSpeed", "torch_compile": "torch_compile",
        "gradient_checkpointing": "gradient checkpointing", "activation_checkpointing": "activation checkpointing",
        "label_smoothing_factor": "label smoothing",
    }
    used = [what for name, what in refused.items() if getattr(args, name, None)]
    if used:
        raise ValueError(f"ColliderTrainer does not support {', '.join(used)} (set them off in TrainingArguments)")
    if args.n_gpu > 1:
        raise ValueError(
            f"ColliderTrainer runs one GPU per process, this process sees {args.n_gpu}: launch with torchrun "
            "or accelerate launch (DDP), or set CUDA_VISIBLE_DEVICES"
        )


def _collider_model(model, args) -> tuple[PreTrainedModel | None, CausalLM]:
    """(the transformers model or None, the Collider model to train)."""
    if isinstance(model, CausalLM):
        return None, model
    if isinstance(model, PreTrainedModel):
        if args.place_model_on_device is not False:
            model.to(args.device)  # buffers too, so the transformers model stays usable on its own
        return model, from_hf(model)
    raise TypeError(f"model must be a transformers causal LM or a Collider CausalLM, got {type(model).__name__}")


def _frozen_reference(reference: nn.Module, model: CausalLM, args) -> CausalLM:
    """The reference model as a frozen Collider model in eval mode on the training device."""
    if isinstance(reference, PreTrainedModel):
        try:
            reference = from_hf(reference.to(args.device))
        except (TypeError, ValueError) as e:
            raise type(e)(f"reference_model: {e}") from e
    elif not isinstance(reference, CausalLM):
        raise TypeError(
            f"reference_model must be a transformers causal LM or a Collider CausalLM, got {type(reference).__name__}"
        )
    trained = {id(p) for p in model.parameters()}
    if any(id(p) in trained for p in reference.parameters()):
        raise ValueError("reference_model shares parameters with model; pass a separate copy (copy.deepcopy)")
    if reference.config.vocab_size != model.config.vocab_size:
        raise ValueError(
            f"reference_model has vocab_size {reference.config.vocab_size}, model {model.config.vocab_size}: "
            "both must use the same tokenizer"
        )
    return reference.to(args.device).eval().requires_grad_(False)


def _takes_attention_mask(model: nn.Module) -> bool:
    return "attention_mask" in inspect.signature(model.forward).parameters
