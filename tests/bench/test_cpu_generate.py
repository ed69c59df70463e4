"""gla bench cpu-generate: one row per model and variant, ratios against eager, the report files."""
import json

import pytest
import torch

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from gla import GLATransformer  # noqa: E402
from gla.bench import cpu_generate  # noqa: E402


def test_rows_table_and_report(tmp_path, capsys):
    torch.manual_seed(0)
    ckpt = str(tmp_path / "tiny")
    GLATransformer(256, 32, 2, 64, 2).save_pretrained(ckpt)
    assert cpu_generate.main(["--ckpt", ckpt, "--prompt-len", "5", "--new", "3", "--out", str(tmp_path / "o"),
                              "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["variant"] for r in rows] == list(cpu_generate.VARIANTS)
    assert all(r["model"] == "tiny" and r["decode_ms"] > 0 and r["ttft_ms"] > 0 and r["file_mb"] > 0 for r in rows)
    # peak RSS per variant (Linux): at least the interpreter with torch, far below this machine's memory
    assert all(100 < r["peak_rss_mb"] < 16 * 1024 for r in rows)
    md = (tmp_path / "o" / "cpu-generate.md").read_text()
    assert "| tiny |" in md and "| 1.00 |" in md  # eager against itself
    assert json.loads((tmp_path / "o" / "cpu-generate.json").read_text()) == rows


def test_bad_arguments():
    with pytest.raises(SystemExit):
        cpu_generate.main(["--variants", "eager,fast"])
    with pytest.raises(SystemExit):
        cpu_generate.main(["--new", "1"])
