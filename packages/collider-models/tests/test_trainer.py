"""``ColliderTrainer``: the same steps as a plain loop with ``filtered_mean``, gradient accumulation
normalised over the whole step, padding never kept, frozen parameters, the reference model,
logging, evaluation, checkpoints that transformers loads, and resuming."""

import copy

import pytest
import torch

from collider_autograd import excess_loss, filtered_mean, select_top_k
from collider_models import CausalLM, from_hf, from_preset, from_pretrained

transformers = pytest.importorskip("transformers", reason="ColliderTrainer needs transformers")
from collider_models.hf import ColliderTrainer  # noqa: E402
from collider_models.hf import trainer as trainer_module  # noqa: E402

T = 12
LENGTHS = [12, 11, 10, 9]  # right padding: real tokens per sequence, cycled through the data


def _data(n, vocab, seed=0, pad_id=0, lengths=LENGTHS):
    """``n`` right-padded examples; labels equal the inputs, padding included (the trainer
    must ignore padded targets through the attention mask)."""
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        length = lengths[i % len(lengths)]
        ids = torch.randint(1, vocab, (T,), generator=gen)
        ids[length:] = pad_id
        mask = (torch.arange(T) < length).long()
        rows.append({"input_ids": ids, "attention_mask": mask, "labels": ids.clone()})
    return rows


def _collate(rows):
    return {k: torch.stack([r[k] for r in rows]) for k in rows[0]}


def _args(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=4, learning_rate=5e-3,
                lr_scheduler_type="constant", weight_decay=0.0, train_sampling_strategy="sequential",
                report_to="none", use_cpu=True, save_strategy="no", disable_tqdm=True, logging_steps=1, seed=0)
    return transformers.TrainingArguments(**{**base, **kw})


class Snapshots(transformers.TrainerCallback):
    """Parameters after every optimizer step."""

    def __init__(self):
        self.params = []

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.params.append({n: p.detach().clone() for n, p in model.named_parameters()})


def _params(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _assert_params_equal(got, want, rtol=1e-6, atol=1e-7):
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=rtol, atol=atol, msg=name)


def _moved(a, b):
    return max((a[n] - b[n]).abs().max().item() for n in a)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "phi"])
def test_four_steps_equal_our_own_loop(arch, make_hf, tmp_path):
    hf, ref_hf = make_hf(arch, seed=0).train(), make_hf(arch, seed=1)
    twin, twin_ref = copy.deepcopy(hf), copy.deepcopy(ref_hf)
    V = hf.config.vocab_size
    data = _data(16, V)
    snaps = Snapshots()
    args = _args(tmp_path, optim="adamw_torch", max_grad_norm=1.0)
    trainer = ColliderTrainer(model=hf, args=args, train_dataset=data, keep=0.6, selection="excess",
                              reference_model=ref_hf, callbacks=[snaps])
    trainer.train()
    assert len(snaps.params) == 4

    ours, reference = from_hf(twin), from_hf(twin_ref).eval().requires_grad_(False)
    opt = torch.optim.AdamW(ours.parameters(), lr=5e-3, weight_decay=0.0)
    initial = _params(ours)
    for step in range(4):
        batch = _collate(data[4 * step: 4 * step + 4])
        labels = batch["labels"].masked_fill(batch["attention_mask"] == 0, -100)
        out = ours(batch["input_ids"], labels=labels)
        with torch.no_grad():
            ref_loss = reference(batch["input_ids"], labels=labels).token_loss
        keep = select_top_k(excess_loss(out.token_loss, ref_loss), 0.6, valid=out.labels != -100)
        filtered_mean(out.token_loss, keep).backward()
        torch.nn.utils.clip_grad_norm_(ours.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        _assert_params_equal(snaps.params[step], _params(ours))
    assert _moved(_params(ours), initial) > 1e-3
    _assert_params_equal(_params(hf), _params(ours))  # the transformers model holds the result


def _sgd_step(make_hf, tmp_path, data, **kw):
    """One plain-SGD step (no clipping: gradient scale errors show) from the same model."""
    hf = make_hf("llama", seed=2).train()
    args = _args(tmp_path, optim="sgd", learning_rate=1.0, max_grad_norm=0.0, max_steps=1,
                 **{"per_device_train_batch_size": 4, **kw})
    ColliderTrainer(model=hf, args=args, train_dataset=data, keep=0.6, selection="loss", per="sequence").train()
    return _params(hf)


def test_gradient_accumulation_equals_one_large_batch(make_hf, tmp_path):
    data = _data(4, 512, seed=3)  # micro-batches of lengths (12, 11) and (10, 9): unequal kept counts
    initial = _params(make_hf("llama", seed=2))
    one = _sgd_step(make_hf, tmp_path / "one", data)
    two = _sgd_step(make_hf, tmp_path / "two", data, per_device_train_batch_size=2, gradient_accumulation_steps=2)
    assert _moved(one, initial) > 1e-2
    _assert_params_equal(two, one, rtol=1e-5, atol=1e-7)


def _spy_keeps(monkeypatch):
    seen = []

    def spy(token_loss, keep, *args, **kwargs):
        seen.append(keep.clone())
        return filtered_mean(token_loss, keep, *args, **kwargs)

    monkeypatch.setattr(trainer_module, "filtered_mean", spy)
    return seen


@pytest.mark.parametrize("keep", [1.0, 0.6])
def test_padding_is_never_kept(keep, make_hf, tmp_path, monkeypatch):
    seen = _spy_keeps(monkeypatch)
    data = _data(8, 512, seed=4)
    ColliderTrainer(model=make_hf("llama", seed=5).train(), args=_args(tmp_path, max_steps=2), train_dataset=data,
                    keep=keep, selection="loss", per="sequence").train()
    assert len(seen) == 2
    for step, kept in enumerate(seen):
        lengths = torch.tensor([LENGTHS[i % 4] for i in range(4 * step, 4 * step + 4)])
        valid = torch.arange(T)[None, :] < lengths[:, None] - 1  # position t predicts token t + 1
        assert not bool((kept & ~valid).any())
        expected = [round(keep * (n - 1)) for n in lengths.tolist()]  # per sequence
        assert kept.sum(1).tolist() == expected


def test_padded_positions_influence_nothing(make_hf, tmp_path):
    results = []
    for pad_id in (0, 7):
        hf = make_hf("qwen2", seed=6).train()
        data = _data(8, 512, seed=7, pad_id=pad_id)
        ColliderTrainer(model=hf, args=_args(tmp_path / str(pad_id), max_steps=2), train_dataset=data, keep=0.6,
                        selection="loss").train()
        results.append(_params(hf))
    _assert_params_equal(results[0], results[1], rtol=0, atol=0)


def test_left_padding_trains_as_right_padding(make_hf, tmp_path):
    # The model takes the attention mask, so a left-padded batch (positions counted from the first
    # real token, as transformers does) trains exactly as the same batch right padded.
    right = _data(4, 512)
    left = []
    for row in right:
        pads = int((row["attention_mask"] == 0).sum())
        left.append({k: v.roll(pads) for k, v in row.items()})
    assert any(int(r["attention_mask"][0]) == 0 for r in left)  # really left padded
    results = []
    for i, data in enumerate((right, left)):
        hf = make_hf("llama", seed=3).train()
        # SGD: Adam's first steps turn rounding-level gradient differences into whole lr steps.
        ColliderTrainer(model=hf, args=_args(tmp_path / str(i), max_steps=2, optim="sgd"), train_dataset=data,
                        selection="loss").train()
        results.append(_params(hf))
    _assert_params_equal(results[1], results[0], rtol=1e-5, atol=1e-6)


class _MaskTaking(CausalLM):
    """A model whose forward takes an attention mask (records it; the math ignores it)."""

    seen: list

    def forward(self, input_ids, labels=None, attention_mask=None):
        self.seen.append(attention_mask)
        return super().forward(input_ids, labels=labels)


def test_attention_mask_reaches_a_model_that_takes_it(tmp_path):
    model = from_preset("tinyllama-tiny")
    model.__class__, model.seen = _MaskTaking, []
    data = _data(4, model.config.vocab_size)
    for row in data:
        row["attention_mask"] = row["attention_mask"].flip(0)  # left padding is fine for such a model
    ColliderTrainer(model=model, args=_args(tmp_path, max_steps=1), train_dataset=data, selection="loss").train()
    assert len(model.seen) == 1 and torch.equal(model.seen[0], _collate(data)["attention_mask"])


def test_bf16_autocast_runs_and_trains(make_hf, tmp_path):
    hf = make_hf("llama", seed=8).train()
    initial = _params(hf)
    trainer = ColliderTrainer(model=hf, args=_args(tmp_path, bf16=True, max_steps=2), train_dataset=_data(8, 512),
                              selection="loss")
    trainer.train()
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    assert {p.dtype for p in hf.parameters()} == {torch.float32}  # fp32 master weights
    assert _moved(_params(hf), initial) > 1e-3


def test_frozen_parameters_stay_and_the_rest_trains(make_hf, tmp_path):
    hf = make_hf("phi", seed=9).train()
    for name, p in hf.named_parameters():
        p.requires_grad_(not name.startswith(("model.embed_tokens.", "model.layers.0.")))
    before = _params(hf)
    trainer = ColliderTrainer(model=hf, args=_args(tmp_path, max_steps=2), train_dataset=_data(8, 512),
                              selection="loss")
    trainer.train()
    after = _params(hf)
    for name, p in hf.named_parameters():
        assert torch.equal(after[name], before[name]) != p.requires_grad, name
    trained = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert trained == {id(p) for p in hf.parameters() if p.requires_grad}


def test_reference_model_is_frozen_in_eval_mode_without_graph(make_hf, tmp_path):
    ref = make_hf("llama", seed=10).train()
    before = _params(ref)
    graphs = []
    trainer = ColliderTrainer(model=make_hf("llama", seed=11).train(), args=_args(tmp_path, max_steps=2),
                              train_dataset=_data(8, 512), selection="excess", reference_model=ref)
    trainer.reference_model.register_forward_hook(lambda m, i, out: graphs.append(out.token_loss.requires_grad))
    trainer.train()
    assert graphs == [False, False]
    assert not trainer.reference_model.training
    assert all(not p.requires_grad and p.grad is None for p in ref.parameters())
    _assert_params_equal(_params(ref), before, rtol=0, atol=0)
    assert trainer.reference_model.model.embed_tokens.weight is ref.model.embed_tokens.weight  # no copy


def test_nan_scores_stop_training_with_a_clear_error(make_hf, tmp_path):
    ref = make_hf("llama", seed=13)
    with torch.no_grad():
        ref.lm_head.weight[0, 0] = float("nan")  # every reference loss is NaN
    trainer = ColliderTrainer(model=make_hf("llama", seed=14).train(), args=_args(tmp_path, max_steps=2),
                              train_dataset=_data(8, 512), selection="excess", reference_model=ref)
    with pytest.raises(ValueError, match="'excess' selection scores contain NaN"):
        trainer.train()
    assert trainer.state.global_step == 0  # raised after the first backward, before any update


def test_kept_count_is_known_before_the_forward(make_hf, tmp_path, monkeypatch):
    counts = []

    def spy(token_loss, keep, *args, **kwargs):
        counts.append((kwargs.get("kept_count"), int(keep.sum())))
        return filtered_mean(token_loss, keep, *args, **kwargs)

    monkeypatch.setattr(trainer_module, "filtered_mean", spy)
    ColliderTrainer(model=make_hf("llama", seed=15).train(), args=_args(tmp_path, max_steps=2),
                    train_dataset=_data(8, 512), keep=0.6, selection="loss", per="sequence").train()
    assert len(counts) == 2 and all(given == kept > 0 for given, kept in counts)


def test_logs_kept_share_and_filtered_loss(make_hf, tmp_path):
    trainer = ColliderTrainer(model=make_hf("llama", seed=12).train(), args=_args(tmp_path, max_steps=2),
                              train_dataset=_data(8, 512), selection="loss", per="sequence")
    trainer.train()
    logs = [log for log in trainer.state.log_history if "loss" in log]
    valid = [n - 1 for n in LENGTHS]
    share = sum(round(0.6 * n) for n in valid) / sum(valid)
    assert len(logs) == 2
    for log in logs:
        assert log["kept_share"] == pytest.approx(share, abs=1e-12)
        assert log["filtered_loss"] == pytest.approx(log["loss"], rel=1e-5)  # one step per log
        assert log["filtered_loss"] > log["unfiltered_loss"] > 0  # the kept tokens are the hardest


def test_evaluation_reports_the_unfiltered_loss(make_hf, tmp_path):
    hf = make_hf("phi", seed=13)
    data = _data(4, 512, seed=14)
    trainer = ColliderTrainer(model=hf, args=_args(tmp_path), eval_dataset=data, selection="loss")
    batch = _collate(data)
    labels = batch["labels"].masked_fill(batch["attention_mask"] == 0, -100)
    with torch.no_grad():
        want = hf(batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels).loss.item()
    assert trainer.evaluate()["eval_loss"] == pytest.approx(want, rel=1e-5)


def test_checkpoints_load_in_transformers_and_resume(make_hf, tmp_path):
    hf = make_hf("qwen2", seed=15).train()
    twin = copy.deepcopy(hf)
    data = _data(16, 512, seed=16)
    args = dict(max_steps=4, save_strategy="steps", save_steps=2)
    ColliderTrainer(model=hf, args=_args(tmp_path / "a", **args), train_dataset=data, selection="loss").train()
    saved = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "a" / "checkpoint-4")
    _assert_params_equal(_params(saved), _params(hf), rtol=0, atol=0)
    assert saved.lm_head.weight is saved.model.embed_tokens.weight
    # resuming from the step-2 checkpoint ends where the uninterrupted run ended
    resumed = ColliderTrainer(model=twin, args=_args(tmp_path / "b", **args), train_dataset=data, selection="loss")
    resumed.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-2"))
    _assert_params_equal(_params(twin), _params(hf))


def test_collider_model_checkpoints_have_a_config(tmp_path):
    torch.manual_seed(0)
    model = from_preset("phi-tiny")
    ColliderTrainer(model=model, args=_args(tmp_path, max_steps=2, save_strategy="steps", save_steps=2),
                    train_dataset=_data(8, 512), selection="random").train()
    folder = tmp_path / "checkpoint-2"
    assert (folder / "config.json").is_file()
    for loaded in (transformers.AutoModelForCausalLM.from_pretrained(folder), from_pretrained(folder)):
        _assert_params_equal(_params(loaded), _params(model), rtol=0, atol=0)


def test_random_selection_keeps_exactly_the_share(make_hf, tmp_path, monkeypatch):
    seen = _spy_keeps(monkeypatch)
    ColliderTrainer(model=make_hf("llama").train(), args=_args(tmp_path, max_steps=2), train_dataset=_data(8, 512),
                    keep=0.3, selection="random").train()
    valid = sum(n - 1 for n in LENGTHS)
    assert [int(k.sum()) for k in seen] == [round(0.3 * valid)] * 2
    assert not torch.equal(seen[0], seen[1])


def _bad(make_hf, tmp_path, **kw):
    hf = make_hf("llama")
    base = dict(model=hf, args=_args(tmp_path), train_dataset=_data(4, 512), selection="loss")
    return ColliderTrainer(**{**base, **kw})


@pytest.mark.parametrize("kw, error, words", [
    (dict(selection="excess"), ValueError, "reference_model"),
    (dict(selection="best"), ValueError, "selection"),
    (dict(reference_model=torch.nn.Linear(2, 2)), ValueError, "only used by"),
    (dict(keep=1.5), ValueError, "keep"),
    (dict(per="token"), ValueError, "per"),
    (dict(model=torch.nn.Linear(2, 2)), TypeError, "Linear"),
    (dict(compute_loss_func=lambda *a, **k: 0), ValueError, "compute_loss_func"),
    (dict(selection="excess", reference_model=torch.nn.Linear(2, 2)), TypeError, "reference_model"),
])
def test_bad_arguments_are_refused(kw, error, words, make_hf, tmp_path):
    with pytest.raises(error, match=words):
        _bad(make_hf, tmp_path, **kw)


def test_bad_training_arguments_and_batches_are_refused(make_hf, tmp_path):
    with pytest.raises(ValueError, match="gradient checkpointing"):
        _bad(make_hf, tmp_path, args=_args(tmp_path, gradient_checkpointing=True))
    hf = make_hf("llama")
    with pytest.raises(ValueError, match="shares parameters"):
        _bad(make_hf, tmp_path, model=hf, selection="excess", reference_model=from_hf(hf))
    data = [{"input_ids": r["input_ids"]} for r in _data(4, 512)]
    with pytest.raises(ValueError, match="'labels'"):
        _bad(make_hf, tmp_path, train_dataset=data).train()


def _check_trainer_on_device(make_hf, tmp_path, device):
    """Two SGD steps of the trainer on one repeated batch equal our own loop (fp32), and a bf16
    model trains (pure bf16 weights); no sampler option needed."""
    hf = make_hf("llama", seed=21).train()
    twin = copy.deepcopy(hf).to(device)
    data = _data(4, 512, seed=22)  # one batch: both steps see the same 4 examples
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=2, optim="sgd", learning_rate=1.0,
        max_grad_norm=0.0, lr_scheduler_type="constant", report_to="none", save_strategy="no", disable_tqdm=True,
        use_cpu=device == "cpu",
    )
    ColliderTrainer(model=hf, args=args, train_dataset=data, keep=0.6, selection="loss", per="sequence").train()
    assert hf.model.embed_tokens.weight.device.type == torch.device(device).type

    ours = from_hf(twin)
    opt = torch.optim.SGD(ours.parameters(), lr=1.0)
    batch = {k: v.to(device) for k, v in _collate(data).items()}
    labels = batch["labels"].masked_fill(batch["attention_mask"] == 0, -100)
    for _ in range(2):
        out = ours(batch["input_ids"], labels=labels)
        keep = select_top_k(out.token_loss.detach(), 0.6, per="sequence", valid=out.labels != -100)
        filtered_mean(out.token_loss, keep).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    _assert_params_equal(_params(hf), _params(ours), rtol=1e-4, atol=1e-6)  # sequence order may differ

    bf16 = make_hf("llama", seed=23, dtype=torch.bfloat16).train()
    initial = _params(bf16)
    trainer = ColliderTrainer(model=bf16, args=args, train_dataset=data, selection="loss")
    trainer.train()
    assert all(torch.isfinite(torch.tensor(log["loss"])) for log in trainer.state.log_history if "loss" in log)
    assert _moved({n: p.float().cpu() for n, p in _params(bf16).items()},
                  {n: p.float() for n, p in initial.items()}) > 1e-3


@pytest.mark.gpu
def test_on_gpu_trainer_steps_equal_our_own_loop(make_hf, tmp_path):
    _check_trainer_on_device(make_hf, tmp_path, "cuda")


def test_plain_trainer_checkpoints_of_a_collider_model_load_with_the_callback(tmp_path):
    # A plain transformers.Trainer trains a Collider model (its output reads like transformers'),
    # and with SaveCheckpointCallback every checkpoint is a Hugging Face folder with config.json.
    from collider_models import from_pretrained
    from collider_models.hf import SaveCheckpointCallback

    model = from_preset("tinyllama-tiny")
    data = [{k: v for k, v in row.items() if k != "attention_mask"} for row in _data(4, model.config.vocab_size)]
    args = _args(tmp_path, max_steps=2, save_strategy="steps", save_steps=1)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data, callbacks=[SaveCheckpointCallback()])
    trainer.train()
    for step in (1, 2):
        folder = tmp_path / f"checkpoint-{step}"
        assert (folder / "config.json").is_file() and (folder / "optimizer.pt").is_file()
    loaded = from_pretrained(tmp_path / "checkpoint-2")
    for name, p in model.named_parameters():
        torch.testing.assert_close(dict(loaded.named_parameters())[name], p.detach(), rtol=0, atol=0)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "checkpoint-2")
    ids = data[0]["input_ids"][None]
    with torch.no_grad():
        torch.testing.assert_close(theirs(ids).logits, model(ids).logits, rtol=0, atol=1e-5)
