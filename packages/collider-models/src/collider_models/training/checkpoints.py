"""Checkpoints that never lose a run, and the final model folder.

A checkpoint ``checkpoints/step-N/`` holds everything needed to continue exactly:

* ``config.json`` + ``model.safetensors``: the parameters, as a Hugging Face folder;
* ``optimizer.pt``: the optimizer state, unsharded and keyed by parameter name;
* ``state.pt``: the learning-rate scheduler and the random-number generator states;
* ``trainer_state.json``: the step, the data position (sequences consumed by all
  processes), the world size and the settings a resumed run must share.

Each is written through :func:`collider_models.atomic.atomic_dir`: the folder is filled under a
temporary name and renamed into place only once complete, so an interrupted save leaves no
``step-N`` folder and the previous checkpoints stay loadable. Only rank 0 writes; every
process takes part in gathering the unsharded states.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from collider_models.atomic import atomic_dir
from collider_models.checkpoint import save_pretrained
from collider_models.registry import from_config
from collider_models.training import distributed
from collider_models.training.tokenizer import TextTokenizer

STATE_FILE = "trainer_state.json"
KEEP_LAST = 2  # complete checkpoints kept; older ones are deleted once a newer one is in place
_STEP_RE = re.compile(r"^step-(\d+)$")


def _shell(config, state: dict[str, torch.Tensor]) -> nn.Module:
    """A Collider model whose parameters are the tensors of ``state`` (no copy, no init)."""
    with torch.device("meta"):
        model = from_config(config.to_hf_dict())
    model.load_state_dict(state, strict=True, assign=True)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    return model


def write_model(folder: Path, config, state: dict[str, torch.Tensor], tokenizer: TextTokenizer | None) -> None:
    """Write a Hugging Face folder (config, safetensors, tokenizer) from unsharded ``state``."""
    save_pretrained(_shell(config, state), folder)
    if tokenizer is not None:
        tokenizer.save(folder)


def save_final(path: Path, model: nn.Module, tokenizer: TextTokenizer, d: distributed.Dist) -> None:
    """Write ``path`` (e.g. ``OUT/final``) atomically: the trained model as a Hugging Face
    folder with its tokenizer."""
    state = distributed.full_model_state(model, d)
    if d.main:
        with atomic_dir(path) as tmp:
            write_model(tmp, distributed.unwrap(model).config, state, tokenizer)
    distributed.barrier(d)


def save_checkpoint(
    root: Path, step: int, model: nn.Module, opt, scheduler, trainer_state: dict, d: distributed.Dist
) -> Path:
    """Write ``root/step-N`` atomically and delete checkpoints older than the last
    :data:`KEEP_LAST`; returns the folder."""
    model_state = distributed.full_model_state(model, d)
    optim_state = distributed.full_optimizer_state(model, opt, d)
    folder = root / f"step-{step}"
    if d.main:
        rng = {"cpu": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        with atomic_dir(folder) as tmp:
            write_model(tmp, distributed.unwrap(model).config, model_state, None)
            torch.save(optim_state, tmp / "optimizer.pt")
            torch.save({"scheduler": scheduler.state_dict(), "rng": rng}, tmp / "state.pt")
            (tmp / STATE_FILE).write_text(json.dumps({**trainer_state, "step": step}, indent=2) + "\n")
        for old in list_checkpoints(root)[:-KEEP_LAST]:
            shutil.rmtree(old, ignore_errors=True)
    distributed.barrier(d)
    return folder


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoint folders under ``root``, oldest first (temporary folders of
    unfinished saves are skipped)."""
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _STEP_RE.match(p.name)
        if m and p.is_dir() and (p / STATE_FILE).is_file():
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def latest_checkpoint(root: Path) -> Path | None:
    """The newest complete checkpoint under ``root``, or ``None``."""
    found = list_checkpoints(root)
    return found[-1] if found else None


def read_trainer_state(folder: Path) -> dict:
    return json.loads((folder / STATE_FILE).read_text(encoding="utf-8"))


def load_checkpoint(folder: Path, model: nn.Module, opt, scheduler) -> dict:
    """Restore model, optimizer, scheduler and RNG states from ``folder`` (every process
    reads it whole and keeps its shard); returns its trainer state."""
    state = load_file(str(folder / "model.safetensors"))
    config = distributed.unwrap(model).config
    if config.tie_word_embeddings and "lm_head.weight" not in state:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    optim_state = torch.load(folder / "optimizer.pt", weights_only=True)
    distributed.load_full_state(model, opt, state, optim_state)
    extra = torch.load(folder / "state.pt", weights_only=True)
    scheduler.load_state_dict(extra["scheduler"])
    torch.set_rng_state(extra["rng"]["cpu"])
    if "cuda" in extra["rng"] and torch.cuda.is_available():
        cuda = extra["rng"]["cuda"]
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
    return read_trainer_state(folder)
