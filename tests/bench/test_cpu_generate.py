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
                              "--contexts", "16,300", "--context-model", "tiny", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    rows = report["generate"]
    assert [r["variant"] for r in rows] == list(cpu_generate.VARIANTS)
    ran = [r for r in rows if "skipped" not in r]
    assert {r["variant"] for r in rows} - {r["variant"] for r in ran} <= {"eager-int8"}  # torchao is optional
    assert all(r["model"] == "tiny" and r["decode_ms"] > 0 and r["ttft_ms"] > 0 for r in ran)
    assert all(r["file_mb"] > 0 for r in ran if r["variant"] != "eager-int8")
    # peak RSS per variant (Linux): at least the interpreter with torch, far below this machine's memory
    assert all(100 < r["peak_rss_mb"] < 16 * 1024 for r in ran)
    md = (tmp_path / "o" / "cpu-generate.md").read_text()
    assert "| tiny |" in md and "| 1.00 |" in md  # eager against itself
    assert json.loads((tmp_path / "o" / "cpu-generate.json").read_text()) == report
    # memory against context: GLA's state is the same at both lengths, the softmax twin's KV cache grows with it
    ctx = {(r["model"], r["context"]): r for r in report["context"]}
    assert set(ctx) == {(m, L) for m in ("gla", "softmax") for L in (16, 300)}
    assert ctx["gla", 16]["state_bytes"] == ctx["gla", 300]["state_bytes"]
    assert ctx["softmax", 300]["state_bytes"] > 4 * ctx["softmax", 16]["state_bytes"]
    assert all(100 * 2**20 < r["peak_rss_bytes"] < 16 * 2**30 for r in report["context"])
    assert "Memory against context: tiny" in md and "peak RSS MiB" in md
    assert (tmp_path / "o" / "cpu-generate-context.png").exists()


def test_bad_arguments():
    with pytest.raises(SystemExit):
        cpu_generate.main(["--variants", "eager,fast"])
    with pytest.raises(SystemExit):
        cpu_generate.main(["--new", "1"])
    for bad in (["--contexts", "1k"], ["--contexts", "0"], ["--context-model", "huge"]):
        with pytest.raises(SystemExit):
            cpu_generate.main(bad)
