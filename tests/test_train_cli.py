"""``collider-train`` end to end: a Hugging Face checkpoint folder with its tokenizer, fine-tuned
on a text file with a reference folder and excess-loss selection; the embedded default,
shortened; bad options failing before training; exact resume after an interruption; Ctrl-C;
bf16 autocast; torchrun with DDP and FSDP2."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import transformers

import collider_models
from collider_models.cli.train import main
from collider_models.training.tokenizer import EOS_TOKEN, train_bpe

REPO = Path(__file__).resolve().parents[1]
SMALL = ["--batch-size", "2", "--seq-len", "16", "--lr", "1e-3", "--warmup", "1"]
WORDS = ("the king queen lord lady good night day love death sweet fair heart hand eye speak come go "
         "now here there what why how my thy your his her our we you they is was be have shall will").split()


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models run fastest on one thread, and do not stall on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _text(seed: int, n_lines: int) -> str:
    rng = random.Random(seed)
    return "\n".join(" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 12))).capitalize() + "."
                     for _ in range(n_lines))


def _hf_model(folder: Path, tok, vocab: int, seed: int) -> None:
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, bos_token_id=tok.eos_token_id,
        eos_token_id=tok.eos_token_id, tie_word_embeddings=False,
    )
    transformers.LlamaForCausalLM(config).save_pretrained(folder)
    tok.save_pretrained(folder)


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    """Folders of tiny Llama checkpoints saved by transformers with a BPE tokenizer: the model,
    a reference, and one whose vocabulary is smaller than its tokenizer's; and text files."""
    root = tmp_path_factory.mktemp("hf")
    raw = train_bpe([_text(0, 400)], 300).raw
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=raw, eos_token=EOS_TOKEN)
    folders = {}
    for name, vocab, seed in (("model", len(tok), 0), ("reference", len(tok), 1), ("small-vocab", len(tok) - 20, 2)):
        folders[name] = root / name
        _hf_model(folders[name], tok, vocab, seed)
    (root / "train.txt").write_text(_text(1, 600))
    with open(root / "docs.jsonl", "w") as f:
        for i in range(20):
            f.write(json.dumps({"text": _text(100 + i, 15)}) + "\n")
    (root / "short.txt").write_text("The king is here.")
    return {**folders, "train": root / "train.txt", "jsonl": root / "docs.jsonl", "short": root / "short.txt"}


def _hf_args(hf, out, *extra):
    return ["--model", str(hf["model"]), "--data", str(hf["train"]), "--reference", str(hf["reference"]),
            "--out", str(out), *SMALL, *extra]


def _params(folder: Path) -> dict[str, torch.Tensor]:
    return dict(collider_models.from_pretrained(folder).named_parameters())


def _step_losses(out: Path) -> list[float]:
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [r["loss"] for r in map(json.loads, lines) if "loss" in r]


def _assert_same_params(a: Path, b: Path) -> None:
    pa, pb = _params(a), _params(b)
    for name in pa:
        torch.testing.assert_close(pb[name], pa[name], rtol=1e-6, atol=0, msg=name)


@pytest.mark.slow
def test_fine_tune_folder_with_reference_end_to_end(hf, tmp_path):
    out = tmp_path / "run"
    rc = main(_hf_args(hf, out, "--data", str(hf["train"]), str(hf["jsonl"]), "--steps", "4",
                       "--eval-every", "2", "--save-every", "2", "--selection", "excess", "--keep", "0.6"))
    assert rc == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    assert [r["step"] for r in records if "eval_loss" in r] == [0, 2, 4]
    for r in steps:
        assert abs(r["kept_share"] - 0.6) < 0.01 and r["tokens_per_s"] > 0 and r["lr"] > 0
        assert r["loss"] > 0 and r["loss_all"] > 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "complete" and summary["steps"] == 4 and summary["reference"] == str(hf["reference"])
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-2", "step-4"]

    final = out / "final"
    tok = transformers.AutoTokenizer.from_pretrained(final)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(final).eval()
    ours = collider_models.from_pretrained(final)
    ids = torch.tensor([tok("the king is here. good night, sweet lady")["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, theirs(ids).logits, rtol=0, atol=1e-5)
    before, after = _params(hf["model"]), _params(final)
    moved = max(float((after[n] - p).detach().abs().max()) for n, p in before.items())
    assert moved > 1e-4  # it trained


@pytest.mark.slow
def test_embedded_default_shortened(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("COLLIDER_CACHE", str(REPO / ".cache" / "collider"))  # where tools/setup.sh fetches it
    out = tmp_path / "default"
    rc = main(["--steps", "3", "--reference-steps", "2", "--batch-size", "4", "--seq-len", "32", "--eval-every", "0",
               "--out", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert str(out.resolve()) in printed and "final" in printed
    summary = json.loads((out / "summary.json").read_text())
    assert "Shakespeare" in summary["data"] and summary["selection"] == "excess" and summary["keep"] == 0.6
    assert summary["reference"] == "tinyllama-tiny" and (out / "reference" / "final" / "config.json").is_file()
    assert 0 <= summary["mean_kept_share_marked"] <= 1 and 0 <= summary["mean_kept_share_unmarked"] <= 1
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all("kept_share_marked" in r for r in records if "loss" in r)  # the corrupted lines are marked
    tok = transformers.AutoTokenizer.from_pretrained(out / "final")
    transformers.AutoModelForCausalLM.from_pretrained(out / "final")
    model = collider_models.from_pretrained(out / "final")
    prompt = torch.tensor([tok("ROMEO.\nWhat light")["input_ids"]])
    more = collider_models.generate(model, prompt, 8)
    assert more.shape == (1, prompt.shape[1] + 8) and torch.equal(more[:, : prompt.shape[1]], prompt)
    assert isinstance(tok.decode(more[0]), str)


BAD = {
    "keep-nothing": (["--keep", "0.005"], "--keep 0.005 keeps no token"),
    "keep-zero": (["--keep", "0"], "--keep must be in (0, 1]"),
    "cuda-missing": (["--device", "cuda"], "no CUDA GPU"),
    "excess-without-reference": (["--reference", "none"], "--selection excess scores tokens"),
    "reference-unused": (["--selection", "random"], "--reference is only used by --selection excess"),
    "missing-data": (["--data", "nope.txt"], "--data: 'nope.txt' is not a file"),
    "fsdp-one-process": (["--fsdp"], "--fsdp shards the model over processes"),
    "bad-steps": (["--steps", "0"], "--steps must be >= 1"),
}


def test_preset_from_scratch_takes_the_reference_folders_tokenizer(hf, tmp_path):
    # The reference scores token ids: a model trained from scratch must read the same ids.
    out = tmp_path / "run"
    rc = main(["--model", "tinyllama-tiny", "--data", str(hf["train"]), "--reference", str(hf["reference"]),
               "--out", str(out), "--steps", "1", "--eval-every", "0", "--save-every", "0", *SMALL])
    assert rc == 0
    want = transformers.AutoTokenizer.from_pretrained(hf["reference"]).get_vocab()
    assert transformers.AutoTokenizer.from_pretrained(out / "final").get_vocab() == want


def test_reference_with_another_tokenizer_is_refused(hf, tmp_path, capsys):
    other = tmp_path / "other-reference"
    shutil.copytree(hf["reference"], other)
    size = len(transformers.AutoTokenizer.from_pretrained(other))
    raw = train_bpe([_text(7, 400).upper()], size).raw  # same size, other merges
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (other / name).unlink(missing_ok=True)
    transformers.PreTrainedTokenizerFast(tokenizer_object=raw, eos_token=EOS_TOKEN).save_pretrained(other)
    assert transformers.AutoTokenizer.from_pretrained(other).get_vocab() != transformers.AutoTokenizer.from_pretrained(
        hf["model"]).get_vocab()
    args = _hf_args(hf, tmp_path / "run", "--steps", "1")
    args[args.index("--reference") + 1] = str(other)
    assert main(args) == 2
    assert "has a tokenizer other than the training one" in capsys.readouterr().err


@pytest.mark.parametrize("case", list(BAD))
def test_bad_options_fail_before_training(hf, tmp_path, capsys, case):
    if case == "cuda-missing" and torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU")
    extra, message = BAD[case]
    out = tmp_path / "run"
    assert main(_hf_args(hf, out, *extra)) == 2
    assert message in capsys.readouterr().err
    assert not (out / "metrics.jsonl").exists() and not (out / "final").exists()


def test_data_checks_fail_before_training(hf, tmp_path, capsys):
    cases = [
        (["--data", str(hf["short"])], "is too short"),
        (["--model", str(hf["small-vocab"])], "they do not belong together"),
        (["--reference", str(hf["small-vocab"])], "they do not belong together"),
        (["--reference", "tinyllama-tiny"], "give --reference-data"),
    ]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"txt": "no text field"}\n')
    cases.append((["--data", str(bad)], f"{bad}:2: expected a JSON object"))
    for i, (extra, message) in enumerate(cases):
        out = tmp_path / f"run{i}"
        assert main(_hf_args(hf, out, *extra)) == 2, extra
        assert message in capsys.readouterr().err, extra
        assert not (out / "metrics.jsonl").exists()


def test_existing_run_needs_resume(hf, tmp_path, capsys):
    out = tmp_path / "run"
    (out / "checkpoints").mkdir(parents=True)
    assert main(_hf_args(hf, out)) == 2
    assert "already holds a run" in capsys.readouterr().err


@pytest.fixture(scope="module")
def uninterrupted(hf, tmp_path_factory):
    """A 6-step run with checkpoints every 3 steps."""
    out = tmp_path_factory.mktemp("full") / "run"
    assert main(_hf_args(hf, out, "--steps", "6", "--save-every", "3", "--eval-every", "3")) == 0
    return out


@pytest.mark.slow
def test_resume_after_checkpoint_equals_uninterrupted(hf, uninterrupted, tmp_path):
    out = tmp_path / "run"
    assert main(_hf_args(hf, out, "--steps", "6", "--save-every", "3", "--eval-every", "3")) == 0
    # What an interruption after step 3's checkpoint leaves: no later checkpoint and no final/.
    shutil.rmtree(out / "checkpoints" / "step-6")
    shutil.rmtree(out / "final")
    assert main(_hf_args(hf, out, "--steps", "6", "--save-every", "3", "--eval-every", "3", "--resume")) == 0
    _assert_same_params(uninterrupted / "final", out / "final")
    assert _step_losses(out) == _step_losses(uninterrupted)
    # A different global batch cannot resume this run.
    assert main(_hf_args(hf, out, "--steps", "6", "--batch-size", "3", "--resume")) == 2


@pytest.mark.slow
def test_ctrl_c_saves_a_checkpoint_and_resume_finishes_the_same_run(hf, tmp_path):
    args = _hf_args(hf, tmp_path / "run", "--steps", "100", "--save-every", "0", "--eval-every", "0")
    proc = subprocess.Popen([sys.executable, "-m", "collider_models.cli.train", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and (not metrics.is_file() or len(metrics.read_text().splitlines()) < 3):
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 130, stderr[-3000:]
    assert "SIGINT" in stderr and "Traceback" not in stderr
    (ckpt,) = (tmp_path / "run" / "checkpoints").iterdir()
    stopped = int(ckpt.name.split("-")[1])
    assert 3 <= stopped < 100 and f"stopped at step {stopped}" in stdout
    assert not (tmp_path / "run" / "final").exists()
    assert main([*args, "--resume"]) == 0
    full = tmp_path / "full"
    assert main(_hf_args(hf, full, "--steps", "100", "--save-every", "0", "--eval-every", "0")) == 0
    _assert_same_params(full / "final", tmp_path / "run" / "final")


@pytest.mark.slow
def test_bf16_autocast_on_cpu(hf, tmp_path):
    runs = {}
    for precision in ("fp32", "bf16"):
        out = tmp_path / precision
        assert main(_hf_args(hf, out, "--steps", "3", "--precision", precision, "--eval-every", "3")) == 0
        runs[precision] = json.loads((out / "summary.json").read_text())
    assert runs["bf16"]["precision"] == "bf16"
    assert abs(runs["bf16"]["eval_loss_last"] - runs["fp32"]["eval_loss_last"]) < 0.05  # bf16 rounding only
    assert runs["bf16"]["eval_loss_last"] != runs["fp32"]["eval_loss_last"]  # autocast really ran
    final = collider_models.from_pretrained(tmp_path / "bf16" / "final")
    assert all(p.dtype == torch.float32 for p in final.parameters())  # fp32 master weights


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["ddp", "fsdp"])
def test_torchrun_two_processes(hf, tmp_path, engine):
    out = tmp_path / "run"
    args = _hf_args(hf, out, "--steps", "4", "--save-every", "2", "--eval-every", "2", "--grad-accum", "2")
    if engine == "fsdp":
        args.append("--fsdp")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           "-m", "collider_models.cli.train", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-5000:]
    assert "returned a view tensor" not in proc.stderr  # FSDP2 hooks ordinary layer outputs
    assert proc.stdout.count("output:") == 1  # only rank 0 reports
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["tokens_trained"] == 4 * 2 * 2 * 2 * 16
    state = json.loads((out / "checkpoints" / "step-4" / "trainer_state.json").read_text())
    assert state["world_size"] == 2 and state["data_position"] == 4 * 2 * 2 * 2
    transformers.AutoModelForCausalLM.from_pretrained(out / "final")
    # A checkpoint resumes at the same world size only.
    single = [a for a in args if a != "--fsdp"]
    assert main([*single, "--steps", "6", "--resume"]) == 2


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_cuda_fine_tune(hf, tmp_path, precision):
    out = tmp_path / "run"
    assert main(_hf_args(hf, out, "--steps", "4", "--device", "cuda", "--precision", precision,
                         "--save-every", "2", "--eval-every", "2")) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["device"].startswith("cuda") and 0 < summary["eval_loss_last"] < 20
    assert main(_hf_args(hf, out, "--steps", "6", "--device", "cuda", "--precision", precision,
                         "--save-every", "2", "--eval-every", "2", "--resume")) == 0
    assert json.loads((out / "summary.json").read_text())["steps"] == 6


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
@pytest.mark.parametrize("engine", ["ddp", "fsdp"])
def test_torchrun_two_gpus_bf16(hf, tmp_path, engine):
    out = tmp_path / "run"
    args = _hf_args(hf, out, "--steps", "4", "--device", "cuda", "--precision", "bf16", "--grad-accum", "2")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           "-m", "collider_models.cli.train", *args, *(["--fsdp"] if engine == "fsdp" else [])]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-5000:]
    assert json.loads((out / "summary.json").read_text())["world_size"] == 2
