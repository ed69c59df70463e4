"""`gla bench nanogpt` with a stand-in nanoGPT checkout (the real one is not a dependency): the recipe's flags reach
train.py, its data is prepared from the given text in a copy (the checkout is left as it was), its last validation
line is the row, and our side is a real `gla train` of a few steps."""
import json
import os

import pytest

from gla.bench import nanogpt

STUB_TRAIN = '''import sys, json, os
open(os.path.join(os.path.dirname(__file__), "argv.json"), "w").write(json.dumps(sys.argv[1:]))
print("step 0: train loss 4.2000, val loss 4.2100")
print("iter 1: loss 4.1, time 1.00ms, mfu -100.00%")
print("step 250: train loss 2.0000, val loss 2.0500")
'''
STUB_PREPARE = '''import os
here = os.path.dirname(os.path.abspath(__file__))
text = open(os.path.join(here, "input.txt")).read()
open(os.path.join(here, "train.bin"), "w").write(str(len(text)))
'''


@pytest.fixture
def checkout(tmp_path):
    root = tmp_path / "nanoGPT"
    (root / "data" / "shakespeare_char").mkdir(parents=True)
    (root / "config").mkdir()
    (root / "train.py").write_text(STUB_TRAIN)
    (root / "config" / "train_shakespeare_char.py").write_text("")
    (root / "data" / "shakespeare_char" / "prepare.py").write_text(STUB_PREPARE)
    return root


def test_nanogpt_side_runs_the_recipe_in_a_copy(checkout, tmp_path):
    data = tmp_path / "text.txt"
    data.write_text("abc\n" * 50)
    work = tmp_path / "work"
    work.mkdir()
    row = nanogpt.run_nanogpt(str(checkout), str(data), 7, str(work))
    assert (row["step"], row["val_loss"]) == (250, 2.05) and row["wall_s"] > 0
    argv = json.loads((work / "nanoGPT" / "argv.json").read_text())
    assert argv[0] == "config/train_shakespeare_char.py" and "--max_iters=7" in argv and "--lr_decay_iters=7" in argv
    assert {"--device=cpu", "--compile=False", "--block_size=64", "--n_embd=128", "--dropout=0.0"} <= set(argv)
    assert (work / "nanoGPT" / "data" / "shakespeare_char" / "train.bin").read_text() == str(4 * 50)
    assert not (checkout / "argv.json").exists() and not (checkout / "data" / "shakespeare_char" / "input.txt").exists()


def test_a_foreign_directory_is_refused(tmp_path, capsys):
    data = tmp_path / "x.txt"
    data.write_text("abc")
    with pytest.raises(SystemExit) as e:
        nanogpt.main(["--nanogpt", str(tmp_path), "--data", str(data), "--steps", "1"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "no train.py there" in err and "Traceback" not in err


def test_whole_bench_prints_both_rows(checkout, tmp_path, capsys, monkeypatch):
    """Both sides end to end; ours trains 3 steps (--steps applies to both), so its row is a real run."""
    data = tmp_path / "text.txt"
    data.write_text("First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n" * 40)
    monkeypatch.chdir(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    assert nanogpt.main(["--nanogpt", str(checkout), "--data", str(data), "--steps", "3", "--json",
                         "--out", str(tmp_path / "out")]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["run"].split()[0] for r in rows] == ["nanoGPT", "gla"] and rows[1]["step"] == 3
    assert 0 < rows[1]["val_loss"] < 10
    assert "| gla train (GLA) | 3 |" in (tmp_path / "out" / "nanogpt.md").read_text()
