"""Operator benchmark on CPU: chunk vs the recurrent reference, with SDPA causal attention as a reference row.

    python -m gla.bench.ops [--T 4096 --H 4 --K 128 --V 256 --threads 2 --json]

Times are medians of wall-clock repetitions (forward under no_grad; forward+backward with a sum loss).
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

from gla.ops import gated_linear_attention


def median_ms(fn, reps: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def _gla_fns(B, T, H, K, V, backend, device):
    q, k = torch.randn(B, T, H, K, device=device), torch.randn(B, T, H, K, device=device)
    v = torch.randn(B, T, H, V, device=device)
    g = F.logsigmoid(torch.randn(B, T, H, K, device=device)) / 16
    leaves = [x.requires_grad_() for x in (q, k, v, g)]

    def fwd():
        with torch.no_grad():
            gated_linear_attention(q, k, v, g, backend=backend)

    def fwd_bwd():
        o, _ = gated_linear_attention(*leaves, backend=backend)
        o.sum().backward()

    return fwd, fwd_bwd


def _sdpa_fns(B, T, H, K, V, device):
    q, k = torch.randn(B, H, T, K, device=device), torch.randn(B, H, T, K, device=device)
    v = torch.randn(B, H, T, V, device=device)
    leaves = [x.requires_grad_() for x in (q, k, v)]

    def fwd():
        with torch.no_grad():
            F.scaled_dot_product_attention(q, k, v, is_causal=True)

    def fwd_bwd():
        F.scaled_dot_product_attention(*leaves, is_causal=True).sum().backward()

    return fwd, fwd_bwd


def run(B=1, T=4096, H=4, K=128, V=256, threads=2, reps=5, ref_reps=1, device="cpu"):
    """Returns rows {name, fwd_ms, fwd_bwd_ms} for recurrent, chunk and SDPA at one shape."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    rows = []
    for name, fns, n in (("recurrent (reference)", _gla_fns(B, T, H, K, V, "recurrent", device), ref_reps),
                         ("chunk", _gla_fns(B, T, H, K, V, "chunk", device), reps),
                         ("SDPA causal", _sdpa_fns(B, T, H, K, V, device), reps)):
        rows.append({"name": name, "fwd_ms": median_ms(fns[0], n), "fwd_bwd_ms": median_ms(fns[1], n, warmup=1)})
    return rows


def format_table(rows, shape: str) -> str:
    ref = rows[0]
    lines = [f"GLA operator, {shape}", "",
             "| op | fwd ms | fwd+bwd ms | fwd speed-up vs reference | fwd+bwd speed-up vs reference |",
             "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['name']} | {r['fwd_ms']:.1f} | {r['fwd_bwd_ms']:.1f} | "
                     f"{ref['fwd_ms'] / r['fwd_ms']:.1f}x | {ref['fwd_bwd_ms'] / r['fwd_bwd_ms']:.1f}x |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name, default in (("B", 1), ("T", 4096), ("H", 4), ("K", 128), ("V", 256), ("threads", 2), ("reps", 5)):
        p.add_argument(f"--{name}", type=int, default=default)
    p.add_argument("--json", action="store_true", help="print the rows as JSON")
    a = p.parse_args(argv)
    rows = run(a.B, a.T, a.H, a.K, a.V, a.threads, a.reps)
    if a.json:
        print(json.dumps(rows))
    else:
        print(format_table(rows, f"B={a.B} T={a.T} H={a.H} K={a.K} V={a.V} fp32, {a.threads} threads, "
                                 f"torch {torch.__version__}"))


if __name__ == "__main__":
    main()
