"""Mixer comparison: every mixer trains with the same settings and gets a row."""
import json

import pytest
import torch

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


def test_an_earlier_comparison_in_out_stops_before_training(tmp_path, capsys, monkeypatch):
    """A second comparison into the same --out (the README's two commands once shared the default) is refused
    before the first model trains, naming --out: not after the models before the clash have trained."""
    import gla.eval.compare as compare

    data = tmp_path / "text.txt"
    data.write_text("the quick brown fox jumps over the lazy dog. " * 200)
    flags = ["--data", str(data), "--preset", "tiny", "--seq-len", "32", "--batch-size", "4", "--steps", "1",
             "--eval-every", "1", "--device", "cpu", "--out", str(tmp_path / "o"), "--json"]
    main(["--mixers", "linear", *flags])
    capsys.readouterr()
    monkeypatch.setattr(compare, "train", lambda *a, **k: pytest.fail("a model trained"))
    with pytest.raises(FileExistsError, match="--out .* holds a model of an earlier comparison"):
        main(["--mixers", "gla,linear", *flags])


def test_gated_mixers_train_once_per_gate_bias(tmp_path, capsys):
    """gla gets a row per bias, its model starting from that bias; linear has no gate and trains once."""
    from gla.models import GLATransformer

    data = tmp_path / "text.txt"
    data.write_text("a stitch in time saves nine; " * 300)
    out = tmp_path / "o"
    main(["--mixers", "gla,linear", "--gate-bias-init", "0,2.5", "--data", str(data), "--preset", "tiny",
          "--seq-len", "32", "--batch-size", "4", "--steps", "1", "--lr", "1e-9", "--warmup", "1", "--eval-every", "1",
          "--device", "cpu", "--out", str(out), "--json"])
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert [(r["mixer"], r["gate_bias_init"]) for r in rows] == [("gla", 0.0), ("gla", 2.5), ("linear", 0.0)]
    assert "| gla, gate bias 2.5 |" in (out / "compare.md").read_text()
    for run, bias in (("gla", 0.0), ("gla-bias2.5", 2.5)):  # one step at lr 1e-9 leaves the bias where it started
        model = GLATransformer.from_pretrained(str(out / run))
        b = model.layers[0].attn.gk_proj[1].bias
        assert model.config.gate_bias_init == bias and torch.allclose(b, torch.full_like(b, bias), atol=1e-6)


@pytest.mark.parametrize("bad", ["", "1,x", "nan", "1,1"])
def test_bad_gate_bias_list_is_a_clear_error(bad, tmp_path):
    with pytest.raises(SystemExit, match="--gate-bias-init must be distinct finite numbers"):
        main(["--gate-bias-init", bad, "--out", str(tmp_path)])
