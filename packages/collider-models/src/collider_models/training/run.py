"""A whole ``collider-train`` run: defaults, checks, tokenizer, data, the reference model
(trained first when it has to be), then the token-filtered training."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

import collider_models
from collider_models.atomic import atomic_dir
from collider_models.training import distributed
from collider_models.training.config import TrainConfig, check_options, check_out, is_preset
from collider_models.training.corpus import default_corpus
from collider_models.training.documents import check_paths, read_all
from collider_models.training.loop import INTERRUPTED, check_data, check_vocab, train_stage
from collider_models.training.packing import Packed, pack, pack_marks, split, token_marks
from collider_models.training.tokenizer import TextTokenizer, has_tokenizer, load_tokenizer, train_bpe


def resolve(cfg: TrainConfig, log=print) -> TrainConfig:
    """``cfg`` with its defaults filled in: the device, and for the embedded default (no
    ``data``) the corpus and a reference model trained first on its clean split."""
    cfg = dataclasses.replace(cfg)
    if cfg.device is None:
        cfg.device = "cuda" if torch.cuda.is_available() else "cpu"
    if cfg.data is None:
        corpus = default_corpus(log=log)
        cfg.data = [str(corpus.train)]
        cfg.eval_data = cfg.eval_data or [str(corpus.eval)]
        cfg.title = cfg.title or corpus.describe()
        if cfg.selection == "excess" and cfg.reference is None:
            cfg.reference = cfg.model
            cfg.reference_data = cfg.reference_data or [str(corpus.reference)]
    if cfg.selection != "excess" and cfg.reference is None:
        cfg.reference = "none"
    if cfg.selection == "excess" and cfg.reference is None and cfg.reference_data:
        cfg.reference = cfg.model  # the reference starts as the model and learns the clean text
    if cfg.selection == "excess" and cfg.reference is None:
        raise ValueError("--selection excess scores tokens against a reference model: give --reference FOLDER "
                         "(a trained model with the same tokenizer), or --reference PRESET with --reference-data "
                         "to train one first, or use --selection loss|random with --reference none")
    if cfg.reference not in (None, "none") and is_preset(cfg.reference) and not cfg.reference_data:
        raise ValueError(f"--reference {cfg.reference!r} is a preset (random init): give --reference-data "
                         "(clean text) to train it first, or a trained checkpoint folder")
    return cfg


def _tokenizer(cfg: TrainConfig, d: distributed.Dist, log) -> TextTokenizer:
    """The folder's tokenizer, or (preset) the BPE saved in ``OUT/tokenizer``, trained on the
    training and reference text by rank 0 if it is not there yet."""
    if not cfg.from_scratch:
        return load_tokenizer(cfg.model)
    saved = Path(cfg.out) / "tokenizer"
    given = cfg.reference if cfg.selection == "excess" and not cfg.reference_data else None
    if given and not is_preset(given) and has_tokenizer(given):
        # A trained reference folder: the new model must read its ids, so it gets its tokenizer.
        if d.main and not saved.is_dir():
            log(f"using the tokenizer of the reference folder {given}")
            with atomic_dir(saved) as tmp:
                load_tokenizer(given).save(tmp)
    elif d.main and not saved.is_dir():
        vocab = cfg.vocab_size or collider_models.preset_config(cfg.model)["vocab_size"]
        log(f"training a {vocab}-token byte-level BPE tokenizer on the data ...")
        paths = check_paths(cfg.data, "--data")
        if cfg.reference_data:
            paths += check_paths(cfg.reference_data, "--reference-data")
        tok = train_bpe([doc.text for doc in read_all(paths)], vocab)
        with atomic_dir(saved) as tmp:
            tok.save(tmp)
    distributed.barrier(d)
    return load_tokenizer(saved)


def _packed(tok: TextTokenizer, data, eval_data, seq_len: int, option: str) -> Packed:
    docs = read_all(check_paths(data, option))
    texts = [doc.text for doc in docs]
    marked = None
    if any(doc.marked for doc in docs):
        ids, offsets = tok.encode_with_offsets(texts)
        marks = [token_marks(o, doc.marked, len(doc.text)) for o, doc in zip(offsets, docs, strict=True)]
        marked = pack_marks(marks, seq_len)
    else:
        ids = tok.encode_batch(texts)
    seqs = pack(ids, tok.eos_id, seq_len)
    evals = None
    if eval_data:
        eval_docs = read_all(check_paths(eval_data, "--eval-data"))
        evals = pack(tok.encode_batch([doc.text for doc in eval_docs]), tok.eos_id, seq_len)
    return split(seqs, evals, marked)


def _reference(cfg: TrainConfig, tok: TextTokenizer, d: distributed.Dist, log) -> tuple[torch.nn.Module | None, int]:
    """The frozen reference model (eval mode, no gradients), trained first into
    ``OUT/reference`` when ``--reference-data`` is given; and an exit status (non-zero when
    that training was interrupted)."""
    if cfg.selection != "excess":
        return None, 0
    source = cfg.reference
    if cfg.reference_data:
        ref_cfg = dataclasses.replace(
            cfg, model=cfg.reference, data=cfg.reference_data, out=str(Path(cfg.out) / "reference"),
            reference="none", reference_data=None, selection="loss", keep=1.0, steps=cfg.reference_steps,
            title="clean text " + ", ".join(f"{Path(p).parent.name}/{Path(p).name}" for p in cfg.reference_data),
        )
        final = Path(ref_cfg.out) / "final"
        if not final.is_dir():
            log(f"training the reference model on the clean text for {ref_cfg.steps} steps -> {ref_cfg.out}")
            if d.main:
                Path(ref_cfg.out).mkdir(parents=True, exist_ok=True)
            packed = _packed(tok, ref_cfg.data, ref_cfg.eval_data, ref_cfg.seq_len, "--reference-data")
            check_data(ref_cfg, packed, d, "--reference-data")
            summary = train_stage(ref_cfg, tok, packed, None, d, log)
            if summary["status"] != "complete":
                return None, INTERRUPTED
        source = str(final)
    reference = collider_models.from_pretrained(source, dtype=torch.float32, device=d.device)
    check_vocab(reference, tok, source)
    if has_tokenizer(source) and load_tokenizer(source).vocab() != tok.vocab():
        raise ValueError(f"the reference {source!r} has a tokenizer other than the training one ({tok.source}): its "
                         "losses would score other tokens; train both with the same tokenizer")
    return reference.requires_grad_(False).eval(), 0


def run(cfg: TrainConfig, log=print) -> int:
    """Run ``cfg`` (under ``torchrun`` too); returns the exit status: 0 when complete,
    130 when stopped by Ctrl-C/SIGTERM after saving a checkpoint."""
    check_options(cfg)
    d = distributed.init(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    say = log if d.main else (lambda *a, **k: None)
    try:
        cfg = resolve(cfg, say)
        check_options(cfg)
        error = None
        if d.main:
            try:
                check_out(Path(cfg.out), cfg.resume)
            except ValueError as e:
                error = str(e)
        error = distributed.broadcast_object(d, error)
        if error:
            raise ValueError(error)
        tok = _tokenizer(cfg, d, say)
        packed = _packed(tok, cfg.data, cfg.eval_data, cfg.seq_len, "--data")
        check_data(cfg, packed, d, "--data")
        reference, status = _reference(cfg, tok, d, say)
        if status:
            return status
        summary = train_stage(cfg, tok, packed, reference, d, say)
        if summary["status"] != "complete":
            return INTERRUPTED
        if d.main:
            out = Path(cfg.out)
            first, last = summary["eval_loss_first"], summary["eval_loss_last"]
            held = f"{last:.3f}" if first == last else f"{first:.3f} -> {last:.3f}"
            say(f"\nheld-out loss {held}; {summary['tokens_trained']:,} tokens trained, "
                f"{summary['seconds_this_session']:.0f} s")
            say(f"output: {out.resolve()}")
            say(f"  final model (transformers AutoModelForCausalLM / AutoTokenizer): {out / 'final'}")
            say(f"  metrics: {out / 'metrics.jsonl'}, summary: {out / 'summary.json'}, plot: {out / 'loss.png'}")
            say(f"  checkpoints: {out / 'checkpoints'}")
        return 0
    finally:
        distributed.shutdown(d)
