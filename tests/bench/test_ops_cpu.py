"""`gla bench ops` on the CPU: the floor row is the recurrence's arithmetic at the matmul rate measured in the same
run, and every row is reported against it."""
import statistics

import pytest

from gla.bench import ops
from gla.ops import cpu_kernels


def test_floor_row_and_ratios():
    rows = ops.run(B=1, T=64, H=2, K=16, V=32, threads=1, reps=1)
    floor = rows[0]
    chunks = ["chunk (compiled)", "chunk (PyTorch)"] if cpu_kernels.available() else ["chunk"]
    assert [r["name"] for r in rows[2:-1]] == chunks
    assert [r["name"].split()[0] for r in rows] == ["floor", "recurrent", *(["chunk"] * len(chunks)), "SDPA"]
    assert floor["gflops"] > 0
    assert floor["fwd_ms"] == pytest.approx(4 * 16 * 32 * 64 * 2 / floor["gflops"] / 1e6)
    assert floor["fwd_bwd_ms"] == pytest.approx(3 * floor["fwd_ms"])
    table = ops.format_table(rows, "shape")
    chunk = next(line for line in table.splitlines() if line.startswith(f"| {chunks[0]} |"))
    assert chunk.endswith(f"| {rows[2]['fwd_ms'] / floor['fwd_ms']:.1f}x | "
                          f"{rows[2]['fwd_bwd_ms'] / floor['fwd_bwd_ms']:.1f}x |")


def test_floor_rate_is_timed_beside_each_set_of_repetitions():
    timer, calls = ops.Timer(n=64, products=3), []
    timer.median_ms(lambda: calls.append(1), reps=4, warmup=2)
    timer.median_ms(lambda: calls.append(1), reps=1, warmup=0)
    assert len(calls) == 7 and len(timer.matmul_s) == 6
    assert timer.gflops() == pytest.approx(2 * 64 ** 3 / statistics.median(timer.matmul_s) / 1e9)
