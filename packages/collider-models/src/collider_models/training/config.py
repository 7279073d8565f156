"""The settings of a training run and their checks, which run before any training."""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch

from collider_models.presets import PRESETS
from collider_models.training import distributed

SELECTIONS = ("excess", "loss", "random")
PRECISIONS = ("fp32", "bf16")
DEFAULT_MODEL = "tinyllama-tiny"
LR_FROM_SCRATCH, LR_FINE_TUNE = 3e-3, 3e-5


@dataclass
class TrainConfig:
    """One ``collider-train`` run; field names are the command-line options' (see
    ``collider-train --help`` and the training tutorial)."""

    model: str = DEFAULT_MODEL
    data: list[str] | None = None  # None: the embedded default corpus
    out: str = "runs/train"
    eval_data: list[str] | None = None
    reference: str | None = None  # a folder, a preset, "none"; None: the default for the data
    reference_data: list[str] | None = None
    reference_steps: int = 150
    selection: str = "excess"
    keep: float = 0.6
    steps: int = 400
    batch_size: int = 16
    seq_len: int = 128
    grad_accum: int = 1
    lr: float | None = None  # None: LR_FROM_SCRATCH for a preset, LR_FINE_TUNE for a folder
    warmup: int = 20
    precision: str = "fp32"
    device: str | None = None  # None: cuda if available, else cpu
    eval_every: int = 50
    save_every: int = 100
    resume: bool = False
    seed: int = 0
    fsdp: bool = False
    vocab_size: int | None = None  # BPE size for a preset trained from scratch (default: the preset's)
    masked_loss: bool = False  # the dense-backward baseline instead of filtered_mean
    eval_sequences: int = 256  # most held-out sequences an evaluation reads
    title: str = field(default="", repr=False)  # what the data is, for the plot and the summary

    @property
    def from_scratch(self) -> bool:
        """Whether ``model`` names a preset (random init) rather than a checkpoint folder."""
        return is_preset(self.model)

    def learning_rate(self) -> float:
        if self.lr is not None:
            return self.lr
        return LR_FROM_SCRATCH if self.from_scratch else LR_FINE_TUNE

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def is_preset(name: str) -> bool:
    """A preset name that is not also a local folder."""
    return name in PRESETS and not Path(name).is_dir()


def check_model_name(name: str, option: str) -> None:
    if is_preset(name):
        return
    folder = Path(name)
    if not folder.is_dir():
        raise ValueError(f"{option}: {name!r} is neither a preset ({', '.join(sorted(PRESETS))}) nor a folder")
    if not (folder / "config.json").is_file():
        raise ValueError(f"{option}: folder {name!r} has no config.json (expected a Hugging Face checkpoint folder)")


def check_options(cfg: TrainConfig) -> None:
    """Every check that needs no data or model; raises ``ValueError`` naming the option."""
    if cfg.selection not in SELECTIONS:
        raise ValueError(f"--selection must be one of {', '.join(SELECTIONS)}, got {cfg.selection!r}")
    if cfg.precision not in PRECISIONS:
        raise ValueError(f"--precision must be one of {', '.join(PRECISIONS)}, got {cfg.precision!r}")
    if not 0.0 < cfg.keep <= 1.0:
        raise ValueError(f"--keep must be in (0, 1], got {cfg.keep}")
    for name in ("steps", "batch_size", "grad_accum"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(cfg, name)}")
    if cfg.seq_len < 2:
        raise ValueError(f"--seq-len must be >= 2 (a position predicts the next token), got {cfg.seq_len}")
    for name in ("warmup", "eval_every", "save_every", "reference_steps"):
        if getattr(cfg, name) < 0:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(cfg, name)}")
    if cfg.lr is not None and not cfg.lr > 0:
        raise ValueError(f"--lr must be > 0, got {cfg.lr}")
    # Top-k keeps round(keep * n) of a micro-batch's n = B * (T - 1) predicted positions.
    n = cfg.batch_size * (cfg.seq_len - 1)
    if round(cfg.keep * n) < 1:
        raise ValueError(
            f"--keep {cfg.keep} keeps no token of a micro-batch of {n} predicted positions "
            f"(--batch-size {cfg.batch_size} x (--seq-len {cfg.seq_len} - 1)); use --keep >= {0.5 / n:.2g}"
        )
    check_device(cfg.device)
    check_model_name(cfg.model, "--model")
    if cfg.reference not in (None, "none"):
        check_model_name(cfg.reference, "--reference")
    if cfg.selection == "excess" and cfg.reference == "none":
        raise ValueError("--selection excess scores tokens against a reference model: give --reference, "
                         "or use --selection loss or random with --reference none")
    if cfg.selection != "excess" and cfg.reference not in (None, "none"):
        raise ValueError(f"--reference is only used by --selection excess, not {cfg.selection!r}: drop it")
    if cfg.reference_data and cfg.selection != "excess":
        raise ValueError("--reference-data trains the reference model of --selection excess; drop it")
    if cfg.fsdp and not distributed.launched():
        raise ValueError(distributed.FSDP_NEEDS_TORCHRUN)
    if cfg.vocab_size is not None and not cfg.from_scratch:
        raise ValueError("--vocab-size sizes the tokenizer of a preset trained from scratch; "
                         f"{cfg.model!r} is a checkpoint folder with its own tokenizer")


def check_device(device: str | None) -> None:
    if device is None:
        return
    if device not in ("cpu", "cuda"):
        raise ValueError(f"--device must be cpu or cuda, got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        built = "a CPU-only build" if torch.version.cuda is None else f"built for CUDA {torch.version.cuda}"
        raise ValueError(f"--device cuda: no CUDA GPU is available here (torch {torch.__version__}, {built}); "
                         "use --device cpu")


def check_out(out: Path, resume: bool) -> None:
    """``out`` can be written, and holds no earlier run unless resuming."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {str(out)!r} exists and is not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise ValueError(f"--out {str(out)!r} is not writable: {e.strerror or e}") from None
    if not resume:
        held = [n for n in ("metrics.jsonl", "checkpoints", "final", "reference") if (out / n).exists()]
        if held:
            raise ValueError(f"--out {str(out)!r} already holds a run ({', '.join(held)}); "
                             "pass --resume to continue it, or choose another --out")
