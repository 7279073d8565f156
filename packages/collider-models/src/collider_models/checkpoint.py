"""Hugging Face checkpoint I/O: ``config.json`` + ``*.safetensors`` folders.

:func:`from_pretrained` reads a local checkpoint folder (one file or shards with
``model.safetensors.index.json``; old and new config formats; tied embeddings) straight
into the target dtype and device: the model is built on the meta device and its
parameters are the tensors read from memory-mapped safetensors files, so no random
initialisation is ever materialised. :func:`save_pretrained` writes a folder that
``transformers`` loads.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from collider_models.config import _DTYPES, dtype_of
from collider_models.registry import ARCHITECTURES, from_config

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"

# Non-parameter buffers that some older checkpoints store; the blocks recompute them.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
# safetensors dtype tags → torch dtypes (floating point only; others cannot be loaded).
_SAFETENSORS_FLOATS = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
_ARCH_CLASSES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "phi": "PhiForCausalLM"}
_SHARD_RE = re.compile(r"^model-\d{5}-of-\d{5}\.safetensors$")


class CheckpointError(ValueError):
    """A checkpoint folder that cannot be read into the model its config describes."""


def _resolve_dtype(dtype) -> torch.dtype | None:
    if dtype is None or dtype == "auto":
        return None
    if isinstance(dtype, str):
        name = dtype.replace("torch.", "")
        if name not in _DTYPES:
            raise ValueError(f"cannot load a model in dtype {dtype!r}; supported: {sorted(_DTYPES)}")
        return _DTYPES[name]
    if not isinstance(dtype, torch.dtype) or dtype not in _DTYPES.values():
        raise ValueError(f"cannot load a model in dtype {dtype!r}; supported: {sorted(_DTYPES)}")
    return dtype


def _resolve_device(device) -> torch.device:
    device = torch.device("cpu" if device is None else device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if device.type == "meta":
        raise ValueError("cannot load a checkpoint onto the meta device")
    return device


def read_config(path: str | os.PathLike) -> dict:
    """The Hugging Face config dict of checkpoint folder ``path``.

    Raises:
        FileNotFoundError: ``path`` is not a folder or holds no ``config.json``.
        ValueError: the config names no registered ``model_type``.
    """
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"checkpoint folder {str(folder)!r} does not exist")
    cfg_file = folder / CONFIG_NAME
    if not cfg_file.is_file():
        raise FileNotFoundError(f"checkpoint folder {str(folder)!r} has no {CONFIG_NAME}")
    with open(cfg_file, encoding="utf-8") as f:
        cfg = json.load(f)
    if not isinstance(cfg, dict):
        raise ValueError(f"{cfg_file} must hold a JSON object")
    if cfg.get("model_type") not in ARCHITECTURES:
        raise ValueError(
            f"unknown model_type {cfg.get('model_type')!r} in {cfg_file}; supported: {sorted(ARCHITECTURES)}"
        )
    return cfg


def _weight_files(folder: Path) -> dict[str, Path]:
    """tensor name → file holding it, from the index if there is one, else every shard."""
    index_file = folder / INDEX_NAME
    if index_file.is_file():
        with open(index_file, encoding="utf-8") as f:
            weight_map = json.load(f).get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index_file} has no 'weight_map' object")
        where = {name: folder / fname for name, fname in weight_map.items()}
        for file in sorted(set(where.values())):
            if not file.is_file():
                raise FileNotFoundError(f"{index_file} names {file.name}, which is not in the folder")
        return where
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"checkpoint folder {str(folder)!r} has no *.safetensors weights")
    where: dict[str, Path] = {}
    for file in files:
        with safe_open(file, framework="pt") as f:
            for name in f.keys():
                if name in where:
                    raise CheckpointError(f"tensor {name!r} is stored twice: in {where[name].name} and {file.name}")
                where[name] = file
    return where


def _stored_meta(where: dict[str, Path]) -> dict[str, tuple[tuple[int, ...], str]]:
    """tensor name → (shape, safetensors dtype tag), read from the file headers only."""
    by_file: dict[Path, list[str]] = {}
    for name, file in where.items():
        by_file.setdefault(file, []).append(name)
    meta = {}
    for file, names in by_file.items():
        with safe_open(file, framework="pt") as f:
            present = set(f.keys())
            for name in names:
                if name not in present:
                    raise CheckpointError(f"tensor {name!r} is listed in the index but missing from {file.name}")
                sl = f.get_slice(name)
                meta[name] = (tuple(sl.get_shape()), sl.get_dtype())
    return meta


def from_pretrained(path: str | os.PathLike, dtype: torch.dtype | str | None = None, device=None) -> nn.Module:
    """Load a Hugging Face checkpoint folder into a Collider model.

    Args:
        path: folder with ``config.json`` and ``model.safetensors`` (or shards, with or
            without ``model.safetensors.index.json``).
        dtype: parameter dtype (float32, float16, bfloat16, float64, or their names).
            Default: the config's ``dtype``/``torch_dtype``, else the stored tensors' dtype.
        device: where the parameters live (default CPU). Tensors are read memory-mapped
            and placed there directly.

    Returns:
        The model (a :class:`~collider_models.blocks.CausalLM`) in train mode. With tied
        embeddings, ``lm_head.weight`` is the embedding parameter itself; a stored copy of
        it, if any, is ignored.

    Raises:
        FileNotFoundError: no folder, no ``config.json`` or no weights.
        ValueError: unknown ``model_type``, a dtype that cannot be honoured, or (as
            :class:`CheckpointError`) a missing, mis-shaped, unexpected or non-float tensor.
    """
    folder = Path(path)
    cfg = read_config(folder)
    target = _resolve_dtype(dtype)
    dev = _resolve_device(device)
    with torch.device("meta"):
        model = from_config(cfg)
    expected = {name: tuple(t.shape) for name, t in model.state_dict(keep_vars=True).items()}
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    where = _weight_files(folder)
    meta = _stored_meta(where)

    unexpected = sorted(n for n in meta if n not in expected and not n.endswith(_IGNORED_SUFFIXES))
    if unexpected:
        shown = ", ".join(unexpected[:8]) + (f" and {len(unexpected) - 8} more" if len(unexpected) > 8 else "")
        raise CheckpointError(f"checkpoint {str(folder)!r} has unexpected tensors: {shown}")
    optional = {"lm_head.weight"} if tied else set()
    missing = sorted(n for n in expected if n not in meta and n not in optional)
    if missing:
        shown = ", ".join(missing[:8]) + (f" and {len(missing) - 8} more" if len(missing) > 8 else "")
        raise CheckpointError(f"checkpoint {str(folder)!r} is missing tensors: {shown}")
    for name, shape in expected.items():
        if name in meta:
            stored, tag = meta[name]
            if stored != shape:
                raise CheckpointError(
                    f"tensor {name!r} has shape {list(stored)} in the checkpoint, the model expects {list(shape)}"
                )
            if tag not in _SAFETENSORS_FLOATS:
                raise CheckpointError(f"tensor {name!r} is stored as {tag}; only float tensors can be loaded")

    if target is None:
        target = dtype_of(cfg)
    if target is None:
        first = next(n for n in expected if n in meta)
        target = _SAFETENSORS_FLOATS[meta[first][1]]

    state: dict[str, torch.Tensor] = {}
    by_file: dict[Path, list[str]] = {}
    for name in expected:
        if name in meta and not (tied and name == "lm_head.weight"):
            by_file.setdefault(where[name], []).append(name)
    safe_device = str(dev) if dev.type != "cpu" else "cpu"
    for file, names in by_file.items():
        with safe_open(file, framework="pt", device=safe_device) as f:
            for name in names:
                state[name] = f.get_tensor(name).to(target)  # no copy when already in `target`
    if tied:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    model.load_state_dict(state, strict=True, assign=True)
    if tied:
        model.lm_head.weight = model.model.embed_tokens.weight
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if left:
        raise CheckpointError(f"tensors left uninitialised after loading: {', '.join(left)}")
    model.config.dtype = target
    return model


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def save_pretrained(model: nn.Module, path: str | os.PathLike) -> None:
    """Write ``model`` as a Hugging Face checkpoint folder that ``transformers`` loads.

    Writes ``config.json`` (the model's Hugging Face config dict with ``dtype`` set to
    the parameters' dtype) and one ``model.safetensors``. A tied LM head is stored once,
    as ``model.embed_tokens.weight``, as ``transformers`` does. Earlier weight files of
    the folder (``model.safetensors``, ``model-*-of-*.safetensors`` and the index) are
    replaced.

    Args:
        model: a Collider causal LM (its ``config`` is a :class:`ModelConfig`).
        path: destination folder, created if needed.
    """
    cfg = getattr(model, "config", None)
    if cfg is None or not hasattr(cfg, "to_hf_dict"):
        raise TypeError(f"model must be a Collider CausalLM with a ModelConfig, got {type(model).__name__}")
    params = dict(model.named_parameters())  # tied parameters appear once
    dtypes = {p.dtype for p in params.values()}
    if len(dtypes) != 1:
        raise ValueError(f"all parameters must share one dtype to be saved, got {sorted(map(str, dtypes))}")
    tensors = {}
    for name, t in model.state_dict().items():
        if name not in params:  # the second name of a tied parameter
            continue
        tensors[name] = t.detach().contiguous().cpu()
    hf = cfg.to_hf_dict()
    hf.pop("torch_dtype", None)
    hf["dtype"] = _dtype_name(dtypes.pop())
    hf["tie_word_embeddings"] = bool(cfg.tie_word_embeddings)
    if not hf.get("architectures") and cfg.model_type in _ARCH_CLASSES:
        hf["architectures"] = [_ARCH_CLASSES[cfg.model_type]]

    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise FileExistsError(f"{str(folder)!r} exists and is not a folder")
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.iterdir():
        if old.name == INDEX_NAME or _SHARD_RE.match(old.name):
            old.unlink()
    save_file(tensors, str(folder / WEIGHTS_NAME), metadata={"format": "pt"})
    with open(folder / CONFIG_NAME, "w", encoding="utf-8") as f:
        json.dump(hf, f, indent=2, sort_keys=True)
        f.write("\n")
