"""DDP and FSDP2 in 2 gloo processes on CPU: the same losses as one process with the same global batch, and a
checkpoint written by 2 FSDP ranks resumes in one process."""
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from gla.training import TrainConfig, resume_config, train
from gla.training import report


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, cfg: dict):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    train(TrainConfig(**cfg), progress=False)


def _run_2proc(cfg: TrainConfig):
    mp.start_processes(_worker, args=(2, _free_port(), cfg.to_dict()), nprocs=2, start_method="spawn")


def _curve(out):
    recs = report.read_metrics(str(out))
    return [r["loss"] for r in recs if "loss" in r] + [r["val_loss"] for r in recs if "val_loss" in r]


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_processes_match_one(tmp_path, small_text, parallel):
    base = dict(data=small_text, preset="tiny", seq_len=32, batch_size=4, steps=4, lr=3e-3, warmup=1,
                eval_every=4, eval_batches=1, log_every=1, sample_tokens=0, device="cpu")
    train(TrainConfig(out=str(tmp_path / "one"), **base), progress=False)
    _run_2proc(TrainConfig(out=str(tmp_path / parallel), parallel=parallel, **{**base, "sample_tokens": 8}))
    one, two = _curve(tmp_path / "one"), _curve(tmp_path / parallel)
    assert len(one) == len(two) == 5
    for a, b in zip(one, two):
        assert b == pytest.approx(a, rel=1e-4)
    if parallel == "fsdp":   # the gathered checkpoint resumes on another number of processes
        summary = train(resume_config(str(tmp_path / parallel), {"steps": 6}), resume=True, progress=False)
        assert summary["step"] == 6
