"""Multi-query associative recall (MQAR; Arora et al. 2023, "Zoology"), the recall test of the GLA paper (Fig. 4).

A sequence starts with num_kv_pairs key-value pairs (keys from the lower half of the vocabulary, values from the
upper half), then keys are queried again at positions whose distance from the context follows a power law; the
model must emit the key's value at the token after each query. Only those positions are scored. Everything else
is random filler, so the task measures recall from the state, not language modelling.

    gla eval mqar --mixers gla,softmax,retnet,linear --d-model 64,128 --seq-len 64 --kv-pairs 4 --steps 400 --json
"""
from __future__ import annotations

import json
import math
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


def _loss_and_acc(model, x, y):
    h, _ = model.features(x)
    scored = y != IGNORE
    logits = model.lm_head(h[scored])
    target = y[scored]
    return F.cross_entropy(logits.float(), target), (logits.argmax(-1) == target).float().mean()


def train_mqar(mixer: str, d_model: int, seq_len: int, kv_pairs: int, lr: float, steps: int = 400,
               batch_size: int = 64, n_test: int = 1000, vocab_size: int = 8192, n_heads: int | None = None,
               seed: int = 0, device: str = "cpu") -> MQARResult:
    """Train a 2-layer model of one mixer on MQAR and return its accuracy on held-out sequences.

    Every step draws a fresh batch (the same batches for every mixer and learning rate); the test set is fixed.
    """
    torch.manual_seed(seed)
    x_te, y_te = make_mqar(n_test, seq_len, kv_pairs, vocab_size, seed=seed + 10 ** 6)
    heads = n_heads or max(1, d_model // 64)
    model = GLATransformer(vocab_size, d_model, heads, 2 * d_model, 2, max_seq_len=seq_len, dropout=0.0,
                           layer_mixers=(mixer, mixer)).to(device)
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
    return MQARResult(mixer, d_model, seq_len, kv_pairs, lr, correct / total, steps, time.perf_counter() - t0)


def sweep(mixers, d_models, seq_len, kv_pairs, lrs, steps, batch_size=64, vocab_size=8192, device="cpu",
          log=print):
    """Best accuracy over the learning rates for every (mixer, d_model): a list of MQARResult."""
    best = []
    for mixer in mixers:
        for d in d_models:
            runs = [train_mqar(mixer, d, seq_len, kv_pairs, lr, steps, batch_size, vocab_size=vocab_size,
                               device=device) for lr in lrs]
            top = max(runs, key=lambda r: r.accuracy)
            log(json.dumps(top.__dict__))
            best.append(top)
    return best


def markdown_table(results) -> str:
    mixers = list(dict.fromkeys(r.mixer for r in results))
    dims = sorted({r.d_model for r in results})
    acc = {(r.mixer, r.d_model): r.accuracy for r in results}
    lines = ["| mixer | " + " | ".join(f"d={d}" for d in dims) + " |", "|---|" + "---|" * len(dims)]
    for m in mixers:
        lines.append(f"| {m} | " + " | ".join(f"{100 * acc[(m, d)]:.1f}%" if (m, d) in acc else "–" for d in dims)
                     + " |")
    return "\n".join(lines)


def plot(results, path: str, title: str) -> None:
    """Accuracy vs d_model per mixer, saved as PNG (needs matplotlib: pip install "gla[train]")."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise ImportError('plotting needs matplotlib: pip install "gla[train]"') from e
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for m in dict.fromkeys(r.mixer for r in results):
        pts = sorted((r.d_model, r.accuracy) for r in results if r.mixer == m)
        ax.plot([p[0] for p in pts], [100 * p[1] for p in pts], marker="o", label=m)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("d_model")
    ax.set_ylabel("MQAR accuracy (%)")
    ax.set_title(title)
    ax.set_ylim(0, 102)
    ax.legend()
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
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--kv-pairs", type=int, default=4)
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lrs", default="1e-3,3e-3", help="learning rates swept; the best is reported")
    p.add_argument("--vocab-size", type=int, default=8192, help="Zoology's setting; smaller is faster to learn")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default=None, help="directory for mqar.md, mqar.png and mqar.jsonl")
    p.add_argument("--json", action="store_true", help="print one JSON record per (mixer, d_model) only")


def run(args) -> list:
    from gla.layers.block import MIXERS

    mixers = [m for m in args.mixers.split(",") if m]
    unknown = [m for m in mixers if m not in MIXERS]
    if unknown:
        raise SystemExit(f"gla eval mqar: unknown mixers {unknown}; choose from {list(MIXERS)}")
    lrs = [float(x) for x in args.lrs.split(",") if x]
    log = print if args.json else (lambda line: print(f"  {line}", flush=True))
    results = sweep(mixers, _ints(args.d_model), args.seq_len, args.kv_pairs, lrs, args.steps, args.batch_size,
                    args.vocab_size, args.device, log)
    title = f"MQAR, T={args.seq_len}, {args.kv_pairs} KV pairs, {args.steps} steps"
    table = markdown_table(results)
    if not args.json:
        print(f"\n{title}\n\n{table}")
    if args.out:
        import os

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
