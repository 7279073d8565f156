"""The tokenizer trained for a preset, and the default corpus's corruption and split (built
offline from stand-in works; the download itself is exercised end to end)."""

import json
import random

import pytest

from collider_models.training import corpus
from collider_models.training.tokenizer import EOS_TOKEN, load_tokenizer, train_bpe

TEXT = "Now is the winter of our discontent\nMade glorious summer by this sun of York.\n" * 30


def test_bpe_saves_a_folder_transformers_loads(tmp_path):
    transformers = pytest.importorskip("transformers")
    tok = train_bpe([TEXT], 300)
    assert tok.eos_id == 0 and tok.vocab_size <= 300
    tok.save(tmp_path)
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path)
    ids = tok.encode_batch(["Made glorious summer"])[0]
    assert theirs("Made glorious summer", add_special_tokens=False)["input_ids"] == ids
    assert theirs.eos_token == EOS_TOKEN and theirs.eos_token_id == tok.eos_id
    assert theirs.decode(ids) == "Made glorious summer" == tok.decode(ids)
    assert load_tokenizer(tmp_path).encode_batch(["of York"]) == tok.encode_batch(["of York"])


def test_bpe_rejects_a_vocabulary_below_the_byte_alphabet():
    with pytest.raises(ValueError, match="at least 258"):
        train_bpe([TEXT], 128)


def test_folder_without_tokenizer_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="has no tokenizer"):
        load_tokenizer(tmp_path)


def test_corruption_replaces_the_given_share_of_lines_by_same_length_noise():
    lines = [f"line number {i} of the play" for i in range(4000)]
    text, spans, total = corpus.corrupt("\n".join(lines) + "\n\n", 0.2, random.Random(1))
    out = text.split("\n")
    assert total == 4000 and abs(len(spans) / total - 0.2) < 0.02
    changed = [(a, b) for a, b in zip(lines, out, strict=False) if a != b]
    assert len(changed) == len(spans) and all(len(a) == len(b) for a, b in changed)
    assert [text[s:e] for s, e in spans] == [b for _, b in changed]  # the spans are the corrupted lines
    assert all(set(b) <= set("abcdefghijklmnopqrstuvwxyz ") for _, b in changed)
    assert out[-2:] == ["", ""]  # empty lines stay


def test_build_splits_works_into_disjoint_sets(tmp_path):
    works = {f"work{i:02d}": f"Act {i}.\nA line of work {i}.\n" * 50 for i in range(20)}
    info = corpus.build(works, tmp_path)
    names = info["train_works"] + info["reference_works"] + info["eval_works"]
    assert sorted(names) == sorted(works) and len(set(names)) == 20
    assert len(info["eval_works"]) == corpus.EVAL_WORKS and len(info["reference_works"]) == corpus.REFERENCE_WORKS
    ref = [json.loads(line)["text"] for line in (tmp_path / "reference.jsonl").read_text().splitlines()]
    assert ref == [works[n] for n in info["reference_works"]]  # clean
    records = [json.loads(line) for line in (tmp_path / "train.jsonl").read_text().splitlines()]
    assert sum(r["text"] != works[n] for r, n in zip(records, info["train_works"], strict=True)) > 0  # corrupted
    assert sum(len(r["marked"]) for r in records) == info["corrupted_lines"] > 0
    assert info["corrupt_share"] == corpus.CORRUPT_SHARE


def test_cache_location(monkeypatch, tmp_path):
    monkeypatch.setenv("COLLIDER_CACHE", str(tmp_path / "c"))
    assert corpus.cache_root() == tmp_path / "c"
    monkeypatch.delenv("COLLIDER_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert corpus.cache_root() == tmp_path / "x" / "collider"


def test_folder_tokenizer_without_transformers(tmp_path, monkeypatch):
    import sys

    tok = train_bpe([TEXT], 300)
    tok.save(tmp_path)
    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers now fails
    loaded = load_tokenizer(tmp_path)
    assert loaded.hf is None and loaded.eos_id == tok.eos_id and loaded.vocab_size == tok.vocab_size
    assert loaded.encode_batch(["summer by this sun"]) == tok.encode_batch(["summer by this sun"])
