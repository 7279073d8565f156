"""A callback for training a Collider model with a plain ``transformers.Trainer``.

The ``Trainer`` saves a model that is not a ``transformers.PreTrainedModel`` as a bare state
dict (``model.safetensors`` without ``config.json``), which neither ``transformers`` nor
:func:`collider_models.from_pretrained` can load. :class:`SaveCheckpointCallback` rewrites each
checkpoint's model files with :func:`collider_models.save_pretrained` (config and weights,
atomically; the ``Trainer``'s optimizer and state files stay). :class:`ColliderTrainer` saves
that way by itself.
"""

from __future__ import annotations

from pathlib import Path

from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from collider_models.checkpoint import save_pretrained


class SaveCheckpointCallback(TrainerCallback):
    """After every checkpoint the ``Trainer`` writes, write the Collider model in it as a Hugging
    Face folder (``config.json`` + safetensors). Rank 0 only."""

    def on_save(self, args, state, control, model=None, **kwargs):
        if not state.is_world_process_zero or model is None:
            return control
        while hasattr(model, "module"):  # DDP and similar wrappers
            model = model.module
        folder = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
        if folder.is_dir():
            save_pretrained(model, folder)
        return control
