"""Checkpoint I/O: round trips, shards, both config formats, dtypes and clear errors."""

import copy
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import collider_models
from collider_models import from_pretrained, save_pretrained
from collider_models.checkpoint import CheckpointError

ARCHS = ["llama", "qwen2", "phi"]


def _ids(model, B=2, T=9, seed=0):
    return torch.randint(0, model.config.vocab_size, (B, T), generator=torch.Generator().manual_seed(seed))


def _assert_same_model(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for name in sa:
        assert sa[name].dtype == sb[name].dtype, name
        assert torch.equal(sa[name], sb[name]), name
    ids = _ids(a)
    with torch.no_grad():
        assert torch.equal(a(ids).logits, b(ids).logits)


@pytest.mark.parametrize("arch", ARCHS)
def test_round_trip(arch, make_ours, tmp_path):
    model = make_ours(arch)
    model.save_pretrained(tmp_path)
    loaded = from_pretrained(tmp_path)
    _assert_same_model(model, loaded)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["dtype"] == "float32" and cfg["model_type"] == arch
    with safe_open(tmp_path / "model.safetensors", framework="pt") as f:
        keys = set(f.keys())
        assert f.metadata() == {"format": "pt"}
    tied = arch == "qwen2"
    assert ("lm_head.weight" in keys) != tied  # a tied head is stored once, as the embedding
    assert (loaded.lm_head.weight is loaded.model.embed_tokens.weight) == tied


def test_built_on_meta_in_target_dtype(make_ours, tmp_path, monkeypatch):
    make_ours("llama").to(torch.bfloat16).save_pretrained(tmp_path)
    devices = []
    original = collider_models.CausalLM.reset_parameters

    def spy(self):
        devices.append(self.lm_head.weight.device.type)
        original(self)

    monkeypatch.setattr(collider_models.CausalLM, "reset_parameters", spy)
    loaded = from_pretrained(tmp_path)
    assert devices == ["meta"]  # no random init is materialised
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}  # the config's dtype
    assert not any(p.is_meta for p in loaded.parameters())
    assert all(p.requires_grad for p in loaded.parameters())


@pytest.mark.parametrize("dtype", [torch.bfloat16, "float16", torch.float64])
def test_dtype_override(dtype, make_ours, tmp_path):
    model = make_ours("phi")
    save_pretrained(model, tmp_path)
    loaded = from_pretrained(tmp_path, dtype=dtype)
    target = dtype if isinstance(dtype, torch.dtype) else torch.float16
    for (name, p), (_, q) in zip(model.named_parameters(), loaded.named_parameters(), strict=True):
        assert q.dtype == target
        assert torch.equal(p.to(target), q), name
    # saving again records the new dtype
    save_pretrained(loaded, tmp_path / "again")
    assert json.loads((tmp_path / "again" / "config.json").read_text())["dtype"] == str(target).split(".")[1]


def test_dtype_falls_back_to_stored_tensors(make_ours, tmp_path):
    save_pretrained(make_ours("llama").to(torch.float16), tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    del cfg["dtype"]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    assert {p.dtype for p in from_pretrained(tmp_path).parameters()} == {torch.float16}


def _shard(folder, parts: int, index: bool):
    """Split ``model.safetensors`` of ``folder`` into ``parts`` shards (with an index or not)."""
    tensors = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    names = sorted(tensors)
    weight_map = {}
    for i in range(parts):
        fname = f"model-{i + 1:05d}-of-{parts:05d}.safetensors"
        chunk = {n: tensors[n] for n in names[i::parts]}
        save_file(chunk, folder / fname, metadata={"format": "pt"})
        weight_map.update({n: fname for n in chunk})
    if index:
        (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


@pytest.mark.parametrize("index", [True, False])
@pytest.mark.parametrize("arch", ["qwen2", "phi"])
def test_sharded(arch, index, make_ours, tmp_path):
    model = make_ours(arch)
    save_pretrained(model, tmp_path)
    _shard(tmp_path, 3, index)
    _assert_same_model(model, from_pretrained(tmp_path))
    # saving over a sharded folder replaces the shards
    save_pretrained(model, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
    _assert_same_model(model, from_pretrained(tmp_path))


def _to_old_format(cfg: dict) -> dict:
    cfg = dict(cfg)
    params = cfg.pop("rope_parameters", None) or {}
    cfg["rope_theta"] = params.get("rope_theta", cfg.get("rope_theta"))
    if "partial_rotary_factor" in params:
        cfg["partial_rotary_factor"] = params["partial_rotary_factor"]
    cfg["rope_scaling"] = None
    cfg["torch_dtype"] = cfg.pop("dtype")
    return cfg


def _to_new_format(cfg: dict) -> dict:
    cfg = dict(cfg)
    params = {"rope_type": "default", "rope_theta": cfg.pop("rope_theta")}
    if "partial_rotary_factor" in cfg:
        params["partial_rotary_factor"] = cfg.pop("partial_rotary_factor")
    cfg["rope_parameters"] = params
    cfg["dtype"] = cfg.pop("torch_dtype", None) or cfg.pop("dtype", None)
    return cfg


@pytest.mark.parametrize("arch", ARCHS)
def test_old_and_new_config_formats(arch, make_ours, tmp_path):
    # Non-default rotary settings, so that reading the wrong key would show.
    overrides = {"rope_theta": 5000.0} if arch != "phi" else {"rope_theta": 5000.0, "partial_rotary_factor": 0.25}
    model = make_ours(arch, **overrides)
    for fmt, convert in (("old", _to_old_format), ("new", _to_new_format)):
        folder = tmp_path / fmt
        save_pretrained(copy.deepcopy(model).to(torch.bfloat16) if fmt == "old" else model, folder)
        cfg = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps(convert(cfg)))
    old, new = from_pretrained(tmp_path / "old"), from_pretrained(tmp_path / "new")
    assert old.config.rope_theta == new.config.rope_theta == 5000.0
    assert old.config.rot_dim == new.config.rot_dim == model.config.rot_dim
    assert old.lm_head.weight.dtype == torch.bfloat16  # torch_dtype honoured
    assert new.lm_head.weight.dtype == torch.float32
    _assert_same_model(model, new)


def test_null_num_key_value_heads(make_ours, tmp_path):
    model = make_ours("phi")
    save_pretrained(model, tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["num_key_value_heads"] = None
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    loaded = from_pretrained(tmp_path)
    assert loaded.config.num_kv_heads == loaded.config.num_heads
    _assert_same_model(model, loaded)


# ----------------------------------------------------------------------------- errors


@pytest.fixture
def saved(make_ours, tmp_path):
    model = make_ours("llama")
    save_pretrained(model, tmp_path)
    return tmp_path


def _edit_tensors(folder, fn):
    tensors = load_file(folder / "model.safetensors")
    fn(tensors)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})


def _edit_config(folder, **changes):
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(changes)
    (folder / "config.json").write_text(json.dumps(cfg))


def test_error_no_folder_or_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        from_pretrained(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="config.json"):
        from_pretrained(tmp_path)


def test_error_no_weights(saved):
    (saved / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="safetensors"):
        from_pretrained(saved)


def test_error_unknown_model_type(saved):
    _edit_config(saved, model_type="gpt2")
    with pytest.raises(ValueError, match="unknown model_type 'gpt2'"):
        from_pretrained(saved)


def test_error_missing_tensor(saved):
    _edit_tensors(saved, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(CheckpointError, match=r"missing tensors: model\.layers\.1\.mlp\.up_proj\.weight"):
        from_pretrained(saved)


def test_error_missing_untied_head(saved):
    _edit_tensors(saved, lambda t: t.pop("lm_head.weight"))
    with pytest.raises(CheckpointError, match="missing tensors: lm_head.weight"):
        from_pretrained(saved)


def test_error_misshaped_tensor(saved):
    def cut(t):
        t["model.layers.0.self_attn.k_proj.weight"] = t["model.layers.0.self_attn.k_proj.weight"][:-1].contiguous()

    _edit_tensors(saved, cut)
    with pytest.raises(CheckpointError, match=r"k_proj\.weight' has shape \[31, 128\].*expects \[32, 128\]"):
        from_pretrained(saved)


def test_error_unexpected_tensor(saved):
    def add(t):
        t["model.layers.0.self_attn.extra.weight"] = torch.zeros(2)
        t["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.zeros(8)  # a known buffer: ignored

    _edit_tensors(saved, add)
    with pytest.raises(CheckpointError, match=r"unexpected tensors: model\.layers\.0\.self_attn\.extra\.weight$"):
        from_pretrained(saved)


def test_error_non_float_tensor(saved):
    def quantize(t):
        t["model.norm.weight"] = t["model.norm.weight"].to(torch.int8)

    _edit_tensors(saved, quantize)
    with pytest.raises(CheckpointError, match=r"model\.norm\.weight' is stored as I8"):
        from_pretrained(saved)


@pytest.mark.parametrize("dtype", [torch.int8, "float8", torch.complex64])
def test_error_dtype_cannot_be_honoured(saved, dtype):
    with pytest.raises(ValueError, match="cannot load a model in dtype"):
        from_pretrained(saved, dtype=dtype)


def test_error_config_dtype_unknown(saved):
    _edit_config(saved, dtype="float8_e4m3fn")
    with pytest.raises(ValueError, match="float8_e4m3fn"):
        from_pretrained(saved)


def test_error_unsupported_rope_scaling(saved):
    _edit_config(saved, rope_parameters={"rope_type": "proportional", "rope_theta": 10000.0, "factor": 2.0})
    with pytest.raises(ValueError, match="rope_type 'proportional'"):
        from_pretrained(saved)


def test_error_index_names_missing_file(saved):
    _shard(saved, 2, index=True)
    (saved / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model-00002-of-00002"):
        from_pretrained(saved)


# ----------------------------------------------------------------------------- atomic saves


def _state(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.mark.parametrize("where", ["weights", "config"])
def test_failed_save_leaves_the_old_sharded_checkpoint_intact(where, make_ours, tmp_path, monkeypatch):
    import collider_models.checkpoint as ckpt

    old = make_ours("llama", seed=1)
    folder = tmp_path / "ckpt"
    save_pretrained(old, folder)
    _shard(folder, 3, index=True)
    (folder / "tokenizer.json").write_text("{}")
    before = _state(folder)

    def fail(*args, **kwargs):
        if where == "weights":
            with open(args[1], "wb") as f:
                f.write(b"half a file")  # the disk fills up mid-write
        raise OSError("No space left on device")

    monkeypatch.setattr(ckpt, "save_file" if where == "weights" else "_write_json", fail)
    with pytest.raises(OSError, match="No space left"):
        save_pretrained(make_ours("llama", seed=2), folder)
    assert _state(folder) == before  # every old shard, the index and the config, unchanged
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]  # no temporary folder left behind
    monkeypatch.undo()
    _assert_same_model(old, from_pretrained(folder))


def test_save_keeps_other_files_and_replaces_old_weights(make_ours, tmp_path):
    folder = tmp_path / "ckpt"
    save_pretrained(make_ours("phi", seed=1), folder)
    _shard(folder, 2, index=True)
    (folder / "tokenizer.json").write_text('{"a": 1}')
    (folder / "pytorch_model.bin").write_bytes(b"stale")
    (folder / "sub").mkdir()
    (folder / "sub" / "state.pt").write_bytes(b"optimizer")
    new = make_ours("phi", seed=2)
    save_pretrained(new, folder)
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors", "sub", "tokenizer.json"]
    assert (folder / "tokenizer.json").read_text() == '{"a": 1}'
    assert (folder / "sub" / "state.pt").read_bytes() == b"optimizer"
    _assert_same_model(new, from_pretrained(folder))


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_sharded_save(arch, make_ours, tmp_path):
    model = make_ours(arch, seed=3)
    model.save_pretrained(tmp_path, max_shard_size="60KB")
    shards = sorted(p.name for p in tmp_path.glob("model-*.safetensors"))
    assert len(shards) > 2 and not (tmp_path / "model.safetensors").exists()
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(shards)
    for shard in shards:  # a shard over the limit holds one larger tensor alone
        with safe_open(tmp_path / shard, framework="pt") as f:
            sizes = [f.get_tensor(n).numel() * 4 for n in f.keys()]
        assert sum(sizes) <= 60_000 or len(sizes) == 1
    _assert_same_model(model, from_pretrained(tmp_path))
    save_pretrained(model, tmp_path)  # and back to one file: the shards go
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]


def test_save_pretrained_arguments(make_ours, tmp_path):
    model = make_ours("llama", seed=4)
    model.save_pretrained(tmp_path / "no", is_main_process=False)
    assert not (tmp_path / "no").exists()
    state = {k: v + 1 for k, v in model.state_dict().items()}
    model.save_pretrained(tmp_path / "sd", state_dict=state)  # what transformers' Trainer passes
    loaded = from_pretrained(tmp_path / "sd")
    assert torch.equal(loaded.lm_head.weight, model.lm_head.weight + 1)
    with pytest.raises(ValueError, match="missing"):
        model.save_pretrained(tmp_path / "bad", state_dict={})
    with pytest.raises(ValueError, match="safetensors"):
        model.save_pretrained(tmp_path / "bad", safe_serialization=False)
    with pytest.raises(ValueError, match="max_shard_size"):
        model.save_pretrained(tmp_path / "bad", max_shard_size="lots")
    assert not (tmp_path / "bad").exists()


# ----------------------------------------------------------------------------- corrupt files


def test_error_corrupt_config_names_the_file(saved):
    (saved / "config.json").write_text('{"model_type": "llama", ')
    with pytest.raises(CheckpointError, match=r"config\.json is not valid JSON"):
        from_pretrained(saved)
    (saved / "config.json").write_text("[1, 2]")
    with pytest.raises(CheckpointError, match=r"config\.json must hold a JSON object"):
        from_pretrained(saved)


def test_error_unsupported_config_value_names_the_file(saved):
    _edit_config(saved, hidden_act="gelu")
    with pytest.raises(ValueError, match=r"config\.json: config hidden_act='gelu' is not supported"):
        from_pretrained(saved)


def test_error_corrupt_index_names_the_file(saved):
    _shard(saved, 2, index=True)
    (saved / "model.safetensors.index.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"model\.safetensors\.index\.json is not valid JSON"):
        from_pretrained(saved)
    (saved / "model.safetensors.index.json").write_text('{"weight_map": [1]}')
    with pytest.raises(CheckpointError, match="no 'weight_map' object"):
        from_pretrained(saved)


@pytest.mark.parametrize("how", ["garbage", "truncated"])
def test_error_corrupt_safetensors_names_the_file(how, saved):
    file = saved / "model.safetensors"
    data = file.read_bytes()
    file.write_bytes(b"\x00\x01garbage" * 3 if how == "garbage" else data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"model\.safetensors"):
        from_pretrained(saved)


@pytest.mark.parametrize("entry", ["../outside.safetensors", "/tmp/outside.safetensors", "sub/x.safetensors", ".."])
def test_error_index_entry_outside_the_folder(entry, saved):
    _shard(saved, 2, index=True)
    index = json.loads((saved / "model.safetensors.index.json").read_text())
    name = next(iter(index["weight_map"]))
    index["weight_map"][name] = entry
    (saved / "model.safetensors.index.json").write_text(json.dumps(index))
    (saved.parent / "outside.safetensors").write_bytes((saved / "model-00001-of-00002.safetensors").read_bytes())
    with pytest.raises(CheckpointError, match="entries must be file names in the checkpoint folder"):
        from_pretrained(saved)


@pytest.mark.parametrize("indexed", [True, False])
def test_error_symlink_out_of_the_folder(indexed, saved, tmp_path_factory):
    _shard(saved, 2, index=indexed)
    elsewhere = tmp_path_factory.mktemp("elsewhere") / "w.safetensors"
    (saved / "model-00002-of-00002.safetensors").rename(elsewhere)
    (saved / "model-00002-of-00002.safetensors").symlink_to(elsewhere)
    with pytest.raises(CheckpointError, match="points outside the checkpoint folder"):
        from_pretrained(saved)


def test_hub_cache_symlinks_load(make_ours, tmp_path):
    # The Hugging Face hub cache: snapshots/<rev>/<file> are links into ../../blobs.
    model = make_ours("llama", seed=5)
    save_pretrained(model, tmp_path / "staging")
    snap, blobs = tmp_path / "models--x--y" / "snapshots" / "abc", tmp_path / "models--x--y" / "blobs"
    snap.mkdir(parents=True)
    blobs.mkdir()
    for i, f in enumerate(sorted((tmp_path / "staging").iterdir())):
        f.rename(blobs / f"blob{i}")
        (snap / f.name).symlink_to(Path("..") / ".." / "blobs" / f"blob{i}")
    _assert_same_model(model, from_pretrained(snap))
