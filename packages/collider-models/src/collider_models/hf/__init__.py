"""The ``transformers`` integration: :func:`from_hf`, :class:`ColliderTrainer` and, for a plain
``Trainer`` training a Collider model, :class:`SaveCheckpointCallback`.

Needs ``transformers`` (``pip install collider-models[hf]``). Importing this package does not
import ``transformers``; :class:`ColliderTrainer` and :class:`SaveCheckpointCallback` are loaded
on first use.
"""

from collider_models.hf.convert import from_hf


def __getattr__(name: str):
    if name == "ColliderTrainer":
        from collider_models.hf.trainer import ColliderTrainer

        return ColliderTrainer
    if name == "SaveCheckpointCallback":
        from collider_models.hf.callbacks import SaveCheckpointCallback

        return SaveCheckpointCallback
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["ColliderTrainer", "SaveCheckpointCallback", "from_hf"]
