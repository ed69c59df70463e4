"""gla bench generate: rows for ours and the Llama twin, the report files (CPU smoke at the tiny preset)."""
import json

import pytest

from gla.bench import generate


def test_rows_and_report(tmp_path, capsys):
    pytest.importorskip("transformers")
    assert generate.main(["--device", "cpu", "--preset", "tiny", "--batch", "2", "--prompt-len", "5",
                          "--prompt-len", "9", "--new", "3", "--out", str(tmp_path), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["model"], r["mode"], r["B"], r["prompt"]) for r in rows] == [
        ("gla (ours)", "eager", 2, 5), ("HF Llama, static cache", "eager", 2, 5),
        ("gla (ours)", "eager", 2, 9), ("HF Llama, static cache", "eager", 2, 9)]
    for r in rows:
        assert r["tok_s"] > 0 and r["ttft_s"] > 0 and r["peak_gib"] is None
        assert abs(r["ms_token"] - (r["total_s"] - r["ttft_s"]) / 2 * 1e3) < 1e-9
    assert "| gla (ours) | eager | 2 | 9 |" in (tmp_path / "generate.md").read_text()


def test_bad_arguments():
    with pytest.raises(SystemExit):
        generate.main(["--device", "cpu", "--prompt-len", "0"])
