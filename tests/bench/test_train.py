"""Training-step benchmark at a tiny size: rows, table and files (eager only: test_compile covers the compiled step)."""
import json

import pytest

from gla.bench import train


def test_main_writes_table_and_json(tmp_path, capsys):
    argv = ["--device", "cpu", "--preset", "tiny", "--batch", "2", "--seq-len", "16", "--steps", "2",
            "--modes", "eager", "--out", str(tmp_path)]
    assert train.main(argv) == 0
    out = capsys.readouterr().out
    assert "| eager |" in out and "B=2 T=16" in out
    rows = json.loads((tmp_path / "train.json").read_text())
    assert [r["mode"] for r in rows] == ["eager"] and len(rows[0]["losses"]) == 5
    assert rows[0]["ms_per_step"] > 0 and rows[0]["tok_per_s"] > 0


def test_llama_rows_beside_ours(tmp_path):
    pytest.importorskip("transformers")
    argv = ["--device", "cpu", "--preset", "tiny", "--batch", "2", "--seq-len", "16", "--steps", "1",
            "--modes", "eager", "--models", "gla,llama", "--out", str(tmp_path)]
    assert train.main(argv) == 0
    rows = json.loads((tmp_path / "train.json").read_text())
    assert [(r["model"], r["mode"]) for r in rows] == [("gla", "eager"), ("llama", "eager")]
    assert all(len(r["losses"]) == 4 and r["losses"][0] > 0 for r in rows)


def test_bad_modes():
    with pytest.raises(SystemExit):
        train.main(["--device", "cpu", "--modes", "jit"])
    with pytest.raises(SystemExit):
        train.main(["--device", "cpu", "--models", "mamba"])
    with pytest.raises(SystemExit):
        train.main(["--device", "cpu", "--weights", "fp16"])


def test_bf16_weights_and_profile(tmp_path, capsys):
    argv = ["--device", "cpu", "--preset", "tiny", "--batch", "2", "--seq-len", "16", "--steps", "1",
            "--modes", "eager", "--weights", "fp32,bf16", "--profile", "--out", str(tmp_path)]
    assert train.main(argv) == 0
    rows = json.loads((tmp_path / "train.json").read_text())
    assert [r["weights"] for r in rows] == ["fp32", "bf16"]
    assert all(r["profile"] and r["profile"][0]["ms"] > 0 for r in rows)
    # bf16 weights change the arithmetic, not the model: the first losses agree to bf16 precision
    assert abs(rows[0]["losses"][0] - rows[1]["losses"][0]) < 2e-2 * rows[0]["losses"][0]
    assert "Kernels of one step: gla eager bf16" in capsys.readouterr().out


def test_recompute_rows(tmp_path, capsys):
    pytest.importorskip("transformers")
    argv = ["--device", "cpu", "--preset", "tiny", "--batch", "2", "--seq-len", "16", "--steps", "1",
            "--modes", "eager", "--models", "gla,llama", "--checkpoint-activations", "--out", str(tmp_path)]
    assert train.main(argv) == 0
    rows = json.loads((tmp_path / "train.json").read_text())
    assert all(r["recompute"] for r in rows) and "| eager + recompute |" in capsys.readouterr().out
    assert train.main(argv[:-3] + ["--out", str(tmp_path / "plain")]) == 0  # recomputing changes no value
    plain = json.loads((tmp_path / "plain" / "train.json").read_text())
    for a, b in zip(rows, plain):
        assert not b["recompute"] and a["losses"] == pytest.approx(b["losses"], rel=1e-6)
