"""Run outputs: metrics.jsonl (one JSON record per line), the loss-curve PNG, samples.txt; progress lines."""
from __future__ import annotations

import json
import math
import os
import sys

METRICS, PLOT, SAMPLES = "metrics.jsonl", "loss.png", "samples.txt"


def say(msg: str, file=None) -> None:
    """A progress line (stderr by default) that does not break a tqdm bar drawn there (gla train's, gla eval
    mqar's); a plain print where tqdm is not installed."""
    file = file or sys.stderr
    try:
        from tqdm import tqdm
    except ImportError:
        print(msg, file=file, flush=True)
        return
    tqdm.write(msg, file=file)


def finite_or_null(record: dict) -> dict:
    """The record with non-finite floats (a skipped step's loss or gradient norm) as None: NaN and Infinity are
    not JSON."""
    return {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in record.items()}


def append_metrics(run_dir: str, record: dict) -> None:
    """One strict JSON line (``finite_or_null``)."""
    with open(os.path.join(run_dir, METRICS), "a") as f:
        f.write(json.dumps(finite_or_null(record), allow_nan=False) + "\n")


def read_metrics(run_dir: str) -> list[dict]:
    path = os.path.join(run_dir, METRICS)
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def truncate_metrics(run_dir: str, step: int) -> None:
    """Keep the records up to `step`: a resumed run rewrites what came after its checkpoint."""
    kept = [r for r in read_metrics(run_dir) if r["step"] <= step]
    tmp = os.path.join(run_dir, f".{METRICS}.tmp")
    with open(tmp, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in kept)
    os.replace(tmp, os.path.join(run_dir, METRICS))


def plot_loss(run_dir: str) -> str | None:
    """loss.png: training loss per logged step and validation loss, in nats per token. None without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    recs = read_metrics(run_dir)
    train = [(r["step"], r["loss"]) for r in recs if r.get("loss") is not None]  # null: a non-finite step
    val = [(r["step"], r["val_loss"]) for r in recs if r.get("val_loss") is not None]
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    if train:
        ax.plot(*zip(*train), lw=1, alpha=0.8, label="train")
    if val:
        ax.plot(*zip(*val), "o-", ms=4, label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats / token)")
    ax.set_title(os.path.basename(os.path.abspath(run_dir)))
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = os.path.join(run_dir, PLOT)
    fig.savefig(path)
    plt.close(fig)
    return path


def write_samples(run_dir: str, samples: list[str]) -> str:
    path = os.path.join(run_dir, SAMPLES)
    with open(path, "w", encoding="utf-8") as f:
        for i, s in enumerate(samples):
            f.write(f"=== sample {i + 1} ===\n{s}\n\n")
    return path
