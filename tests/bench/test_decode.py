"""Decode benchmark at a tiny size: table shape, exact GLA state and KV cache bytes, what is timed, files written."""
import json
import os
import types

import pytest
import torch

from gla.bench import decode

TINY = dict(contexts=(32, 128), d_model=32, n_heads=2, n_layers=2, vocab=64, steps=2)


def test_rows_state_bytes_and_table():
    rows = decode.run(**TINY)
    assert [(r["model"], r["context"]) for r in rows] == [("gla", 32), ("gla", 128), ("softmax", 32),
                                                         ("softmax", 128)]
    gla_bytes = {r["state_bytes"] for r in rows if r["model"] == "gla"}
    # 2 layers x [B=1, H=2, K=8, V=16] float32 + seen [B] int64, whatever the context
    assert gla_bytes == {2 * 2 * 8 * 16 * 4 + 8}
    # 2 layers x KV cache k, v [B=1, H=2, L, D=16] float32 + seen, L = the context + 2 warm-up + 2 timed steps
    sm = [r["state_bytes"] for r in rows if r["model"] == "softmax"]
    assert sm == [2 * 2 * 2 * (L + 4) * 16 * 4 + 8 for L in (32, 128)]
    lines = decode.format_table(rows, "title").splitlines()
    assert lines[0] == "title" and len(lines) == 2 + 2 + 2
    assert all(line.count("|") == 1 + 1 + 4 * 2 for line in lines[2:])
    assert lines[4].startswith("| 32 |") and lines[5].startswith("| 128 |")


def test_main_writes_table_json_and_plot(tmp_path, capsys):
    argv = ["--contexts", "16,48", "--d-model", "32", "--n-heads", "2", "--n-layers", "1", "--vocab", "64",
            "--steps", "2", "--models", "gla", "--out", str(tmp_path)]
    assert decode.main(argv) == 0
    assert "| 48 |" in capsys.readouterr().out
    with open(tmp_path / "decode.json") as f:
        rows = json.load(f)["rows"]
    assert len(rows) == 2 and rows[0]["state_bytes"] == rows[1]["state_bytes"]
    assert (tmp_path / "decode.md").exists()
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return
    assert os.path.getsize(tmp_path / "decode.png") > 1000


def test_timings_leave_out_the_warm_up_and_take_the_median(monkeypatch):
    """A clock the model advances: each prefill piece takes 0.5 s, decode step k takes k ms. With 2 warm-up steps
    and 3 timed ones the row reports the 1 s prefill and the median of steps 3, 4, 5."""
    now, calls = [0.0], []
    monkeypatch.setattr(decode, "time", types.SimpleNamespace(perf_counter=lambda: now[0]))
    m = decode.build("gla", 64, 32, 2, 1, 64, torch.device("cpu"), torch.float32)
    forward = m.forward

    def clocked(ids, state=None):
        calls.append(ids.shape[1])
        now[0] += 0.5 if ids.shape[1] > 1 else 1e-3 * calls.count(1)
        return forward(ids, state)

    monkeypatch.setattr(m, "forward", clocked)
    row = decode.measure(m, 16, steps=3, prefill_chunk=8)
    assert calls == [8, 8, 1, 1, 1, 1, 1]
    assert row["prefill_s"] == pytest.approx(1.0) and row["ms_per_token"] == pytest.approx(4.0)


def test_bad_arguments():
    with pytest.raises(SystemExit):
        decode.main(["--contexts", "1k"])
    with pytest.raises(ValueError, match="unknown model"):
        decode.run(**{**TINY, "models": ("mamba",)})


def test_checkpoints_are_measured_under_their_names(tmp_path, capsys):
    """--ckpt NAME=DIR: a saved hybrid (one softmax layer of two) keeps KV bytes for that layer only."""
    from gla import GLATransformer
    GLATransformer(64, 32, 2, 64, 2, dropout=0.0, attn_layers=(1,)).save_pretrained(str(tmp_path / "hybrid"))
    argv = ["--contexts", "16,48", "--steps", "2", "--models", "", "--ckpt", f"3:1={tmp_path / 'hybrid'}", "--json"]
    assert decode.main(argv) == 0
    rows = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert [r["model"] for r in rows] == ["3:1", "3:1"]
    # layer 0: GLA [1, 2, 8, 16] fp32; layer 1: k, v [1, 2, L + 4, 16] fp32; seen [1] int64
    assert [r["state_bytes"] for r in rows] == [2 * 8 * 16 * 4 + 2 * 2 * (L + 4) * 16 * 4 + 8 for L in (16, 48)]
    assert "| context | 3:1 ms/token | 3:1 state MiB |" in decode.format_table(rows)
    with pytest.raises(SystemExit):
        decode.main(["--models", "", "--contexts", "16"])
    with pytest.raises(SystemExit):
        decode.main(["--ckpt", "nodir"])
