"""The main job runs end to end on a tiny setting and writes its metrics."""

import json

import pytest

from collider_models.cli.train import main


def test_collider_train_tiny_run(tmp_path, capsys):
    rc = main(["--preset", "tinyllama-tiny", "--steps", "3", "--batch-size", "2", "--seq-len", "16",
               "--timing-repeats", "1", "--reference-steps", "2", "--out", str(tmp_path)])
    assert rc == 0
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert len(metrics["history"]) == 3
    assert all(h["filtered_loss"] > 0 for h in metrics["history"])
    t = metrics["timing"]
    assert t["masked"]["backward"] > 0 and t["collider"]["backward"] > 0
    assert 0 < t["keep_fraction"] < 1
    out = capsys.readouterr().out
    assert "Collider" in out and "dense (masked loss)" in out


def test_collider_train_rejects_bad_keep(tmp_path):
    with pytest.raises(SystemExit, match="--keep"):
        main(["--keep", "0", "--out", str(tmp_path)])
