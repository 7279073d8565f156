"""Checkpoints: a save/load round trip restores everything; an interrupted save leaves the
previous checkpoint complete and loadable; only the last ones are kept."""

import pytest
import torch

import collider_models
from collider_models.training import checkpoints
from collider_models.training.distributed import Dist
from collider_models.training.loop import lr_lambda


def _trained(seed=0, steps=2):
    torch.manual_seed(seed)
    model = collider_models.from_preset("qwen2.5-tiny")  # tied embeddings
    model.config.hf_config.update(eos_token_id=2, bos_token_id=1)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(1, 10))
    ids = torch.randint(0, 512, (2, 8), generator=torch.Generator().manual_seed(seed))
    for _ in range(steps):
        model(ids, labels=ids).loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad()
    return model, opt, sched


def _save(root, step, model, opt, sched):
    return checkpoints.save_checkpoint(root, step, model, opt, sched, {"data_position": step * 4}, Dist())


def test_round_trip_restores_model_optimizer_scheduler_and_rng(tmp_path):
    model, opt, sched = _trained()
    torch.manual_seed(123)
    rng = torch.get_rng_state()
    folder = _save(tmp_path, 2, model, opt, sched)
    fresh, fresh_opt, fresh_sched = _trained(seed=5, steps=0)
    torch.manual_seed(0)
    state = checkpoints.load_checkpoint(folder, fresh, fresh_opt, fresh_sched)
    assert state["step"] == 2 and state["data_position"] == 8
    assert torch.equal(torch.get_rng_state(), rng)
    for (name, p), q in zip(model.named_parameters(), fresh.parameters(), strict=True):
        assert torch.equal(p, q), name
    assert fresh.lm_head.weight is fresh.model.embed_tokens.weight
    for a, b in zip(opt.state.values(), fresh_opt.state.values(), strict=True):
        assert torch.equal(a["exp_avg"], b["exp_avg"]) and torch.equal(a["exp_avg_sq"], b["exp_avg_sq"])
    assert fresh_sched.state_dict() == sched.state_dict()
    assert fresh_opt.param_groups[0]["lr"] == opt.param_groups[0]["lr"]


def test_interrupted_save_leaves_the_previous_checkpoint_loadable(tmp_path, monkeypatch):
    model, opt, sched = _trained()
    _save(tmp_path, 2, model, opt, sched)
    real_save = torch.save

    def fail_after_weights(obj, path, *a, **k):  # the weights are written, then the disk fills up
        if str(path).endswith("optimizer.pt"):
            real_save(obj, path, *a, **k)
            raise OSError(28, "No space left on device")
        return real_save(obj, path, *a, **k)

    monkeypatch.setattr(checkpoints.torch, "save", fail_after_weights)
    with pytest.raises(OSError, match="No space left"):
        _save(tmp_path, 4, model, opt, sched)
    monkeypatch.undo()
    assert [p.name for p in tmp_path.iterdir()] == ["step-2"]  # no step-4, no temporary folder left
    assert checkpoints.latest_checkpoint(tmp_path).name == "step-2"
    fresh, fresh_opt, fresh_sched = _trained(seed=5, steps=0)
    assert checkpoints.load_checkpoint(tmp_path / "step-2", fresh, fresh_opt, fresh_sched)["step"] == 2


def test_only_complete_checkpoints_count_and_old_ones_go(tmp_path):
    model, opt, sched = _trained()
    for step in (1, 2, 3):
        _save(tmp_path, step, model, opt, sched)
    assert [p.name for p in checkpoints.list_checkpoints(tmp_path)] == ["step-2", "step-3"]
    (tmp_path / "step-9").mkdir()  # no trainer_state.json: not complete
    (tmp_path / ".tmp-step-10-abc").mkdir()
    assert checkpoints.latest_checkpoint(tmp_path).name == "step-3"
    assert checkpoints.latest_checkpoint(tmp_path / "none") is None


def test_final_folder_loads_with_its_tokenizer(tmp_path):
    from collider_models.training.tokenizer import load_tokenizer, train_bpe

    model, _, _ = _trained()
    tok = train_bpe(["to be or not to be, that is the question"] * 20, 300)
    checkpoints.save_final(tmp_path / "final", model, tok, Dist())
    loaded = collider_models.from_pretrained(tmp_path / "final")
    for (name, p), q in zip(model.named_parameters(), loaded.parameters(), strict=True):
        assert torch.equal(p, q), name
    assert load_tokenizer(tmp_path / "final").encode_batch(["to be"]) == tok.encode_batch(["to be"])
