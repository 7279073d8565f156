"""The ``transformers`` integration: :func:`from_hf` and :class:`ColliderTrainer`.

Needs ``transformers`` (``pip install collider-models[hf]``). Importing this package does not
import ``transformers``; :class:`ColliderTrainer` is loaded on first use.
"""

from collider_models.hf.convert import from_hf


def __getattr__(name: str):
    if name == "ColliderTrainer":
        from collider_models.hf.trainer import ColliderTrainer

        return ColliderTrainer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["ColliderTrainer", "from_hf"]
