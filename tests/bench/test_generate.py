"""gla bench generate: rows for ours and the Llama twin, the report files (CPU smoke at the tiny preset)."""
import json

import pytest

from gla.bench import generate


def test_rows_and_report(tmp_path, capsys):
    pytest.importorskip("transformers")
    assert generate.main(["--device", "cpu", "--preset", "tiny", "--batch", "2", "--prompt-len", "5", "--new", "3",
                          "--out", str(tmp_path), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["model"], r["mode"], r["B"]) for r in rows] == [("gla (ours)", "eager", 2),
                                                              ("HF Llama, static cache", "eager", 2)]
    assert all(r["tok_s"] > 0 and abs(r["ms_token"] - r["total_s"] / 3 * 1e3) < 1e-9 for r in rows)
    assert "| gla (ours) | eager | 2 |" in (tmp_path / "generate.md").read_text()
