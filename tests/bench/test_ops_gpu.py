"""The CUDA operator benchmark on CPU: its table on synthetic rows, and its flow on the Triton interpreter (the
timings themselves need a GPU)."""
import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is first imported (as in tests/ops/test_triton.py)

from gla.bench.ops_gpu import format_table  # noqa: E402


def _row(op, gate, fwd, fb, shape=(8, 2048, 4, 128, 256), graph=(None, None)):
    return dict(op=op, gate=gate, **dict(zip("BTHKV", shape)), fwd_ms=fwd, fwd_bwd_ms=fb, fwd_graph_ms=graph[0],
                fwd_bwd_graph_ms=graph[1])


def test_table_rows_and_ratios():
    rows = [_row("ours", "bf16", 0.4, 1.2, graph=(0.2, 1.0)), _row("ours", "fp32", 0.44, 1.2, graph=(0.2, 1.1)),
            _row("FLA chunk_gla", "fp32", 0.3, 1.8),
            _row("SDPA causal", "-", 0.14, 0.7), _row("ours decode (in place)", "fp32", 0.01, None)]
    text = format_table(rows, "title")
    lines = text.splitlines()
    assert lines[0] == "title"
    assert "| ours | fp32 | 8 | 2048 | 4 | 128 | 256 | 0.440 | 1.200 | 0.200 | 1.100 |" in lines
    assert "| ours decode (in place) | fp32 | 8 | 2048 | 4 | 128 | 256 | 0.010 | – | – | – |" in lines
    # fp32-gate over bf16-gate time, and FLA over ours, per shape (graph ratios where both have graph times)
    assert "| B=8 T=2048 H=4 K=128 V=256 | fp32 | 1.10, 1.00 (1.00, 1.10) | 0.68, 1.50 (–, –) |" in lines
    assert "| B=8 T=2048 H=4 K=128 V=256 | bf16 | – | – |" in lines


def test_run_smoke_on_the_interpreter(monkeypatch):
    """Every row kind runs (ours, a tile variant, stages, SDPA, decode) on CPU tensors under the Triton interpreter,
    each timed once: the flow a GPU call relies on."""
    import pytest
    pytest.importorskip("triton")
    from gla.bench import ops_gpu
    monkeypatch.setattr(ops_gpu, "DEVICE", "cpu")
    monkeypatch.setattr(ops_gpu, "bench", lambda fn, rep=100: (fn(), 1.0)[1])
    monkeypatch.setattr(ops_gpu, "bench_graph", lambda fn, rep=100: (fn(), 0.5)[1])
    variants = {"o16": {"output": {"BK": 16, "BV": 16, "num_warps": 4}}}
    rows = ops_gpu.run([(1, 70, 2, 16, 32)], ("fp32",), variants=variants, stages=True,
                       log=lambda line: None, decode_shape=(2, 2, 16, 32))
    ops = [r["op"] for r in rows]
    assert ops[:2] == ["ours", "ours, o16"]
    assert {"ours stage cumsum", "ours stage dv+dqkg", "SDPA causal", "ours decode (in place)"} <= set(ops)
