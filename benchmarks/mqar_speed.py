"""Training throughput of the MQAR grid on one GPU: eager vs captured CUDA graphs, fp32 vs bf16, alone and in groups.

Every variant trains real models (gla.eval.mqar.train_group) for --steps steps after an untimed warm-up that
compiles the kernels; the table gives wall ms per step of the group and model-steps per second (the grid's
throughput). vocab 8192, batch 256, short convolutions, as in the GPU grid of docs/results.md.

    python benchmarks/mqar_speed.py [--steps 300] [--out DIR]
    python benchmarks/mqar_speed.py --profile gla [--seq-len 64 --kv-pairs 4 --d-model 128]   (top CUDA kernels)
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from gla.eval.mqar import train_group  # noqa: E402

MIXERS = ("softmax", "gla", "retnet", "linear")
LRS = (3e-4, 1e-3, 3e-3, 1e-2)


def variants():
    """(name, task, specs, graphs, precision): one model alone, then the groups the grid would use."""
    one = [dict(mixer="gla", d_model=128, lr=1e-3)]
    lr_group = [dict(mixer=m, d_model=128, lr=lr) for m in MIXERS for lr in LRS]
    task_group = [dict(mixer=m, d_model=d, lr=lr) for m in MIXERS for d in (64, 128, 256) for lr in LRS]
    for task in ((64, 4), (256, 16)):
        for precision in ("fp32", "bf16"):
            yield f"gla d=128 alone, eager, {precision}", task, one, False, precision
            yield f"gla d=128 alone, graphs, {precision}", task, one, True, precision
            yield f"16 models (4 mixers x 4 lrs, d=128), eager, {precision}", task, lr_group, False, precision
            yield f"16 models (4 mixers x 4 lrs, d=128), graphs, {precision}", task, lr_group, True, precision
        yield "48 models (4 mixers x 3 widths x 4 lrs), graphs, bf16", task, task_group, True, "bf16"


COMMON = dict(batch_size=256, vocab_size=8192, device="cuda", short_conv=True, n_test=256)


def profile(mixer: str, seq_len: int, kv_pairs: int, d_model: int) -> None:
    """The CUDA kernels of 20 eager training steps of one model, by total device time."""
    from torch.profiler import ProfilerActivity, profile as prof

    spec = [dict(mixer=mixer, d_model=d_model, lr=1e-3)]
    train_group(spec, seq_len, kv_pairs, steps=5, graphs=False, **COMMON)
    with prof(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as pr:
        train_group(spec, seq_len, kv_pairs, steps=20, graphs=False, **COMMON)
    print(pr.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=70))


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--out", default=None)
    p.add_argument("--profile", metavar="MIXER", default=None)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--kv-pairs", type=int, default=4)
    p.add_argument("--d-model", type=int, default=128)
    args = p.parse_args()
    if args.profile:
        return profile(args.profile, args.seq_len, args.kv_pairs, args.d_model)
    warmed = set()
    rows = []
    for name, (t, kv), specs, graphs, precision in variants():
        if (t, kv, precision) not in warmed:  # compile every kernel of this shape once, untimed
            train_group([dict(mixer=m, d_model=d, lr=1e-3) for m in MIXERS for d in (64, 128, 256)], t, kv,
                        steps=5, precision=precision, **COMMON)
            warmed.add((t, kv, precision))
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        res = train_group(specs, t, kv, steps=args.steps, graphs=graphs, precision=precision, **COMMON)
        torch.cuda.synchronize()
        ms = 1e3 * (time.perf_counter() - t0) / args.steps
        row = dict(task=f"T={t}, {kv} pairs", variant=name, models=len(specs), ms_per_step=round(ms, 2),
                   model_steps_per_s=round(1e3 * len(specs) / ms, 1),
                   mem_gib=round(torch.cuda.max_memory_allocated() / 2 ** 30, 1),
                   best_final_loss=round(min(r.final_loss for r in res), 3))
        torch.cuda.reset_peak_memory_stats()
        rows.append(row)
        print(json.dumps(row), flush=True)
    lines = ["| task | variant | models | ms/step | model-steps/s | peak GiB |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['task']} | {r['variant']} | {r['models']} | {r['ms_per_step']} | {r['model_steps_per_s']} | "
              f"{r['mem_gib']} |" for r in rows]
    table = "\n".join(lines)
    print(f"\n{torch.cuda.get_device_name()}, {args.steps} steps (incl. capture and a 256-row eval)\n\n{table}")
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "mqar_speed.md"), "w") as f:
            f.write(table + "\n")


if __name__ == "__main__":
    main()
