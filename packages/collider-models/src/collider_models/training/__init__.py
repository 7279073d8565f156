"""Token-filtered training of a preset or a Hugging Face checkpoint folder on text files:
the engine of ``collider-train``.

One idea per module: :mod:`.config` (settings and their checks), :mod:`.corpus` (the embedded
default corpus), :mod:`.documents` (reading ``.txt``/``.jsonl``), :mod:`.tokenizer`,
:mod:`.packing` (sequences, held-out split, data order), :mod:`.step` (one optimizer step
over micro-batches and processes), :mod:`.loop` (a training stage), :mod:`.checkpoints`,
:mod:`.distributed` (DDP/FSDP2 under ``torchrun``), :mod:`.interrupt` (Ctrl-C),
:mod:`.metrics` and :mod:`.run` (a whole run).
"""

from collider_models.training.config import TrainConfig
from collider_models.training.run import run

__all__ = ["TrainConfig", "run"]
