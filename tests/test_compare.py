"""Mixer comparison: every mixer trains with the same settings and gets a row."""
import json

from gla.eval.compare import main


def test_compare_trains_and_evaluates_each_mixer(tmp_path, capsys):
    data = tmp_path / "text.txt"
    data.write_text("the quick brown fox jumps over the lazy dog. " * 200)
    main(["--mixers", "gla,softmax", "--data", str(data), "--preset", "tiny", "--seq-len", "32",
          "--batch-size", "4", "--steps", "3", "--eval-every", "3", "--device", "cpu", "--out", str(tmp_path / "o"),
          "--json"])
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert [r["mixer"] for r in rows] == ["gla", "softmax"]
    assert "val_loss_unbounded" in rows[0] and "val_loss_unbounded" not in rows[1]
    assert all(r["val_loss"] > 0 for r in rows)
    assert "| softmax |" in (tmp_path / "o" / "compare.md").read_text()
