"""Operator benchmark. CPU: chunk vs the recurrent reference, with SDPA causal attention as a reference row.
CUDA (``--device cuda``): ours vs FLA 0.6.0 chunk_gla vs SDPA causal at the model's shapes, bf16 and fp32 gates
(gla/bench/ops_gpu.py says what is timed and how).

    gla bench ops [--T 4096 --H 4 --K 128 --V 256 --threads 2 --json]
    gla bench ops --device cuda [--fla] [--first-call] [--stages] [--shape B,T,H,K,V ...] [--gates bf16,fp32]
        [--variant NAME=JSON ...] [--baseline DIR] [--out DIR]

CPU times are medians of wall-clock repetitions (forward under no_grad; forward+backward with a sum loss). The floor
row is the recurrence's arithmetic, 4*K*V flops per token and head forward (the state update and the output read,
2*K*V each) and three times that for forward+backward, at the machine's fp32 matmul rate: the median of a 1024^3
product timed three times before each set of repetitions. Each row's time is also given as a multiple of it.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from gla.ops import cpu_kernels, gated_linear_attention


def _seconds(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


class Timer:
    """Medians of wall-clock repetitions, each set preceded by timings of an n^3 fp32 matmul, so that the floor's rate
    is measured beside the operators (a shared CPU's speed drifts over a run). The products run before the warm-up:
    one between repetitions would evict the operator's data from the caches and slow it by ~10%."""

    def __init__(self, n: int = 1024, products: int = 3):
        a, b = torch.randn(n, n), torch.randn(n, n)
        self.product, self.flops, self.products, self.matmul_s = (lambda: a @ b), 2 * n ** 3, products, []

    def median_ms(self, fn, reps: int, warmup: int = 1) -> float:
        self.matmul_s += [_seconds(self.product) for _ in range(self.products)]
        for _ in range(warmup):
            fn()
        return statistics.median(_seconds(fn) for _ in range(reps)) * 1e3

    def gflops(self) -> float:
        """The fp32 matmul rate over every product timed so far, GFLOP/s (their median time)."""
        return self.flops / statistics.median(self.matmul_s) / 1e9


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
        _drop_grads(leaves)

    return fwd, fwd_bwd


def _drop_grads(leaves):
    """As a training step's zero_grad(set_to_none=True): the next backward writes fresh gradients instead of adding
    into the old ones (which would time an extra pass over every input)."""
    for x in leaves:
        x.grad = None


def _sdpa_fns(B, T, H, K, V, device):
    q, k = torch.randn(B, H, T, K, device=device), torch.randn(B, H, T, K, device=device)
    v = torch.randn(B, H, T, V, device=device)
    leaves = [x.requires_grad_() for x in (q, k, v)]

    def fwd():
        with torch.no_grad():
            F.scaled_dot_product_attention(q, k, v, is_causal=True)

    def fwd_bwd():
        F.scaled_dot_product_attention(*leaves, is_causal=True).sum().backward()
        _drop_grads(leaves)

    return fwd, fwd_bwd


def _switched_off(fn):
    def run():
        with cpu_kernels.switched_off():
            fn()
    return run


def run(B=1, T=4096, H=4, K=128, V=256, threads=2, reps=5, ref_reps=1, device="cpu"):
    """Returns rows {name, fwd_ms, fwd_bwd_ms} for the matmul floor, recurrent, chunk and SDPA at one shape."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    timer = Timer()
    rows = []
    chunk = _gla_fns(B, T, H, K, V, "chunk", device)
    cases = [("recurrent (reference)", _gla_fns(B, T, H, K, V, "recurrent", device), ref_reps)]
    if device == "cpu" and cpu_kernels.available():  # the compiled operator beside the PyTorch one it replaces
        cases += [("chunk (compiled)", chunk, reps),
                  ("chunk (PyTorch)", tuple(_switched_off(f) for f in chunk), reps)]
    else:
        cases.append(("chunk", chunk, reps))
    for name, fns, n in cases + [("SDPA causal", _sdpa_fns(B, T, H, K, V, device), reps)]:
        rows.append({"name": name, "fwd_ms": timer.median_ms(fns[0], n),
                     "fwd_bwd_ms": timer.median_ms(fns[1], n, warmup=1)})
    rate = timer.gflops()
    floor = 4 * K * V * B * T * H / rate / 1e6  # ms
    return [{"name": f"floor ({rate:.0f} GFLOP/s fp32 matmul)", "fwd_ms": floor, "fwd_bwd_ms": 3 * floor,
             "gflops": rate}] + rows


def format_table(rows, shape: str) -> str:
    floor, ref = rows[0], rows[1]
    lines = [f"GLA operator, {shape}", "",
             "| op | fwd ms | fwd+bwd ms | fwd speed-up vs reference | fwd+bwd speed-up vs reference | "
             "fwd / floor | fwd+bwd / floor |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        speedup = ("– | –" if r is floor else  # the floor is arithmetic, not an operator
                   f"{ref['fwd_ms'] / r['fwd_ms']:.1f}x | {ref['fwd_bwd_ms'] / r['fwd_bwd_ms']:.1f}x")
        lines.append(f"| {r['name']} | {r['fwd_ms']:.1f} | {r['fwd_bwd_ms']:.1f} | {speedup} | "
                     f"{r['fwd_ms'] / floor['fwd_ms']:.1f}x | {r['fwd_bwd_ms'] / floor['fwd_bwd_ms']:.1f}x |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(prog="gla bench ops", description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    for name, default in (("B", 1), ("T", 4096), ("H", 4), ("K", 128), ("V", 256), ("threads", 2), ("reps", 5)):
        p.add_argument(f"--{name}", type=int, default=default, help="CPU shape and repetitions")
    p.add_argument("--json", action="store_true", help="print the rows as JSON")
    g = p.add_argument_group("cuda")
    g.add_argument("--shape", action="append", help="B,T,H,K,V (repeatable; default: gla.bench.ops_gpu.SHAPES)")
    g.add_argument("--gates", default="bf16,fp32", help="gate dtypes, comma-separated (bf16, fp32)")
    g.add_argument("--fla", action="store_true", help="FLA chunk_gla too (its first call per head shape autotunes)")
    g.add_argument("--first-call", action="store_true", help="time our first call on a cold Triton cache")
    g.add_argument("--stages", action="store_true", help="time each of our kernels alone too")
    g.add_argument("--baseline", help="directory of an older gla.ops package to time beside the current one")
    g.add_argument("--variant", action="append", default=[],
                   help='NAME=JSON tile-config overrides timed as extra rows, e.g. o64={"output":{"BK":64}}')
    g.add_argument("--out", help="write DIR/ops-cuda.md and DIR/ops-cuda.json")
    a = p.parse_args(argv)
    if a.device == "cuda":
        return _main_cuda(p, a)
    rows = run(a.B, a.T, a.H, a.K, a.V, a.threads, a.reps)
    if a.json:
        print(json.dumps(rows))
    else:
        print(format_table(rows, f"B={a.B} T={a.T} H={a.H} K={a.K} V={a.V} fp32, {a.threads} threads, "
                                 f"torch {torch.__version__}"))


def _main_cuda(p, a):
    from . import ops_gpu, write_report
    try:
        shapes = [tuple(int(x) for x in s.split(",")) for s in a.shape] if a.shape else ops_gpu.SHAPES
        variants = {n: json.loads(j) for n, j in (v.split("=", 1) for v in a.variant)}
    except ValueError as e:
        p.error(f"--shape takes B,T,H,K,V integers and --variant NAME=JSON ({e})")
    if any(len(s) != 5 for s in shapes):
        p.error("--shape takes five integers B,T,H,K,V")
    gates = tuple(a.gates.split(","))
    if not set(gates) <= set(ops_gpu.GATES):
        p.error(f"--gates takes {', '.join(ops_gpu.GATES)}")
    if not torch.cuda.is_available():
        p.error("--device cuda needs a CUDA device")
    title = ops_gpu.header()
    stream = sys.stderr if a.json else sys.stdout  # rows as they are measured; with --json stdout is only JSON
    print(title, file=stream, flush=True)
    rows = ops_gpu.run(shapes, gates, a.fla, a.baseline, a.first_call, variants, a.stages,
                       log=lambda line: print(line, file=stream, flush=True))
    table = ops_gpu.format_table(rows, title)
    print(json.dumps(rows) if a.json else table)  # as on the CPU: --json prints only the rows
    if a.out:
        write_report(a.out, "ops-cuda", table, rows)


if __name__ == "__main__":
    main()
