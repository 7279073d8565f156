"""Hugging Face checkpoint I/O: ``config.json`` + ``*.safetensors`` folders.

:func:`from_pretrained` reads a local checkpoint folder (one file or shards with
``model.safetensors.index.json``; old and new config formats; tied embeddings) straight
into the target dtype and device: the model is built on the meta device and its
parameters are the tensors read from memory-mapped safetensors files, so no random
initialisation is ever materialised. :func:`save_pretrained` writes a folder that
``transformers`` loads, atomically (the old checkpoint stays whole until the new one is).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from collider_models.atomic import atomic_dir
from collider_models.config import _DTYPES, dtype_of
from collider_models.registry import ARCHITECTURES, from_config

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"

# Non-parameter buffers that some older checkpoints store; the blocks recompute them.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
# safetensors dtype tags → torch dtypes (floating point only; others cannot be loaded).
_SAFETENSORS_FLOATS = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
_ARCH_CLASSES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
                 "phi": "PhiForCausalLM"}


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


def _read_json(file: Path) -> object:
    try:
        with open(file, encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{file} is not valid JSON: {e}") from e


def read_config(path: str | os.PathLike) -> dict:
    """The Hugging Face config dict of checkpoint folder ``path``.

    Raises:
        FileNotFoundError: ``path`` is not a folder or holds no ``config.json``.
        ValueError: the config is not a JSON object (:class:`CheckpointError`) or names no
            registered ``model_type``; the message names the file.
    """
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"checkpoint folder {str(folder)!r} does not exist")
    cfg_file = folder / CONFIG_NAME
    if not cfg_file.is_file():
        raise FileNotFoundError(f"checkpoint folder {str(folder)!r} has no {CONFIG_NAME}")
    cfg = _read_json(cfg_file)
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{cfg_file} must hold a JSON object")
    if cfg.get("model_type") not in ARCHITECTURES:
        raise ValueError(
            f"unknown model_type {cfg.get('model_type')!r} in {cfg_file}; supported: {sorted(ARCHITECTURES)}"
        )
    return cfg


def _inside(folder: Path, file: Path, what: str) -> Path:
    """``file`` if it resolves inside ``folder`` (or, for the Hugging Face hub cache, into the
    ``blobs`` folder its snapshots link to); else a :class:`CheckpointError` naming ``what``."""
    root, target = folder.resolve(), file.resolve()
    blobs = root.parent.parent / "blobs" if root.parent.name == "snapshots" else None
    if target.is_relative_to(root) or (blobs is not None and target.is_relative_to(blobs)):
        return file
    raise CheckpointError(f"{what} points outside the checkpoint folder {str(folder)!r} (to {str(target)!r})")


def _weight_files(folder: Path) -> dict[str, Path]:
    """tensor name → file holding it, from the index if there is one, else every shard."""
    index_file = folder / INDEX_NAME
    if index_file.is_file():
        index = _read_json(index_file)
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index_file} has no 'weight_map' object")
        where = {}
        for name, fname in weight_map.items():
            if not isinstance(fname, str) or not fname or Path(fname).name != fname or fname in (".", ".."):
                raise CheckpointError(
                    f"{index_file} maps {name!r} to {fname!r}; entries must be file names in the checkpoint folder"
                )
            where[name] = folder / fname
        for file in sorted(set(where.values())):
            if not file.is_file():
                raise FileNotFoundError(f"{index_file} names {file.name}, which is not in the folder")
            _inside(folder, file, f"{index_file} entry {file.name!r}")
        return where
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"checkpoint folder {str(folder)!r} has no *.safetensors weights")
    where: dict[str, Path] = {}
    for file in files:
        _inside(folder, file, f"weight file {file.name!r}")
        with _open_safetensors(file) as f:
            for name in f.keys():
                if name in where:
                    raise CheckpointError(f"tensor {name!r} is stored twice: in {where[name].name} and {file.name}")
                where[name] = file
    return where


def _open_safetensors(file: Path, device: str = "cpu"):
    try:
        return safe_open(file, framework="pt", device=device)
    except Exception as e:  # safetensors raises its own error types for corrupt headers
        raise CheckpointError(f"{file} is not a readable safetensors file: {e}") from e


def _stored_meta(where: dict[str, Path]) -> dict[str, tuple[tuple[int, ...], str]]:
    """tensor name → (shape, safetensors dtype tag), read from the file headers only."""
    by_file: dict[Path, list[str]] = {}
    for name, file in where.items():
        by_file.setdefault(file, []).append(name)
    meta = {}
    for file, names in by_file.items():
        with _open_safetensors(file) as f:
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
        try:
            model = from_config(cfg)
        except ValueError as e:
            raise type(e)(f"{folder / CONFIG_NAME}: {e}") from e
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
        with _open_safetensors(file, safe_device) as f:
            for name in names:
                try:
                    tensor = f.get_tensor(name)
                except Exception as e:  # a truncated or corrupt file
                    raise CheckpointError(f"cannot read tensor {name!r} from {file}: {e}") from e
                state[name] = tensor.to(target)  # no copy when already in `target`
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


_STALE_RE = re.compile(r"^(model|pytorch_model)(-\d{5}-of-\d{5})?\.(safetensors|bin)(\.index\.json)?$")
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B)?\s*$", re.IGNORECASE)
_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def _shard_bytes(max_shard_size) -> int | None:
    """``max_shard_size`` (bytes, or a string such as "5GB" / "100KB") → bytes; None: one file."""
    if max_shard_size is None:
        return None
    if isinstance(max_shard_size, int) and not isinstance(max_shard_size, bool):
        size = max_shard_size
    else:
        m = _SIZE_RE.match(str(max_shard_size))
        if not m:
            raise ValueError(f"max_shard_size must be a number of bytes or a size like '5GB', got {max_shard_size!r}")
        size = int(float(m.group(1)) * _UNITS[(m.group(2) or "B").upper()])
    if size <= 0:
        raise ValueError(f"max_shard_size must be positive, got {max_shard_size!r}")
    return size


def _shards(tensors: dict[str, torch.Tensor], limit: int | None) -> list[dict[str, torch.Tensor]]:
    """Split tensors in order into groups of at most ``limit`` bytes (a larger tensor alone)."""
    groups: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        n = t.numel() * t.element_size()
        if limit is not None and groups[-1] and size + n > limit:
            groups.append({})
            size = 0
        groups[-1][name] = t
        size += n
    return groups


def _carry_over(old: Path, new: Path) -> None:
    """Hard-link (else copy) every file of the old checkpoint folder that is not weights or
    config into the new one: tokenizer files, generation config, training state stay."""
    for entry in old.iterdir():
        if entry.name == CONFIG_NAME or _STALE_RE.match(entry.name):
            continue
        target = new / entry.name
        if entry.is_dir() and not entry.is_symlink():
            shutil.copytree(entry, target, symlinks=True, copy_function=_link_or_copy)
        else:
            _link_or_copy(entry, target)


def _link_or_copy(src, dst) -> None:
    if os.path.islink(src):
        os.symlink(os.readlink(src), dst)
        return
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def save_pretrained(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    state_dict: dict[str, torch.Tensor] | None = None,
    max_shard_size: int | str | None = None,
    safe_serialization: bool = True,
    is_main_process: bool = True,
) -> None:
    """Write ``model`` as a Hugging Face checkpoint folder that ``transformers`` loads.

    Writes ``config.json`` (the model's Hugging Face config dict with ``dtype`` set to the
    parameters' dtype) and the weights: one ``model.safetensors``, or with ``max_shard_size``
    shards ``model-0000i-of-0000n.safetensors`` and ``model.safetensors.index.json``. A tied
    LM head is stored once, as ``model.embed_tokens.weight``, as ``transformers`` does.

    The write is atomic: everything goes to a temporary folder next to ``path``, which takes
    its name only once complete, so ``path`` always holds either the complete old checkpoint
    (sharded or not) or the complete new one, config and weights together. Other files of an
    existing ``path`` (tokenizer, generation config, ...) are kept; its old weight files are
    replaced.

    Args:
        model: a Collider causal LM (its ``config`` is a :class:`ModelConfig`).
        path: destination folder, created if needed.
        state_dict: tensors to save instead of ``model.state_dict()`` (same names), as
            ``transformers``' ``Trainer`` passes them.
        max_shard_size: largest shard, in bytes or as a string like ``"5GB"``; default one file.
        safe_serialization: must be True (only safetensors are written).
        is_main_process: False writes nothing (the other ranks of a distributed run).
    """
    cfg = getattr(model, "config", None)
    if cfg is None or not hasattr(cfg, "to_hf_dict"):
        raise TypeError(f"model must be a Collider CausalLM with a ModelConfig, got {type(model).__name__}")
    if not safe_serialization:
        raise ValueError("only safetensors checkpoints are written (safe_serialization=True)")
    limit = _shard_bytes(max_shard_size)
    if not is_main_process:
        return
    params = dict(model.named_parameters())  # tied parameters appear once
    source = model.state_dict() if state_dict is None else state_dict
    missing, extra = sorted(set(params) - set(source)), sorted(set(source) - set(model.state_dict()))
    if missing or extra:
        raise ValueError(f"state_dict does not match the model: missing {missing[:8]}, unexpected {extra[:8]}")
    tensors = {name: source[name].detach().contiguous().cpu() for name in source if name in params}
    dtypes = {t.dtype for t in tensors.values()}
    if len(dtypes) != 1:
        raise ValueError(f"all parameters must share one dtype to be saved, got {sorted(map(str, dtypes))}")
    hf = cfg.to_hf_dict()
    hf.pop("torch_dtype", None)
    hf["dtype"] = _dtype_name(dtypes.pop())
    hf["tie_word_embeddings"] = bool(cfg.tie_word_embeddings)
    if not hf.get("architectures") and cfg.model_type in _ARCH_CLASSES:
        hf["architectures"] = [_ARCH_CLASSES[cfg.model_type]]

    folder = Path(path)
    with atomic_dir(folder) as tmp:
        if folder.is_dir():
            _carry_over(folder, tmp)
        groups = _shards(tensors, limit)
        if len(groups) == 1:
            save_file(groups[0], str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        else:
            weight_map, total = {}, 0
            for i, group in enumerate(groups):
                fname = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
                save_file(group, str(tmp / fname), metadata={"format": "pt"})
                weight_map.update({name: fname for name in group})
                total += sum(t.numel() * t.element_size() for t in group.values())
            _write_json(tmp / INDEX_NAME, {"metadata": {"total_size": total}, "weight_map": weight_map})
        _write_json(tmp / CONFIG_NAME, hf)


def _write_json(file: Path, obj) -> None:
    with open(file, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")
