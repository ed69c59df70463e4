"""Multi-query associative recall (MQAR; Arora et al. 2023, "Zoology"), the recall test of the GLA paper (Fig. 4).

A sequence starts with num_kv_pairs key-value pairs (keys from the lower half of the vocabulary, values from the
upper half), then keys are queried again at positions whose distance from the context follows a power law; the
model must emit the key's value at the token after each query. Only those positions are scored. Everything else
is random filler, so the task measures recall from the state, not language modelling.

    gla eval mqar --mixers gla,softmax,retnet,linear --d-model 64,128 --seq-len 64 --kv-pairs 4 --steps 400 --json
    gla eval mqar --device cuda --jobs 12 --d-model 64,128,256 --seq-len 64,128,256 --kv-pairs 4,8,16 ...  (the grid)
"""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from gla.models import GLATransformer

IGNORE = -100


def make_mqar(n: int, seq_len: int, kv_pairs: int, vocab_size: int = 8192, power_a: float = 0.01, seed: int = 0):
    """n MQAR sequences -> (inputs [n, seq_len] long, labels [n, seq_len] long with IGNORE where unscored)."""
    if 4 * kv_pairs > seq_len:
        raise ValueError(f"seq_len={seq_len} is too short for {kv_pairs} key-value pairs and their queries")
    if vocab_size < 4 * kv_pairs + 2:
        raise ValueError(f"vocab_size={vocab_size} is too small for {kv_pairs} distinct keys and values")
    g = torch.Generator().manual_seed(seed)
    half = vocab_size // 2
    keys = torch.randint(1, half, (n, kv_pairs), generator=g)
    while True:  # distinct keys per row: redraw the few rows with a repeat
        srt = keys.sort(1).values
        dup = (srt[:, 1:] == srt[:, :-1]).any(1).nonzero().squeeze(1)
        if dup.numel() == 0:
            break
        keys[dup] = torch.randint(1, half, (dup.numel(), kv_pairs), generator=g)
    values = torch.randint(half, vocab_size, (n, kv_pairs), generator=g)
    ctx = 2 * kv_pairs
    seq = torch.randint(1, vocab_size, (n, seq_len + 1), generator=g)
    seq[:, 0:ctx:2], seq[:, 1:ctx:2] = keys, values
    # Query slots sit at ctx + 2*gap; gaps drawn without replacement with probability ~ gap^(power_a - 1).
    slots = (seq_len + 1 - ctx) // 2
    p = power_a * torch.arange(1, slots + 1, dtype=torch.float64) ** (power_a - 1)
    gaps = torch.multinomial(p.expand(n, slots), kv_pairs, replacement=False, generator=g)
    pos = ctx + 2 * gaps  # [n, kv_pairs]
    which = torch.rand(n, kv_pairs, generator=g).argsort(1)
    rows = torch.arange(n).unsqueeze(1)
    seq[rows, pos] = keys.gather(1, which)
    labels = torch.full_like(seq, IGNORE)
    labels[rows, pos + 1] = values.gather(1, which)
    seq[rows, pos + 1] = values.gather(1, which)
    return seq[:, :-1], labels[:, 1:]


@dataclass
class MQARResult:
    """One trained model's held-out accuracy on the scored (query) positions."""
    mixer: str
    d_model: int
    seq_len: int
    kv_pairs: int
    lr: float
    accuracy: float
    steps: int
    seconds: float
    short_conv: bool = False


def _loss_and_acc(model, x, y):
    h, _ = model.features(x)
    scored = y != IGNORE
    logits = model.lm_head(h[scored])
    target = y[scored]
    return F.cross_entropy(logits.float(), target), (logits.argmax(-1) == target).float().mean()


def train_mqar(mixer: str, d_model: int, seq_len: int, kv_pairs: int, lr: float, steps: int = 400,
               batch_size: int = 64, n_test: int = 1000, vocab_size: int = 8192, n_heads: int | None = None,
               seed: int = 0, device: str = "cpu", short_conv: bool = False) -> MQARResult:
    """Train a 2-layer model of one mixer on MQAR and return its accuracy on held-out sequences.

    Every step draws a fresh batch (the same batches for every mixer and learning rate); the test set is fixed.
    """
    torch.manual_seed(seed)
    x_te, y_te = make_mqar(n_test, seq_len, kv_pairs, vocab_size, seed=seed + 10 ** 6)
    heads = n_heads or max(1, d_model // 64)
    model = GLATransformer(vocab_size, d_model, heads, 2 * d_model, 2, max_seq_len=seq_len, dropout=0.0,
                           layer_mixers=(mixer, mixer), use_short_conv=short_conv).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1, betas=(0.9, 0.98))
    warm = max(1, steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    t0 = time.perf_counter()
    model.train()
    for step in range(steps):
        x, y = make_mqar(batch_size, seq_len, kv_pairs, vocab_size, seed=seed + step)
        loss, _ = _loss_and_acc(model, x.to(device), y.to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
    model.eval()
    correct = total = 0
    with torch.no_grad():
        for s in range(0, n_test, 256):
            x, y = x_te[s:s + 256].to(device), y_te[s:s + 256].to(device)
            _, acc = _loss_and_acc(model, x, y)
            n = int((y != IGNORE).sum())
            correct, total = correct + acc.item() * n, total + n
    return MQARResult(mixer, d_model, seq_len, kv_pairs, lr, correct / total, steps, time.perf_counter() - t0,
                      short_conv)


def _train_in_worker(spec: dict, threads: int) -> MQARResult:
    torch.set_num_threads(threads)  # the workers share the machine's cores
    return train_mqar(**spec)


def sweep(mixers, d_models, tasks, lrs, steps, batch_size=64, vocab_size=8192, device="cpu", short_conv=False,
          jobs=1, on_run=None) -> list:
    """Best accuracy over the learning rates for every (task, mixer, d_model): a list of MQARResult in that order.

    tasks: [(seq_len, kv_pairs), ...]. jobs > 1 trains that many models at once in spawned processes (small models
    leave a GPU mostly idle, so this multiplies the throughput of a grid). on_run(result) sees every trained model
    as it finishes, so a grid stopped midway keeps what it had.
    """
    specs = [dict(mixer=m, d_model=d, seq_len=t, kv_pairs=kv, lr=lr, steps=steps, batch_size=batch_size,
                  vocab_size=vocab_size, device=device, short_conv=short_conv)
             for t, kv in tasks for m in mixers for d in d_models for lr in lrs]
    on_run = on_run or (lambda r: None)
    runs = [None] * len(specs)  # kept in spec order, whatever order the workers finish in
    if jobs <= 1:
        for i, spec in enumerate(specs):
            runs[i] = train_mqar(**spec)
            on_run(runs[i])
    else:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor, as_completed

        threads = max(1, (os.cpu_count() or 1) // jobs)
        with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            index = {pool.submit(_train_in_worker, spec, threads): i for i, spec in enumerate(specs)}
            for fut in as_completed(index):
                runs[index[fut]] = fut.result()
                on_run(runs[index[fut]])
    return best_per_cell(runs)


def _cell(r) -> tuple:
    """A table cell: one task at one training budget, one mixer, one width (learning rates compete within it)."""
    return r.seq_len, r.kv_pairs, r.steps, r.mixer, r.d_model


def best_per_cell(runs) -> list:
    """The best run of each cell, cells in the order they first appear in ``runs``."""
    best = {}
    for r in runs:
        if _cell(r) not in best or r.accuracy > best[_cell(r)].accuracy:
            best[_cell(r)] = r
    return list(best.values())


def load_runs(paths) -> list:
    """MQARResult records from mqar-runs.jsonl files (a clear error for a missing or malformed file)."""
    runs = []
    for path in paths:
        with open(path) as f:
            for n, line in enumerate(f, 1):
                try:
                    runs.append(MQARResult(**json.loads(line)))
                except (json.JSONDecodeError, TypeError) as e:
                    raise ValueError(f"{path}:{n}: not an MQAR run record ({e})") from None
    if not runs:
        raise ValueError(f"no MQAR runs in {', '.join(paths)}")
    return runs


def _tasks(results) -> list:
    return list(dict.fromkeys((r.seq_len, r.kv_pairs, r.steps) for r in results))


def markdown_table(results) -> str:
    """One table per (seq_len, kv_pairs, steps): rows are mixers, columns d_model, cells the best accuracy."""
    dims = sorted({r.d_model for r in results})
    acc = {_cell(r): r.accuracy for r in results}
    parts = []
    for task in _tasks(results):
        t, kv, steps = task
        mixers = list(dict.fromkeys(r.mixer for r in results if _cell(r)[:3] == task))
        lines = [f"T={t}, {kv} KV pairs, {steps} steps:", "", "| mixer | " + " | ".join(f"d={d}" for d in dims) + " |",
                 "|---|" + "---|" * len(dims)]
        for m in mixers:
            cells = [f"{100 * acc[(*task, m, d)]:.1f}%" if (*task, m, d) in acc else "–" for d in dims]
            lines.append(f"| {m} | " + " | ".join(cells) + " |")
        parts.append("\n".join(lines))
    return "\n\n".join(parts)


def plot(results, path: str, title: str) -> None:
    """Accuracy vs d_model per mixer, one panel per task, saved as PNG (needs matplotlib: pip install "gla[train]")."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise ImportError('plotting needs matplotlib: pip install "gla[train]"') from e
    tasks = _tasks(results)
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.5 * len(tasks), 3.5), squeeze=False)
    for ax, (t, kv, steps) in zip(axes[0], tasks):
        sub = [r for r in results if _cell(r)[:3] == (t, kv, steps)]
        for m in dict.fromkeys(r.mixer for r in sub):
            pts = sorted((r.d_model, r.accuracy) for r in sub if r.mixer == m)
            ax.plot([p[0] for p in pts], [100 * p[1] for p in pts], marker="o", label=m)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("d_model")
        ax.set_ylabel("MQAR accuracy (%)")
        ax.set_title(f"T={t}, {kv} KV pairs, {steps} steps")
        ax.set_ylim(0, 102)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _ints(s: str):
    return [int(x) for x in s.split(",") if x]


def add_arguments(p) -> None:
    """Flags of `gla eval mqar` (shared by the CLI and ``python -m gla.eval.mqar``)."""
    p.add_argument("--mixers", default="gla,softmax,retnet,linear",
                   help="comma-separated token mixers: gla, softmax, retnet, linear, seed")
    p.add_argument("--d-model", default="64,128", help="comma-separated model widths")
    p.add_argument("--seq-len", default="64", help="comma-separated; paired in order with --kv-pairs")
    p.add_argument("--kv-pairs", default="4", help="comma-separated, one per --seq-len")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lrs", default="1e-3,3e-3", help="learning rates swept; the best is reported")
    p.add_argument("--vocab-size", type=int, default=8192, help="Zoology's setting; smaller is faster to learn")
    p.add_argument("--short-conv", action="store_true", help="a short causal convolution before each linear mixer")
    p.add_argument("--device", default="cpu")
    p.add_argument("--jobs", type=int, default=1, help="models trained at once, in separate processes")
    p.add_argument("--out", default=None,
                   help="directory for mqar.md, mqar.png, mqar.jsonl (best per cell) and mqar-runs.jsonl (every run)")
    p.add_argument("--json", action="store_true", help="print one JSON record per (task, mixer, d_model) only")
    p.add_argument("--from-runs", nargs="+", metavar="JSONL",
                   help="train nothing: tabulate and plot mqar-runs.jsonl files (a grid split over several calls)")


def _train_grid(args) -> tuple:
    """Train the grid the flags describe; returns (best per cell, title)."""
    from gla.layers.block import MIXERS

    mixers = [m for m in args.mixers.split(",") if m]
    unknown = [m for m in mixers if m not in MIXERS]
    if unknown:
        raise SystemExit(f"gla eval mqar: unknown mixers {unknown}; choose from {list(MIXERS)}")
    seq_lens, kv_pairs = _ints(args.seq_len), _ints(args.kv_pairs)
    if len(seq_lens) != len(kv_pairs):
        raise SystemExit(f"gla eval mqar: --seq-len {args.seq_len} and --kv-pairs {args.kv_pairs} must pair up")
    for t, kv in zip(seq_lens, kv_pairs):
        make_mqar(1, t, kv, args.vocab_size)  # bad task settings fail here, before any training
    lrs = [float(x) for x in args.lrs.split(",") if x]
    runs_log = None
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        runs_log = open(os.path.join(args.out, "mqar-runs.jsonl"), "w")

    def on_run(r):
        if runs_log:
            runs_log.write(json.dumps(r.__dict__) + "\n")
            runs_log.flush()
        if not args.json:
            print(f"  {json.dumps(r.__dict__)}", flush=True)

    try:
        results = sweep(mixers, _ints(args.d_model), list(zip(seq_lens, kv_pairs)), lrs, args.steps, args.batch_size,
                        args.vocab_size, args.device, args.short_conv, args.jobs, on_run)
    finally:
        if runs_log:
            runs_log.close()
    conv = ", short conv" if args.short_conv else ""
    return results, f"MQAR, vocab {args.vocab_size}, {args.steps} steps of batch {args.batch_size}{conv}"


def run(args) -> list:
    if args.from_runs:
        runs = load_runs(args.from_runs)
        results, title = best_per_cell(runs), f"MQAR, best learning rate of {len(runs)} runs"
    else:
        results, title = _train_grid(args)
    table = markdown_table(results)
    if args.json:
        for r in results:
            print(json.dumps(r.__dict__))
    else:
        print(f"\n{title}\n\n{table}")
    if args.out:
        from gla.bench import write_report
        write_report(args.out, "mqar", f"{title}\n\n{table}")
        with open(os.path.join(args.out, "mqar.jsonl"), "w") as f:
            f.writelines(json.dumps(r.__dict__) + "\n" for r in results)
        plot(results, os.path.join(args.out, "mqar.png"), title)
    return results


def main(argv=None):
    import argparse

    p = argparse.ArgumentParser(prog="gla eval mqar", description="MQAR recall across token mixers")
    add_arguments(p)
    run(p.parse_args(argv))


if __name__ == "__main__":
    main()
