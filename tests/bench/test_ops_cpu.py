"""`gla bench ops` on the CPU: the floor row is the recurrence's arithmetic at the matmul rate measured in the same
run, and every row is reported against it."""
import pytest

from gla.bench import ops


def test_floor_row_and_ratios():
    rows = ops.run(B=1, T=64, H=2, K=16, V=32, threads=1, reps=1)
    floor = rows[0]
    assert [r["name"].split()[0] for r in rows] == ["floor", "recurrent", "chunk", "SDPA"]
    assert floor["gflops"] > 0
    assert floor["fwd_ms"] == pytest.approx(4 * 16 * 32 * 64 * 2 / floor["gflops"] / 1e6)
    assert floor["fwd_bwd_ms"] == pytest.approx(3 * floor["fwd_ms"])
    table = ops.format_table(rows, "shape")
    chunk = next(line for line in table.splitlines() if line.startswith("| chunk |"))
    assert chunk.endswith(f"| {rows[2]['fwd_ms'] / floor['fwd_ms']:.1f}x | "
                          f"{rows[2]['fwd_bwd_ms'] / floor['fwd_bwd_ms']:.1f}x |")
