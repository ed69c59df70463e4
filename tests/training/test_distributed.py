"""DDP and FSDP2 in 2 gloo processes on CPU: the same losses as one process with the same global batch, a
checkpoint written by 2 FSDP ranks resumes in one process, and 2 ranks that crash and resume reproduce the
uninterrupted run bit for bit."""
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from gla.training import TrainConfig, Trainer, resume_config, train
from gla.training import report


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, cfg: dict, resume: bool, crash_at: int | None):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    if crash_at is not None:
        real_step = Trainer.train_step

        def crashing_step(self):
            if self.step == crash_at:
                # every rank dies here, after the last checkpoint; the barrier lets rank 0 log its last step before
                # the first death makes the launcher kill it
                torch.distributed.barrier()
                raise RuntimeError("power cut")
            return real_step(self)
        Trainer.train_step = crashing_step
    train(resume_config(cfg["out"], {}) if resume else TrainConfig(**cfg), resume=resume, progress=False)


def _run_2proc(cfg: TrainConfig, resume: bool = False, crash_at: int | None = None):
    mp.start_processes(_worker, args=(2, _free_port(), cfg.to_dict(), resume, crash_at), nprocs=2,
                       start_method="spawn")


def _curve(out):
    recs = report.read_metrics(str(out))
    return [r["loss"] for r in recs if "loss" in r] + [r["val_loss"] for r in recs if "val_loss" in r]


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_processes_match_one(tmp_path, small_text, parallel):
    # fp32 (not auto, which takes bf16 on CPUs with AMX): one and two processes are held to 1e-4
    base = dict(data=small_text, preset="tiny", seq_len=32, batch_size=4, steps=4, lr=3e-3, warmup=1,
                eval_every=4, eval_batches=1, log_every=1, sample_tokens=0, device="cpu", dtype="fp32")
    train(TrainConfig(out=str(tmp_path / "one"), **base), progress=False)
    _run_2proc(TrainConfig(out=str(tmp_path / parallel), parallel=parallel, **{**base, "sample_tokens": 8}))
    one, two = _curve(tmp_path / "one"), _curve(tmp_path / parallel)
    assert len(one) == len(two) == 5
    for a, b in zip(one, two):
        assert b == pytest.approx(a, rel=1e-4)
    if parallel == "fsdp":   # the gathered checkpoint resumes on another number of processes
        summary = train(resume_config(str(tmp_path / parallel), {"steps": 6}), resume=True, progress=False)
        assert summary["step"] == 6


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_process_resume_is_exact(tmp_path, small_text, parallel):
    """2 ranks crash after their step-4 checkpoint; resumed on 2 ranks, they reproduce the uninterrupted curve bit
    for bit (dropout on: each rank's RNG stream must survive, and writing a checkpoint must not disturb it)."""
    base = dict(data=small_text, preset="tiny", seq_len=32, batch_size=4, steps=7, lr=3e-3, warmup=1, dropout=0.1,
                eval_every=4, eval_batches=1, log_every=1, sample_tokens=0, device="cpu", dtype="fp32",
                parallel=parallel)
    _run_2proc(TrainConfig(out=str(tmp_path / "full"), **base))
    cut = TrainConfig(out=str(tmp_path / "cut"), **base)
    with pytest.raises(mp.ProcessRaisedException, match="power cut"):
        _run_2proc(cut, crash_at=6)
    assert len(_curve(tmp_path / "cut")) == 6 + 1          # 6 train losses and the step-4 validation
    _run_2proc(cut, resume=True)
    full, resumed = _curve(tmp_path / "full"), _curve(tmp_path / "cut")
    assert len(full) == 7 + 2
    assert resumed == full
