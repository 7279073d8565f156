"""``ColliderTrainer`` under DDP: two processes (``torchrun``, gloo, CPU) end each step with the
parameters of one process trained on the concatenated batch — the kept-token count of the
step is summed over ranks — their parameters stay identical, and a rank that keeps nothing
neither hangs nor changes the result.

Run by pytest; ``torchrun`` runs this file itself as the worker.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="ColliderTrainer needs transformers")

PER_RANK, T, STEPS = 2, 12, 2
CASES = ("ragged", "rank 1 keeps nothing")


def _data(case: str) -> list[dict]:
    """2 × PER_RANK right-padded examples; with the sequential sampler rank r gets the r-th half."""
    gen = torch.Generator().manual_seed(0)
    rows = []
    for i, length in enumerate([12, 9, 11, 7][: 2 * PER_RANK]):
        ids = torch.randint(1, 512, (T,), generator=gen)
        mask = (torch.arange(T) < length).long()
        labels = ids.clone()
        if case == "rank 1 keeps nothing" and i >= PER_RANK:
            labels[:] = -100
        rows.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return rows


def _train(case: str, out_dir: Path, per_device: int) -> dict[str, torch.Tensor]:
    """STEPS plain-SGD steps (no clipping, so gradient scale errors show) of a tiny Llama."""
    from collider_models.hf import ColliderTrainer
    from collider_models.presets import preset_config

    torch.manual_seed(0)
    config = transformers.AutoConfig.for_model(**preset_config("tinyllama-tiny"))
    hf = transformers.AutoModelForCausalLM.from_config(config)
    args = transformers.TrainingArguments(
        output_dir=str(out_dir), per_device_train_batch_size=per_device, max_steps=STEPS, optim="sgd",
        learning_rate=1.0, max_grad_norm=0.0, lr_scheduler_type="constant", train_sampling_strategy="sequential",
        use_cpu=True, ddp_backend="gloo" if "LOCAL_RANK" in os.environ else None,  # set under torchrun
        report_to="none", save_strategy="no", disable_tqdm=True, seed=0,
    )
    trainer = ColliderTrainer(model=hf, args=args, train_dataset=_data(case), keep=0.6, selection="loss",
                              per="sequence")  # per-sequence top-k: the same choice however batches are split
    trainer.train()
    return {n: p.detach().clone() for n, p in hf.named_parameters()}


def _worker(out: Path) -> None:
    import torch.distributed as dist

    for case in CASES:
        params = _train(case, out / "run", PER_RANK)
        flat = torch.cat([p.reshape(-1) for p in params.values()])
        gathered = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
        dist.all_gather(gathered, flat)
        if dist.get_rank() == 0:
            assert all(torch.equal(g, flat) for g in gathered), f"{case}: ranks drifted apart"
            torch.save(params, out / f"{case}.pt")
    dist.barrier()
    dist.destroy_process_group()  # exit with no collective threads left running


def test_ddp_steps_equal_one_process_on_the_concatenated_batch(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", __file__, str(tmp_path)]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, (run.stdout + run.stderr)[-4000:]
    for case in CASES:
        ddp = torch.load(tmp_path / f"{case}.pt")
        single = _train(case, tmp_path / "single", 2 * PER_RANK)
        assert ddp.keys() == single.keys()
        for name in single:
            torch.testing.assert_close(ddp[name], single[name], rtol=1e-5, atol=1e-7, msg=f"{case}: {name}")


if __name__ == "__main__":
    _worker(Path(sys.argv[1]))
