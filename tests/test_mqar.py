"""MQAR data: the structure the task relies on, and a run of the sweep at toy size."""
import json

import torch

from gla.eval.mqar import IGNORE, main, make_mqar


def test_mqar_sequences_are_well_formed():
    x, y = make_mqar(50, 64, 4, vocab_size=128, seed=3)
    assert x.shape == y.shape == (50, 64)
    half = 64
    for i in range(50):
        keys, values = x[i, 0:8:2], x[i, 1:8:2]
        assert torch.all((keys >= 1) & (keys < half)) and torch.all(values >= half)
        assert len(set(keys.tolist())) == 4
        scored = (y[i] != IGNORE).nonzero().squeeze(1)
        assert len(scored) == 4
        for t in scored.tolist():  # the input at t is a key; the label is its value from the context
            j = keys.tolist().index(int(x[i, t]))
            assert int(y[i, t]) == int(values[j]) and t >= 8


def test_power_law_favours_short_gaps():
    x, y = make_mqar(400, 256, 4, vocab_size=512, seed=0)
    pos = (y != IGNORE).nonzero()[:, 1].float()
    assert pos.median() < 8 + (256 - 8) / 4


def test_sweep_prints_one_record_per_mixer_and_width(tmp_path, capsys):
    main(["--mixers", "gla,linear", "--d-model", "16", "--seq-len", "32", "--kv-pairs", "2", "--steps", "3",
          "--batch-size", "4", "--lrs", "1e-3", "--vocab-size", "64", "--json", "--out", str(tmp_path)])
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(r["mixer"], r["d_model"]) for r in records] == [("gla", 16), ("linear", 16)]
    assert all(0.0 <= r["accuracy"] <= 1.0 for r in records)
    assert (tmp_path / "mqar.png").stat().st_size > 0 and "| gla |" in (tmp_path / "mqar.md").read_text()
