"""Tokenizers for training: a checkpoint folder's own, or a byte-level BPE trained on the data.

:class:`TextTokenizer` is the small interface the data pipeline needs (encode documents, the
end-of-sequence id, the vocabulary size, save into a Hugging Face folder). A folder's
tokenizer is read through ``transformers.AutoTokenizer`` when ``transformers`` is installed
(it understands every format a checkpoint may carry), else from its ``tokenizer.json`` with
the ``tokenizers`` library. :func:`train_bpe` trains a byte-level BPE with ``tokenizers`` and
saves it so that ``AutoTokenizer`` loads it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

EOS_TOKEN = "<|endoftext|>"
# Files that hold a tokenizer in a Hugging Face folder.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")


class TextTokenizer:
    """Encode text into ids for training; save the tokenizer into a model folder.

    Wraps either a ``transformers`` tokenizer (``hf``) or a ``tokenizers.Tokenizer``
    (``raw``) with its end-of-sequence token.
    """

    def __init__(self, *, hf=None, raw=None, eos_token: str | None = None, source: str = ""):
        if (hf is None) == (raw is None):
            raise ValueError("give exactly one of hf= and raw=")
        self.hf, self.raw, self.source = hf, raw, source
        if hf is not None:
            eos_id = hf.eos_token_id
            bos_id = hf.bos_token_id
            self.vocab_size = len(hf)
        else:
            eos_id = raw.token_to_id(eos_token) if eos_token else None
            bos_id = None
            self.vocab_size = raw.get_vocab_size(with_added_tokens=True)
        if eos_id is None:
            raise ValueError(
                f"the tokenizer of {source!r} has no end-of-sequence token; documents are joined with it"
            )
        self.eos_id, self.bos_id = int(eos_id), bos_id

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of each text, without special tokens."""
        if self.hf is not None:
            return self.hf(list(texts), add_special_tokens=False, verbose=False)["input_ids"]
        return [e.ids for e in self.raw.encode_batch(list(texts), add_special_tokens=False)]

    def encode_with_offsets(self, texts: Sequence[str]) -> tuple[list[list[int]], list[list[tuple[int, int]]]]:
        """Token ids of each text and each token's character span ``(start, end)``."""
        if self.hf is not None:
            enc = self.hf(list(texts), add_special_tokens=False, verbose=False, return_offsets_mapping=True)
            return enc["input_ids"], enc["offset_mapping"]
        encs = self.raw.encode_batch(list(texts), add_special_tokens=False)
        return [e.ids for e in encs], [e.offsets for e in encs]

    def vocab(self) -> dict[str, int]:
        """Token string → id, special tokens included."""
        if self.hf is not None:
            return dict(self.hf.get_vocab())
        return dict(self.raw.get_vocab(with_added_tokens=True))

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids``."""
        if self.hf is not None:
            return self.hf.decode(list(ids))
        return self.raw.decode(list(ids), skip_special_tokens=False)

    def save(self, folder: str | os.PathLike) -> None:
        """Write the tokenizer files into ``folder`` (loadable by ``AutoTokenizer``)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        if self.hf is not None:
            self.hf.save_pretrained(folder)
            return
        self.raw.save(str(folder / "tokenizer.json"))
        eos = self.raw.id_to_token(self.eos_id)
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "eos_token": eos,
            "bos_token": eos,
            "unk_token": None,
            "pad_token": eos,
            "clean_up_tokenization_spaces": False,
            "model_max_length": 1_000_000_000,
        }
        (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        special = {"eos_token": eos, "bos_token": eos, "pad_token": eos}
        (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n", encoding="utf-8")


def has_tokenizer(folder: str | os.PathLike) -> bool:
    """Whether ``folder`` holds tokenizer files."""
    return any((Path(folder) / name).is_file() for name in TOKENIZER_FILES)


def load_tokenizer(folder: str | os.PathLike) -> TextTokenizer:
    """The tokenizer saved in model folder ``folder``.

    Raises:
        FileNotFoundError: the folder holds no tokenizer files.
        ValueError: the tokenizer has no end-of-sequence token.
    """
    folder = Path(folder)
    if not has_tokenizer(folder):
        raise FileNotFoundError(
            f"{str(folder)!r} has no tokenizer (none of {', '.join(TOKENIZER_FILES)}); "
            "copy the tokenizer files of the checkpoint into the folder"
        )
    try:
        from transformers import AutoTokenizer
    except ImportError:
        AutoTokenizer = None
    if AutoTokenizer is not None:
        return TextTokenizer(hf=AutoTokenizer.from_pretrained(str(folder)), source=str(folder))
    if not (folder / "tokenizer.json").is_file():
        raise FileNotFoundError(
            f"{str(folder)!r} has no tokenizer.json; install transformers (collider-models[hf]) to read its tokenizer"
        )
    from tokenizers import Tokenizer

    raw = Tokenizer.from_file(str(folder / "tokenizer.json"))
    config_file = folder / "tokenizer_config.json"
    eos = json.loads(config_file.read_text(encoding="utf-8")).get("eos_token") if config_file.is_file() else None
    if isinstance(eos, dict):  # {"content": "</s>", ...}
        eos = eos.get("content")
    return TextTokenizer(raw=raw, eos_token=eos, source=str(folder))


def train_bpe(texts: Iterable[str], vocab_size: int) -> TextTokenizer:
    """A byte-level BPE tokenizer (GPT-2 style) with ``vocab_size`` tokens trained on ``texts``.

    The vocabulary holds the 256 byte symbols, the end-of-sequence token ``<|endoftext|>``
    (id 0) and learned merges; on little text it can end up smaller than ``vocab_size``.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    minimum = 256 + 1 + 1
    if vocab_size < minimum:
        raise ValueError(f"a byte-level BPE needs a vocabulary of at least {minimum} tokens, got {vocab_size}")
    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    raw.train_from_iterator(texts, trainer)
    return TextTokenizer(raw=raw, eos_token=EOS_TOKEN, source=f"byte-level BPE ({vocab_size} tokens)")
