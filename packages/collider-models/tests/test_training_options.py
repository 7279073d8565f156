"""Settings are checked before any training, each error naming the option."""

import pytest
import torch

from collider_models.training.config import TrainConfig, check_device, check_options, check_out
from collider_models.training.loop import FINAL_LR_SHARE, lr_lambda


@pytest.mark.parametrize("change, message", [
    ({"keep": 0.005, "batch_size": 2, "seq_len": 16}, "--keep 0.005 keeps no token of a micro-batch of 30"),
    ({"keep": 1.5}, r"--keep must be in \(0, 1\]"),
    ({"selection": "top"}, "--selection must be one of"),
    ({"precision": "fp16"}, "--precision must be one of"),
    ({"seq_len": 1}, "--seq-len must be >= 2"),
    ({"grad_accum": 0}, "--grad-accum must be >= 1"),
    ({"warmup": -1}, "--warmup must be >= 0"),
    ({"lr": 0.0}, "--lr must be > 0"),
    ({"model": "no-such-model"}, "--model: 'no-such-model' is neither a preset"),
    ({"reference": "none"}, "--selection excess scores tokens against a reference model"),
    ({"selection": "loss", "reference": "tinyllama-tiny"}, "--reference is only used by --selection excess"),
    ({"selection": "loss", "reference_data": ["x.txt"]}, "--reference-data trains the reference model"),
    ({"device": "tpu"}, "--device must be cpu or cuda"),
])
def test_bad_options(change, message):
    with pytest.raises(ValueError, match=message):
        check_options(TrainConfig(**change))


def test_smallest_keep_that_keeps_a_token_passes():
    check_options(TrainConfig(keep=0.02, batch_size=2, seq_len=16))  # round(0.6) = 1 of 30


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA GPU")
def test_cuda_without_a_gpu_is_said_plainly():
    with pytest.raises(ValueError, match="--device cuda: no CUDA GPU is available here"):
        check_device("cuda")


def test_out_must_be_writable_and_hold_no_run(tmp_path):
    check_out(tmp_path / "new", resume=False)
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match="exists and is not a folder"):
        check_out(tmp_path / "file", resume=False)
    (tmp_path / "run" / "final").mkdir(parents=True)
    with pytest.raises(ValueError, match="already holds a run"):
        check_out(tmp_path / "run", resume=False)
    check_out(tmp_path / "run", resume=True)
    with pytest.raises(ValueError, match="--out .* is not writable"):
        check_out(tmp_path / "file" / "sub", resume=False)


def test_learning_rate_schedule_warms_up_then_decays():
    f = lr_lambda(warmup=4, steps=20)
    assert [round(f(s), 3) for s in range(4)] == [0.2, 0.4, 0.6, 0.8]
    assert f(4) == pytest.approx(1.0)
    assert f(12) == pytest.approx(FINAL_LR_SHARE + (1 - FINAL_LR_SHARE) * 0.5)
    assert f(20) == pytest.approx(FINAL_LR_SHARE) and f(25) == pytest.approx(FINAL_LR_SHARE)


def test_stop_request_takes_the_first_signal_and_aborts_on_a_late_second(monkeypatch):
    import os
    import signal

    from collider_models.training import interrupt

    with interrupt.StopRequest(announce=False) as stop:
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGINT)  # a repeat at once (torchrun forwards it): still a stop request
        assert stop.requested
        monkeypatch.setattr(interrupt, "REPEAT_S", -1.0)
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
