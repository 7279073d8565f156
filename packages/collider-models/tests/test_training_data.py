"""Reading documents, packing them into sequences, the held-out split and the data order."""

import json

import pytest
import torch

from collider_models.training.documents import Document, check_paths, read_all
from collider_models.training.packing import HOLDOUT_EVERY, SequenceOrder, pack, pack_marks, split, token_marks


def test_txt_is_one_document_and_jsonl_one_per_line(tmp_path):
    (tmp_path / "a.txt").write_text("first\n\nsecond paragraph")
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "x"}) + "\n\n" + json.dumps({"text": "yes", "id": 3,
                                                                                     "marked": [[1, 3]]}) + "\n")
    paths = check_paths([tmp_path / "a.txt", tmp_path / "b.jsonl"], "--data")
    assert read_all(paths) == [Document("first\n\nsecond paragraph"), Document("x"), Document("yes", [(1, 3)])]


@pytest.mark.parametrize("content, message", [
    ('{"text": 1}\n', "b.jsonl:1: expected a JSON object with a string \"text\" field"),
    ('{"text": "ok"}\nnot json\n', "b.jsonl:2: not a JSON object"),
    ('["text"]\n', "b.jsonl:1: expected a JSON object"),
    ('{"text": "abc", "marked": [[2, 9]]}\n', "b.jsonl:1: \"marked\" must be a list of"),
    ('{"text": "abc", "marked": [2, 3]}\n', "b.jsonl:1: \"marked\" must be a list of"),
])
def test_bad_jsonl_names_file_and_line(tmp_path, content, message):
    (tmp_path / "b.jsonl").write_text(content)
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        read_all([tmp_path / "b.jsonl"])


def test_paths_are_checked(tmp_path):
    (tmp_path / "x.csv").write_text("a")
    with pytest.raises(ValueError, match="--data: .* must end in .txt or .jsonl"):
        check_paths([tmp_path / "x.csv"], "--data")
    with pytest.raises(ValueError, match="--eval-data: .* is not a file"):
        check_paths([tmp_path / "missing.txt"], "--eval-data")
    with pytest.raises(ValueError, match="at least one"):
        check_paths([], "--data")


def test_pack_joins_documents_with_eos_and_drops_the_remainder():
    seqs = pack([[1, 2, 3], [4], [5, 6]], eos_id=0, seq_len=4)
    # stream: 1 2 3 0 4 0 5 6 0 -> two sequences of 4, one token dropped
    assert seqs.tolist() == [[1, 2, 3, 0], [4, 0, 5, 6]]
    assert seqs.dtype == torch.int64


def test_marks_follow_the_tokens_through_packing():
    # "ab cd ef": tokens "ab", " cd", " ef" at (0, 2), (2, 5), (5, 8); marked span "cd" = [3, 5)
    marks = token_marks([(0, 2), (2, 5), (5, 8)], [(3, 5)], 8)
    assert marks.tolist() == [False, True, False]
    assert token_marks([(0, 2)], [], 2).tolist() == [False]
    ids = pack([[1, 2, 3], [4]], eos_id=0, seq_len=3)
    flags = pack_marks([[False, True, False], [True]], seq_len=3)
    assert ids.tolist() == [[1, 2, 3], [0, 4, 0]]
    assert flags.tolist() == [[False, True, False], [False, True, False]]  # EOS is never marked
    packed = split(torch.arange(40 * 2).view(40, 2), None, torch.arange(40 * 2).view(40, 2) % 3 == 0)
    assert torch.equal(packed.train_marked, packed.train % 3 == 0)


def test_split_holds_out_every_twentieth_sequence_or_uses_eval_data():
    seqs = torch.arange(45 * 2).view(45, 2)
    packed = split(seqs, None)
    assert packed.eval.shape[0] == 2 and packed.train.shape[0] == 43
    assert packed.eval[:, 0].tolist() == [2 * (HOLDOUT_EVERY - 1), 2 * (2 * HOLDOUT_EVERY - 1)]
    assert not set(packed.eval[:, 0].tolist()) & set(packed.train[:, 0].tolist())
    given = torch.zeros(3, 2, dtype=torch.int64)
    packed = split(seqs, given)
    assert packed.train.shape[0] == 45 and packed.eval is given


def test_order_is_a_seeded_permutation_per_epoch():
    order = SequenceOrder(10, seed=3)
    first = order.indices(0, 10)
    assert sorted(first.tolist()) == list(range(10))
    both = order.indices(0, 20)
    assert torch.equal(both[:10], first) and sorted(both[10:].tolist()) == list(range(10))
    assert not torch.equal(both[10:], first)  # a new order each epoch
    assert torch.equal(SequenceOrder(10, seed=3).indices(7, 6), both[7:13])  # a fresh order resumes exactly


def test_processes_and_micro_batches_split_the_global_batch():
    order = SequenceOrder(50, seed=0)
    B, K, W, position = 3, 2, 2, 17
    parts = [idx for r in range(W) for idx in order.micro_batches(position, B, K, r, W)]
    assert torch.equal(torch.cat(parts), order.indices(position, W * K * B))
